"""Security material for the Kafka test peer (tests/peers/kafka.py): a throwaway PKI and a SCRAM client.

    pki = make_test_pki(folder)      # openssl: a CA, a server certificate for 127.0.0.1/localhost signed by
                                     # it (PEM keystore for Kafka), and a second, unrelated CA ("wrong CA")
    scram = ScramClient("SCRAM-SHA-512", "alice", "secret")
    first = scram.first()            # -> bytes for SaslAuthenticate; then scram.final(server_first)
                                     # and scram.verify(server_final)

The certificates follow what strict verifiers ask for (SAN, key usages, subject and authority key ids)
and live only as long as the broker's work folder. SCRAM is RFC 5802/7677 as Kafka speaks it (no channel
binding, no extensions): the peer uses it to wait until a credential it added or removed has taken effect
on a fresh connection, without any Kafka client library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import PeerError

__all__ = ["SCRAM_MECHANISMS", "ScramClient", "TestPki", "make_test_pki"]

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}


# ------------------------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class TestPki:
    __test__ = False                 # not a pytest test class, despite the name
    ca_file: Path                    # the CA that signed the server certificate: what clients should trust
    server_keystore: Path            # server key (PKCS#8, unencrypted) + certificate + CA: ssl.keystore.type=PEM
    wrong_ca_file: Path              # a valid CA that signed nothing the broker presents


def _openssl(*args: object, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *[str(a) for a in args]], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode != 0:
        raise PeerError(f"openssl {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _self_signed_ca(folder: Path, stem: str, cn: str) -> None:
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{stem}.key", "-out", f"{stem}.pem", "-days", 7, "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=folder)


def make_test_pki(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TestPki:
    """Write a throwaway CA, a server certificate for ``hosts`` signed by it, and an unrelated second CA
    into ``folder`` (created). Keys never leave it; the caller removes the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    _self_signed_ca(folder, "ca", f"hostwall test CA {tag}")
    _self_signed_ca(folder, "other-ca", f"hostwall unrelated test CA {tag}")
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    (folder / "server.ext").write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={hosts[-1]}", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial",
             int.from_bytes(secrets.token_bytes(8), "big"), "-days", 7, "-sha256", "-extfile", "server.ext",
             "-out", "server.pem", cwd=folder)
    keystore = folder / "server-keystore.pem"
    keystore.write_text("".join((folder / f).read_text() for f in ("server.key", "server.pem", "ca.pem")))
    return TestPki(ca_file=folder / "ca.pem", server_keystore=keystore, wrong_ca_file=folder / "other-ca.pem")


# ------------------------------------------------------------------------------------------------ SCRAM


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """One SCRAM exchange (RFC 5802): first() -> server-first -> final() -> server-final -> verify()."""

    def __init__(self, mechanism: str, username: str, password: str) -> None:
        if mechanism not in _HASHES:
            raise ValueError(f"not a SCRAM mechanism: {mechanism}")
        self.hash = _HASHES[mechanism]
        self.username, self.password = username, password
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self._bare = f"n={_saslname(username)},r={self.nonce}"
        self._server_signature: bytes | None = None

    def first(self) -> bytes:
        return f"n,,{self._bare}".encode()

    def _hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self.hash).digest()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(kv.split("=", 1) for kv in text.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise PeerError("SCRAM: the server nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac(self.hash().name, self.password.encode(), salt, iterations)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = self.hash(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._bare},{text},{without_proof}".encode()
        signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        attrs = dict(kv.split("=", 1) for kv in server_final.decode().split(","))
        if "e" in attrs:
            raise PeerError(f"SCRAM: server error {attrs['e']}")
        if self._server_signature is None or base64.b64decode(attrs.get("v", "")) != self._server_signature:
            raise PeerError("SCRAM: the server's signature does not verify")
