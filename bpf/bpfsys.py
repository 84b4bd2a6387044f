"""Thin ctypes wrapper over the bpf(2) syscall: pin/get, map ops, mmap of arrays, test-run, RCU barrier.

BCC is only used to compile and load; every later touch of a map or program (apply, status, tests,
the collector) goes through here, by fd or by pinned path, so control commands need no compiler.
Each call is one syscall (~1 µs); bulk data goes through mmap'ed arrays or batch ops instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYS_BPF = 321  # x86_64

# enum bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_TEST_RUN, OBJ_GET_INFO_BY_FD = 6, 7, 10, 15
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID = 13, 14
MAP_LOOKUP_BATCH, MAP_LOOKUP_AND_DELETE_BATCH, MAP_UPDATE_BATCH, MAP_DELETE_BATCH = 24, 25, 26, 27

# enum bpf_map_type (subset)
MAP_TYPE_ARRAY, MAP_TYPE_ARRAY_OF_MAPS = 2, 12
BPF_ANY = 0
BPF_F_MMAPABLE = 1 << 10


class BpfError(OSError):
    """A bpf(2) call failed; errno and the operation are kept for the caller's message."""


def _sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_SYS_BPF, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16), ("_pad", ctypes.c_uint8 * 64)]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad0", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _MapBatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("path_fd", ctypes.c_int32), ("_pad", ctypes.c_uint32)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class _GetByIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 64)]


class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16),
                ("ifindex", ctypes.c_uint32), ("_flags", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
                ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
                ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
                ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
                ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
                ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
                ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
                ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
                ("_rest", ctypes.c_uint8 * 64)]


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    _sys_bpf(OBJ_PIN, _ObjAttr(pathname=_addr(p), bpf_fd=fd))


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd (caller closes)."""
    p = ctypes.create_string_buffer(path.encode())
    return _sys_bpf(OBJ_GET, _ObjAttr(pathname=_addr(p)))


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _sys_bpf(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)))
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags,
                   info.name.decode())


def map_memlock(fd: int) -> int:
    """Bytes the kernel charges for a map (the `memlock` line of its fd's /proc fdinfo: its allocation,
    per-CPU copies included; for hash maps that allocate as they fill, the kernel's estimate of the full
    map). 0 when the kernel does not report it. Cost: one small procfs read."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def prog_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program; non-zero only with kernel.bpf_stats_enabled=1."""
    info = _ProgInfo()
    _sys_bpf(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)))
    return info.run_time_ns, info.run_cnt


def prog_get_fd_by_id(prog_id: int) -> int:
    """A new fd (caller closes) for a loaded program, e.g. one another tool attached to an interface."""
    return _sys_bpf(PROG_GET_FD_BY_ID, _GetByIdAttr(id=prog_id))


def map_get_fd_by_id(map_id: int) -> int:
    return _sys_bpf(MAP_GET_FD_BY_ID, _GetByIdAttr(id=map_id))


