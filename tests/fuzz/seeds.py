"""Seed corpora for the fuzzers, produced by keymgr's own writers (no token needed).

Mutating real messages finds far more than random bytes: a flipped bit deep
inside a valid CMS message, stream segment or signed transcript reaches the
code after the outer checks. Each seed here is made by the code that writes
that format in production (``seal_message``, ``encrypt_stream``,
``BackupFile.to_bytes``, ``make_request``, ``sign_transcript``,
``Entry.line`` ...), with host-side keys: the KEK is :data:`SEED_KEK`
(tests/_softkek.py wraps with it, and the fuzz targets unwrap with it, so a
mutated message is decrypted as far as its bytes allow), signing keys are
``cryptography`` keys with self-signed certificates made by keymgr.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["SEED_KEK", "seeds", "write_corpus"]

#: The KEK of every seed message (and of the targets that open them): fixed, so corpora are reusable.
SEED_KEK = bytes(range(32))
_NOW = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)


def _kek() -> Any:
    from tests._softkek import SoftKek

    return SoftKek(kek=SEED_KEK)


def _cms() -> list[bytes]:
    from keymgr.envelope import seal_message

    kek, out = _kek(), []
    for algorithm in ("aes256_wrap", "aes256_wrap_pad", "aes256_gcm"):
        for context in (None, {"tenant": "acme", "purpose": "fuzz"}):
            dek = os.urandom(32)
            out.append(seal_message(b"fuzz seed plaintext " * 3, dek=dek,
                                    recipient_infos=[kek.recipient(dek, algorithm)], context=context))
    dek = os.urandom(32)
    out.append(seal_message(b"compat", dek=dek, recipient_infos=[kek.recipient(dek)], context=None,
                            compat_openssl=True))
    from tests._ber import to_ber  # other writers' BER forms: read through their DER re-encoding

    out += [to_ber(out[1], 1), to_ber(out[-1], 2)]
    return out


def _streams() -> list[bytes]:
    from keymgr.envelope import encrypt_stream

    kek, out = _kek(), []
    for size, length, context in ((16, 0, None), (16, 40, {"tenant": "acme"}), (64, 64, None), (32, 100, {"a": "b"})):
        dek = os.urandom(32)
        dst = io.BytesIO()
        encrypt_stream(io.BytesIO(bytes(range(256))[:length] * 1), dst, dek=dek,
                       recipient_infos=[kek.recipient(dek, "aes256_wrap_pad")], context=context, segment_size=size)
        out.append(dst.getvalue())
    return out


@cache
def _signer(name: str) -> tuple[Any, bytes]:
    """An EC P-256 key and keymgr's self-signed certificate for it."""
    from keymgr._certs import self_signed_certificate

    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_certificate(key.public_key(), name, _ecdsa(key), now=_NOW)
    return key, cert


def _ecdsa(key: Any) -> Callable[[bytes], bytes]:
    return lambda data: bytes(key.sign(data, ec.ECDSA(hashes.SHA256())))


def _custodian(name: str) -> Any:
    from keymgr._certs import spki_der
    from keymgr.custody.custodians import Custodian

    key, cert = _signer(name)
    return Custodian(name=name, kind="ec-p256", public_key_der=spki_der(key.public_key()), certificate_der=cert,
                     token_label=f"{name}-token", key_label="custody", key_id=os.urandom(16), added="2026-11-05")


def _backups() -> list[bytes]:
    from keymgr.custody.backup_file import BackupFile, BackupKey, ShareSlot, WrappedVersion
    from keymgr.custody.custodians import QuorumPolicy
    from keymgr.keyring.store import KeyRecord, KeyVersion

    version = KeyVersion(1, os.urandom(16), "active", "2026-11-05T12:00:00Z", (("active", "2026-11-05T12:00:00Z"),))
    record = KeyRecord(name="orders", profile="kw", primary=1, versions=(version,), created="2026-11-05T12:00:00Z")
    key = BackupKey(record, (WrappedVersion(1, os.urandom(40), os.urandom(40)),))
    slots = tuple(ShareSlot(_custodian(n), i + 1, os.urandom(32), os.urandom(120))
                  for i, n in enumerate(("alice", "bob")))
    backup = BackupFile(id=os.urandom(16), created="2026-11-05T12:00:00Z", source_token="keymgr-A", source_serial="1",
                        mechanism="aes-kw", quorum=QuorumPolicy(2, ("alice", "bob")), keys=(key,), shares=slots)
    return [BackupFile(**{**backup.__dict__, "mac": backup.compute_mac(bytes(32))}).to_bytes()]


