"""One fuzz target per parser of untrusted bytes, shared by hypothesis (tests/security/test_fuzz_parsers.py)
and atheris (tests/fuzz/fuzz_targets.py).

A target feeds its bytes to the parser and goes as deep as the bytes allow
(a message is also decrypted with the seeds' known KEK; a stream is decrypted
segment by segment into memory; a URI is formatted and parsed again). The
contract under test: whatever the bytes, the only exceptions that escape are
keymgr's own (:class:`~keymgr.errors.KeymgrError`), which the target
swallows; anything else (``KeyError``, ``IndexError``, ``RecursionError``,
``MemoryError`` ...) propagates and is a finding.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

from keymgr import errors
from keymgr.audit import parse_line
from keymgr.custody.approvals import Approval, Request
from keymgr.custody.backup_file import BackupFile
from keymgr.custody.transcript import verify_transcript
from keymgr.envelope import decrypt_stream, open_message, parse_message, read_stream_header
from keymgr.hsm.uri import Pkcs11Uri
from tests._softkek import SoftKek
from tests.fuzz.seeds import SEED_KEK

__all__ = ["TARGETS", "run_target"]


def _kek() -> SoftKek:
    return SoftKek(kek=SEED_KEK)


def cms_message(data: bytes) -> None:
    parse_message(data)
    open_message(data, unwrap=_kek().unwrap, context=None, return_context=True)


def stream(data: bytes) -> None:
    src = io.BytesIO(data)
    header = read_stream_header(src)
    decrypt_stream(src, io.BytesIO(), unwrap=_kek().unwrap, context=header.context, header=header)


def backup_file(data: bytes) -> None:
    backup = BackupFile.parse(data)
    backup.describe()
    for slot in backup.shares:
        backup.share_context(slot)
    backup.verify_mac(bytes(32))


def request(data: bytes) -> None:
    parsed = Request.parse(data)
    parsed.describe()
    assert Request.parse(parsed.to_bytes()) == parsed  # what it reads, it writes back the same


def approval(data: bytes) -> None:
    parsed = Approval.parse(data)
    assert Approval.parse(parsed.to_bytes()) == parsed


def transcript(data: bytes) -> None:
    verify_transcript(data)


def uri(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    parsed = Pkcs11Uri.parse(text)
    again = Pkcs11Uri.parse(parsed.format(include_secrets=True))
    assert again == parsed, (parsed, again)
    parsed.redacted()
    parsed.matches_token(label="a", manufacturer="b", serial="c", model="d")


def audit_line(data: bytes) -> None:
    entry = parse_line(data)
    assert parse_line(entry.line()) == entry


TARGETS: dict[str, Callable[[bytes], None]] = {
    "cms": cms_message,
    "stream": stream,
    "backup": backup_file,
    "request": request,
    "approval": approval,
    "transcript": transcript,
    "uri": uri,
    "audit": audit_line,
}


def run_target(name: str, data: bytes) -> None:
    """Run one target on ``data``; keymgr's own errors are the expected outcome, anything else escapes."""
    with contextlib.suppress(errors.KeymgrError):
        TARGETS[name](data)