def prog_map_ids(fd: int, limit: int = 64) -> list[int]:
    """Ids of the maps a program uses (its bpf_prog_info.map_ids)."""
    ids = (ctypes.c_uint32 * limit)()
    info = _ProgInfo(nr_map_ids=limit, map_ids=_addr(ids))
    _sys_bpf(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)))
    return list(ids[: min(info.nr_map_ids, limit)])


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               inner_map_fd: int = 0, name: str = "") -> int:
    return _sys_bpf(MAP_CREATE, _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                                               max_entries=max_entries, map_flags=flags,
                                               inner_map_fd=inner_map_fd, map_name=name.encode()[:15]))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _sys_bpf(MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=_addr(k), value=_addr(v)))
    except BpfError as e:
        if e.errno == 2:  # ENOENT
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _sys_bpf(MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(k), value=_addr(v), flags=flags))


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _sys_bpf(MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(k)))
    except BpfError as e:
        if e.errno == 2:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int):
    """Iterate keys with GET_NEXT_KEY (one syscall per key; fine for status-sized maps)."""
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        k = ctypes.create_string_buffer(cur, key_size) if cur is not None else None
        try:
            _sys_bpf(MAP_GET_NEXT_KEY, _MapElemAttr(map_fd=fd, key=_addr(k), value=_addr(nxt)))
        except BpfError as e:
            if e.errno == 2:
                return
            raise
        cur = nxt.raw
        yield cur


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Update `count` elements in one syscall (keys/values are packed arrays)."""
    kb = ctypes.create_string_buffer(keys, len(keys))
    vb = ctypes.create_string_buffer(values, len(values))
    _sys_bpf(MAP_UPDATE_BATCH, _MapBatchAttr(keys=_addr(kb), values=_addr(vb), count=count, map_fd=fd))


def map_delete_batch(fd: int, keys: bytes, key_size: int, *, chunk: int = 8192) -> int:
    """Delete the packed `keys` from a hash map, `chunk` keys per syscall; keys already gone are skipped
    (one syscall per missing key to step over it). Returns how many were deleted."""
    n = len(keys) // key_size
    done = i = 0
    while i < n:
        cnt = min(chunk, n - i)
        kb = ctypes.create_string_buffer(keys[i * key_size:(i + cnt) * key_size], cnt * key_size)
        attr = _MapBatchAttr(keys=ctypes.addressof(kb), count=cnt, map_fd=fd)
        try:
            _sys_bpf(MAP_DELETE_BATCH, attr)
            done += attr.count
            i += cnt
        except BpfError as e:
            if e.errno != 2:        # ENOENT: key i + attr.count is gone already; the ones before it were deleted
                raise
            done += attr.count
            i += attr.count + 1
    return done


def iter_batches(fd: int, key_size: int, value_bytes: int, *, delete: bool = False, chunk: int = 8192):
    """Walk a map with BPF_MAP_LOOKUP[_AND_DELETE]_BATCH, yielding (keys, values, n) per chunk.

    The two buffers are reused between chunks (copy what you keep), so memory is O(chunk) whatever
    the map's size; one syscall per `chunk` entries. value_bytes: bytes per value as the syscall
    returns them (per-CPU maps: 8-aligned value × ncpus). A hash map written concurrently may be
    seen partially (entries added behind the cursor)."""
    cmd = MAP_LOOKUP_AND_DELETE_BATCH if delete else MAP_LOOKUP_BATCH
    kb = ctypes.create_string_buffer(chunk * key_size)
    vb = ctypes.create_string_buffer(chunk * value_bytes)
    token_in = ctypes.create_string_buffer(max(key_size, 8))
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    first = True
    while True:
        attr = _MapBatchAttr(in_batch=0 if first else ctypes.addressof(token_in), out_batch=ctypes.addressof(token_out),
                             keys=ctypes.addressof(kb), values=ctypes.addressof(vb), count=chunk, map_fd=fd)
        done = False
        try:
            _sys_bpf(cmd, attr)
        except BpfError as e:
            if e.errno != 2:        # ENOENT: the map ended within this chunk
                raise
            done = True
        if attr.count:
            yield kb, vb, attr.count
        if done or attr.count == 0:
            return
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


def map_batch(fd: int, key_size: int, value_bytes: int, *, delete: bool = False,
              chunk: int = 8192) -> tuple[bytes, bytes, int]:
    """All (key, value) pairs of a map, packed: (keys, values, count). See iter_batches."""
    keys, vals = bytearray(), bytearray()
    total = 0
    for kb, vb, n in iter_batches(fd, key_size, value_bytes, delete=delete, chunk=chunk):
        keys += kb.raw[: n * key_size]
        vals += vb.raw[: n * value_bytes]
        total += n
    return bytes(keys), bytes(vals), total


def count_entries(fd: int, key_size: int, value_bytes: int, chunk: int = 8192) -> int:
    """Number of entries of a hash map (batched: ~0.3 s for 1M entries, memory O(chunk))."""
    return sum(n for _, _, n in iter_batches(fd, key_size, value_bytes, chunk=chunk))


def array_slots(fd: int, start: int, n: int, value_bytes: int) -> bytes:
    """Values of array-map slots start .. start+n-1 with LOOKUP_BATCH (one syscall per 64k slots).

    value_bytes as in map_batch. Raises BpfError if the map holds fewer slots."""
    out = bytearray()
    got = 0
    while got < n:
        cnt = min(65536, n - got)
        token = ctypes.c_uint32(start + got - 1)
        nxt = ctypes.c_uint32(0)
        kb = ctypes.create_string_buffer(cnt * 4)
        vb = ctypes.create_string_buffer(cnt * value_bytes)
        attr = _MapBatchAttr(in_batch=ctypes.addressof(token) if start + got else 0, out_batch=ctypes.addressof(nxt),
                             keys=ctypes.addressof(kb), values=ctypes.addressof(vb), count=cnt, map_fd=fd)
        try:
            _sys_bpf(MAP_LOOKUP_BATCH, attr)
        except BpfError as e:
            if e.errno != 2:
                raise
        if attr.count != cnt:
            raise BpfError(22, f"array batch read at slot {start + got}: {attr.count} of {cnt} slots")
        out += vb.raw[: cnt * value_bytes]
        got += cnt
    return bytes(out)


def mmap_array(fd: int) -> mmap.mmap:
    """Map a BPF_F_MMAPABLE array into this process (writes are visible to programs at once).

    Element stride is value_size rounded up to 8 bytes (the kernel's elem_size)."""
    info = map_info(fd)
    stride = (info.value_size + 7) & ~7
    size = (info.max_entries * stride + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


@dataclass(frozen=True)
class TestRun:
    retval: int
    duration_ns: int
    data_out: bytes


def prog_test_run(fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                  out_size: int | None = None) -> TestRun:
    """BPF_PROG_TEST_RUN: run the program `repeat` times on `data`; duration is mean ns per run."""
    din = ctypes.create_string_buffer(data, len(data))
    osz = out_size if out_size is not None else len(data) + 256
    dout = ctypes.create_string_buffer(osz)
    attr = _TestRunAttr(prog_fd=fd, data_size_in=len(data), data_size_out=osz, data_in=_addr(din),
                        data_out=_addr(dout), repeat=repeat)
    if ctx is not None:
        cin = ctypes.create_string_buffer(ctx, len(ctx))
        attr.ctx_in, attr.ctx_size_in = _addr(cin), len(ctx)
    _sys_bpf(PROG_TEST_RUN, attr)
    return TestRun(attr.retval, attr.duration, dout.raw[: attr.data_size_out])


class RcuBarrier:
    """Waits until every BPF program that started before the call has finished.

    Updating an ARRAY_OF_MAPS from user space makes the kernel wait for an RCU grace period
    (maybe_wait_bpf_programs), which is exactly "no packet still reads the old generation".
    Cost: one grace period, ~1-20 ms."""

    def __init__(self) -> None:
        self._inner = map_create(MAP_TYPE_ARRAY, 4, 4, 1, name="hw_rcu_inner")
        self._outer = map_create(MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, inner_map_fd=self._inner, name="hw_rcu_sync")

    def wait(self) -> None:
        map_update(self._outer, b"\0\0\0\0", self._inner.to_bytes(4, "little"))

    def close(self) -> None:
        os.close(self._outer)
        os.close(self._inner)


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32), ("_pad", ctypes.c_uint8 * 128)]


PROG_TYPE_XDP = 6           # enum bpf_prog_type: for prog_load_verbose of a hand-made XDP program


def prog_load_verbose(prog_type: int, insns: bytes, name: str, log_level: int = 1,
                      log_size: int = 16 << 20) -> tuple[int, str]:
    """Load raw instructions with a verifier log: (fd or -errno, log). For diagnostics and feature probes."""
    ib = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(log_size)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=_addr(ib), license=_addr(lic),
                         log_level=log_level, log_size=log_size, log_buf=_addr(log), prog_name=name.encode()[:15])
    try:
        fd = _sys_bpf(5, attr)
    except BpfError as e:
        fd = -e.errno
    return fd, log.value.decode(errors="replace")