def _requests() -> tuple[list[bytes], list[bytes]]:
    from keymgr._certs import spki_der
    from keymgr.custody.approvals import Approval, make_request

    token: Any = SimpleNamespace(label="keymgr-A", serial="0123456789")
    made = [make_request("destroy", token=token, key="orders", params={"versions": [1, 2]}, now=_NOW),
            make_request("backup", token=token, key="orders", params={"versions": None}, now=_NOW),
            make_request("set-policy", token=token, key=None, now=_NOW, ttl=timedelta(hours=2),
                         params={"scope": "*", "policy": {"threshold": 2, "custodians": ["alice", "bob"]}}),
            make_request("destroy", token=token, key="orders", params={"versions": [1]}, now=_NOW, shows={
                "quorum": {"threshold": 2, "custodians": [
                    {"name": n, "fingerprint": f * 32, "token": f"{n}-usb", "serial": "7"}
                    for n, f in (("alice", "11"), ("bob", "22"))]},
                "keys": [{"version": 1, "id": "ab" * 16, "kcv": "0a1b2c", "state": "decrypt-only"}]})]
    approvals = []
    for request in made:
        key, _ = _signer("alice")
        unsigned = Approval(request.digest, "alice", hashlib.sha256(spki_der(key.public_key())).hexdigest(),
                            "2026-11-05T12:30:00Z", b"")
        signature = key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        approvals.append(Approval(**{**unsigned.__dict__, "signature": signature}).to_bytes())
    return [r.to_bytes() for r in made], approvals


def _transcripts() -> list[bytes]:
    from keymgr.custody.transcript import TranscriptRecorder, custodian_signer, sign_transcript

    recorder = TranscriptRecorder("backup", "keymgr-A", "0123456789")
    recorder.participant("custodian", "alice", "ab" * 32)
    recorder.step("wrap", keys=1)
    recorder.key("orders", 1, bytes(16), "a1b2c3")
    signers = []
    for name in ("alice", "bob"):
        key, cert = _signer(name)
        signers.append(custodian_signer(name, cert, _ecdsa(key)))
    return [sign_transcript(recorder.finish("ok"), signers[:1]), sign_transcript(recorder.finish("ok"), signers)]


def _uris() -> list[bytes]:
    from keymgr.hsm.uri import Pkcs11Uri

    texts = ["pkcs11:",
             "pkcs11:token=keymgr-A;manufacturer=SoftHSM%20project;serial=0123;object=orders;type=secret-key",
             "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;id=%01%02%03?pin-value=1234&module-path=/usr/lib/x.so",
             "pkcs11:slot-id=3;library-manufacturer=Snake%20Oil,%20Inc.?pin-source=file:/etc/token_pin",
             "pkcs11:token=A?module-name=softhsm2&x-vendor=yes", "pkcs11:object=my-key;type=private?pin-source=env:PIN"]
    return [Pkcs11Uri.parse(t).format(include_secrets=True).encode() for t in texts] + [t.encode() for t in texts]


def _audit_lines() -> list[bytes]:
    from keymgr.audit import Actor, Entry

    actor = Actor("alice", 1000, 4242, "app1", "billing")
    out, prev = [], "0" * 64
    for seq, (op, outcome, error) in enumerate((("create", "ok", None), ("decrypt", "failed", "IntegrityError"),
                                                ("login", "refused", "PinIncorrectError")), start=1):
        entry = Entry(chain="ab" * 16, seq=seq, time="2026-11-05T12:00:00.123456Z", actor=actor, op=op,
                      key="orders" if seq != 3 else None, version=1 if seq != 3 else None, outcome=outcome,
                      error=error, prev=prev, detail={"count": seq, "profile": "kw"},
                      mac="cd" * 32 if seq != 3 else None)
        out.append(entry.line())
        prev = entry.digest()
    return out


@cache
def seeds() -> dict[str, tuple[bytes, ...]]:
    """Every fuzz target's seed inputs (made once per process)."""
    requests, approvals = _requests()
    return {"cms": tuple(_cms()), "stream": tuple(_streams()), "backup": tuple(_backups()),
            "request": tuple(requests), "approval": tuple(approvals), "transcript": tuple(_transcripts()),
            "uri": tuple(_uris()), "audit": tuple(_audit_lines())}


def write_corpus(target: str, directory: os.PathLike[str] | str) -> int:
    """Write ``target``'s seeds into ``directory`` (a libFuzzer corpus); returns how many."""
    from pathlib import Path

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for data in seeds()[target]:
        (path / f"seed-{hashlib.sha256(data).hexdigest()[:16]}").write_bytes(data)
    return len(seeds()[target])
