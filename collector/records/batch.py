"""Kernel batches as the record builder reads them: NumPy arrays in the layouts of bpf/hostwall.h
(hostwall.bpf.layout.DTYPES), addresses as packed bytes, columns of names and flow-tuple keys, and
the GC pause around dict building."""
from __future__ import annotations

import socket

import numpy as np

__all__ = ["as_dtype", "pairs", "ntop", "packed", "column_names", "endpoint_keys", "ENDPOINT_KEY_BYTES"]


def as_dtype(arr, dt: np.dtype) -> np.ndarray | None:
    """`arr` as a C-contiguous array of layout `dt`: raw bytes (uint8 / bytes) are reinterpreted; a
    structured array with the same field names but another byte order or packing (np.concatenate
    canonicalises '>u2' to native) is converted field by field. None if it cannot be either."""
    if isinstance(arr, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(arr, np.uint8)
    if arr.dtype == dt:
        return np.ascontiguousarray(arr)
    if arr.dtype.names is None:
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        return np.frombuffer(raw.tobytes(), dt) if raw.size % dt.itemsize == 0 else None
    if set(arr.dtype.names) != set(dt.names):
        return None
    try:
        return np.ascontiguousarray(arr.astype(dt))
    except (TypeError, ValueError):
        return None


def pairs(col: np.ndarray) -> list[tuple[int, int]]:
    """An (n, 2) integer field as n (a, b) tuples of Python ints, one 1-D tolist() per column."""
    return list(zip(col[:, 0].tolist(), col[:, 1].tolist()))


def ntop(fam: int, raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, raw[:4]) if fam == 4 else socket.inet_ntop(socket.AF_INET6, raw)


def packed(fam: int, raw: bytes) -> bytes:
    return raw[:4] if fam == 4 else raw


def column_names(names: dict[int, str], default: str = "") -> np.ndarray:
    """A 256-entry object table for a u8 code column: table[column] maps a whole column to its names
    (`default` for codes without one) in one NumPy fancy-index; O(n) in C."""
    table = np.full(256, default, dtype=object)
    for code, name in names.items():
        table[code] = name
    return table


ENDPOINT_KEY_BYTES = 40
_ECHO_PROTOS = (1, 58)


def endpoint_keys(events: np.ndarray) -> list[bytes]:
    """Per hw_event, the 40 bytes that determine its endpoints, addresses as text and Community ID:
    saddr (16; bytes 4.. zeroed for IPv4, which the kernel need not clear), daddr (16), sport, dport
    (network order, 2 + 2), proto, family, icmp_type (ICMP / ICMPv6 only, else 0), one zero byte.
    Equal keys ⇔ equal endpoint fields (records/endpoints.py caches by it). Vectorised: O(n) in C,
    then one bytes object per event."""
    n = len(events)
    k = np.zeros((n, ENDPOINT_KEY_BYTES), np.uint8)
    v4 = events["family"] == 4
    k[:, 0:16] = events["saddr"]
    k[:, 16:32] = events["daddr"]
    k[v4, 4:16] = 0
    k[v4, 20:32] = 0
    k[:, 32:34] = events["sport"].astype(">u2").view(np.uint8).reshape(n, 2)
    k[:, 34:36] = events["dport"].astype(">u2").view(np.uint8).reshape(n, 2)
    proto = events["proto"]
    k[:, 36] = proto
    k[:, 37] = events["family"]
    k[:, 38] = np.where(np.isin(proto, _ECHO_PROTOS), events["icmp_type"], 0)
    return k.view(np.dtype((np.void, ENDPOINT_KEY_BYTES))).ravel().tolist()
