"""Secret hygiene: no PIN, key byte, share or plaintext in any log, error, repr, audit entry or CLI output.

One module-scoped run drives every failure path keymgr has on a real SoftHSM
token whose PIN is distinctive (the ``hygiene`` token, its PIN changed here),
with every logger at DEBUG, an audit log with both a file and a ``logging``
sink, and the CLI run through click's runner. Secrets are known to the test:

* the PIN, and a wrong PIN that was tried;
* a KEK of known value (generated, wrapped out through the backup path:
  :func:`tests._known_keys.generated_known_key`) and every
  data key of every message and stream made under it (unwrapped on the host);
* the plaintexts (distinctive sentinels) and Shamir shares of a data key.

Each channel is then searched for each secret in every encoding a careless
message would use (raw bytes, hex either case, base64, Python's bytes repr),
whole and by 8-byte windows. :func:`test_the_scanner_finds_a_planted_leak` shows
the search finds what it looks for.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from keymgr import KeyManager, errors
from keymgr.audit import AuditLog
from keymgr.cli import cli
from keymgr.custody import shamir
from keymgr.envelope import parse_message, read_kek_recipient, read_stream_header
from keymgr.hsm import Pkcs11Uri, open_token
from keymgr.hsm.pins import Pin, pin_source_from_uri
from tests._internals import token_of
from tests._known_keys import generated_known_key
from tests.conftest import USER_PIN, softhsm_token
from tests.faults import injected

PIN = "hyg-" + secrets.token_hex(8)
WRONG_PIN = "wrong-" + secrets.token_hex(8)
LABEL = "hygiene"


@dataclass
class Observed:
    """Everything keymgr showed the outside world during the run, by channel."""

    secrets: dict[str, bytes] = field(default_factory=dict)
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    reprs: dict[str, str] = field(default_factory=dict)
    cli: list[tuple[str, int, str]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    audit: bytes = b""

    def secret(self, name: str, value: bytes | bytearray | str) -> None:
        self.secrets[name] = value.encode() if isinstance(value, str) else bytes(value)

    def fails(self, name: str, expected: type[BaseException], call: Callable[[], Any]) -> None:
        with pytest.raises(expected) as info:
            call()
        self.errors.append((name, info.value))


def forms(value: bytes) -> list[str | bytes]:
    """The ways ``value`` could show up: whole and as 8-byte windows, raw and encoded."""
    pieces = [value] + [value[i:i + 8] for i in range(0, max(len(value) - 7, 1))] if len(value) > 8 else [value]
    out: list[str | bytes] = []
    for piece in pieces:
        out += [piece, piece.hex(), piece.hex().upper(), repr(piece)[2:-1]]
        if piece is value:
            out.append(base64.b64encode(piece).decode())
            with contextlib.suppress(UnicodeDecodeError):
                out.append(piece.decode())
    return [f for f in out if len(f) >= 8]


def leaks(observed: Observed, haystack: str | bytes) -> list[str]:
    found = []
    text = haystack if isinstance(haystack, str) else haystack.decode("latin-1")
    for name, value in observed.secrets.items():
        for form in forms(value):
            needle = form if isinstance(form, str) else form.decode("latin-1")
            if needle in text:
                found.append(name)
                break
    return found


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything chained to it (__cause__ and __context__)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]


class _Capture(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record) + " " + repr(record.args) + " " + repr(record.__dict__))


def _uri(pin: str | None, *, token: str = LABEL, extra: str = "") -> str:
    tok = softhsm_token(token)
    query = f"module-path={tok.module_path}" + (f"&pin-value={pin}" if pin else "") + extra
    return f"pkcs11:token={token}?{query}"


def _set_distinctive_pin() -> None:
    ts = open_token(_uri(USER_PIN))
    ts.run("set the test PIN", lambda session: session.set_pin(USER_PIN, PIN))
    ts.close()  # logs the process out of this token: the wrong-PIN paths below really log in


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    obs = Observed()
    work = tmp_path_factory.mktemp("hygiene")
    handler = _Capture(obs.logs)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        _drive(obs, work)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    yield obs


def _cli(obs: Observed, name: str, *args: str, token: str | None = None) -> None:
    result = CliRunner().invoke(cli, ["--token", token or _uri(PIN), *args], catch_exceptions=False)
    obs.cli.append((name, result.exit_code, result.stdout + "\n" + result.stderr))


def _drive(obs: Observed, work: Path) -> None:
    _before_login(obs, work)
    audit_path = work / "audit.log"
    audit = AuditLog(audit_path, logger="keymgr.audit.hygiene", aggregate=())
    km = KeyManager(_uri(PIN), audit=audit)
    ts = token_of(km)
    _with_manager(obs, work, km, audit)
    km.close()
    audit.close()
    obs.audit = audit_path.read_bytes()
    ts.close()  # log out of this token only: the next user logs in afresh


def _before_login(obs: Observed, work: Path) -> None:
    """Wrong PINs (while this process is not logged in) and malformed URIs carrying a PIN."""
    obs.secret("PIN", PIN)
    obs.secret("wrong PIN", WRONG_PIN)
    _set_distinctive_pin()
    pin_file = work / "pin"
    pin_file.write_text(WRONG_PIN + "\n")
    pin_file.chmod(0o600)
    # -- wrong PIN, before this process logs in --------------------------------------------------
    obs.fails("wrong PIN", errors.PinIncorrectError, lambda: KeyManager(_uri(WRONG_PIN), audit=False))
    _cli(obs, "CLI wrong PIN (pin-source file)", "key", "list",
         token=_uri(None, extra=f"&pin-source=file:{pin_file}"))
    # -- bad URIs carrying a PIN ------------------------------------------------------------------
    bad = f"pkcs11:token={LABEL};bogus%zz?pin-value={PIN}"
    obs.fails("malformed URI", errors.UriError, lambda: Pkcs11Uri.parse(bad))
    obs.fails("KeyManager on a malformed URI", errors.UriError, lambda: KeyManager(bad, audit=False))
    obs.fails("no such token", errors.TokenNotFoundError, lambda: KeyManager(_uri(PIN, token="no-such-token")))
    _cli(obs, "CLI malformed URI", "key", "list", token=bad)
    obs.reprs["URI with a PIN"] = repr(Pkcs11Uri.parse(_uri(PIN))) + str(Pkcs11Uri.parse(_uri(PIN)))
    obs.reprs["PIN source"] = repr(pin_source_from_uri(None, PIN)) + repr(Pin(PIN))


def _with_manager(obs: Observed, work: Path, km: KeyManager, audit: AuditLog) -> None:
    """Every failure of data, keys and tokens, through the library and the CLI."""
    name = f"hyg-{secrets.token_hex(4)}"
    kek, _ = generated_known_key(km, name)
    obs.secret("known KEK", kek)
    km.create_key(f"{name}-gen")
    plain = b"PLAINTEXT-SENTINEL-" + secrets.token_hex(16).encode()
    obs.secret("plaintext", plain)
    ctx = {"tenant": "acme"}
    blob = km.encrypt(plain, key=name, context=ctx)
    ri = read_kek_recipient(parse_message(blob).recipient_infos[0])
    dek = aes_key_unwrap(kek, ri.encrypted_key)
    obs.secret("message data key", dek)
    stream = io.BytesIO()
    km.encrypt_stream(io.BytesIO(plain * 3000), stream, key=name, context=ctx)
    header = read_stream_header(io.BytesIO(stream.getvalue()))
    obs.secret("stream data key", aes_key_unwrap(kek, read_kek_recipient(header.recipient_infos[0]).encrypted_key))
    # -- the failure paths -----------------------------------------------------------------------
    tampered, wrapped_at = _flip(blob, len(blob) - 20), blob.index(ri.encrypted_key)
    obs.fails("tampered ciphertext", errors.IntegrityError, lambda: km.decrypt(tampered, context=ctx))
    obs.fails("tampered wrapped key", errors.IntegrityError,
              lambda: km.decrypt(_flip(blob, wrapped_at + 3), context=ctx))
    obs.fails("wrong context", errors.IntegrityError, lambda: km.decrypt(blob, context={"tenant": "evil"}))
    obs.fails("truncated message", errors.KeymgrError, lambda: km.decrypt(blob[:-7], context=ctx))
    obs.fails("truncated stream", errors.IntegrityError, lambda: km.decrypt_stream(
        io.BytesIO(stream.getvalue()[:-50]), io.BytesIO(), context=ctx))
    obs.fails("missing key", errors.KeyNotFoundError, lambda: km.encrypt(plain, key="no-such-key"))
    with KeyManager(softhsm_token("keymgr-B").uri(), audit=False) as other:
        foreign_name = f"hyg-{secrets.token_hex(4)}"
        other.create_key(foreign_name)
        foreign = other.encrypt(plain, key=foreign_name, context=ctx)
    obs.fails("key of another token", errors.KeyNotFoundError, lambda: km.decrypt(foreign, context=ctx))
    with injected() as faults:
        faults.add("removed", "wrap data key")
        obs.fails("token removed while a data key is in memory", errors.TokenRemovedError,
                  lambda: km.encrypt(plain, key=name, context=ctx))
        faults.add("device-error", "unwrap data key")
        obs.fails("device error during unwrap", errors.TokenError, lambda: km.decrypt(blob, context=ctx))
        faults.add("handle-invalid", "unwrap data key", times=2)
        obs.fails("session lost twice", errors.TokenError, lambda: km.decrypt(blob, context=ctx))
        # every HMAC of the create fails: the audit log's intent entry comes first and is written
        # unMACed (the next MAC covers it); the keyring cannot MAC its facts, and the create fails
        faults.add("host-memory", "compute HMAC", times=50)
        obs.fails("host memory in the keyring MAC", errors.TokenError, lambda: km.create_key(f"{name}-x"))
        faults.clear()
        src = work / "in.txt"
        src.write_bytes(plain)
        faults.add("removed", "wrap data key")
        _cli(obs, "CLI encrypt, token removed", "encrypt", "--key", name, str(src), "-o", str(work / "o1"))
    (work / "tampered.der").write_bytes(_flip(blob, len(blob) - 20))
    (work / "cut.kmg").write_bytes(stream.getvalue()[:-50])
    (work / "msg.der").write_bytes(blob)
    _cli(obs, "CLI decrypt tampered", "decrypt", "-c", "tenant=acme", str(work / "tampered.der"),
         "-o", str(work / "o2"))
    _cli(obs, "CLI decrypt truncated stream", "decrypt", "-c", "tenant=acme", str(work / "cut.kmg"),
         "-o", str(work / "o3"))
    _cli(obs, "CLI decrypt wrong context", "decrypt", "-c", "tenant=evil", str(work / "msg.der"),
         "-o", str(work / "o4"))
    _cli(obs, "CLI encrypt missing key", "encrypt", "--key", "no-such-key", str(src), "-o", str(work / "o5"))
    _cli(obs, "CLI key list", "key", "list", "--json")
    # -- shares ----------------------------------------------------------------------------------
    shares = shamir.split(dek, 2, 3)
    for share in shares:
        obs.secret(f"share {share.index}", bytes(share.value))
    bad_share = bytearray(shares[0].to_bytes())
    bad_share[2] ^= 0x40
    obs.fails("corrupted share", errors.FormatError, lambda: shamir.Share.from_bytes(bytes(bad_share)))
    obs.fails("too few shares", errors.PolicyError, lambda: shamir.combine(shares[:1], 2))
    obs.fails("a share twice", errors.PolicyError, lambda: shamir.combine([shares[0], shares[0]], 2))
    # -- reprs of the public objects -------------------------------------------------------------
    record = km.describe_key(name)
    obs.reprs.update({"KeyManager": repr(km), "TokenSession": repr(token_of(km)), "KeyRecord": repr(record),
                      "ParsedMessage": repr(parse_message(blob)), "StreamHeader": repr(header),
                      "shares": repr(shares) + str(shares[0]), "AuditLog": repr(audit)})
    from keymgr.envelope import DataKey

    obs.reprs["DataKey"] = repr(DataKey(dek)) + str(DataKey(dek))


# -- the verdicts, one channel each ------------------------------------------------------------------


def test_every_failure_path_failed_as_expected(observed: Observed) -> None:
    assert len(observed.errors) >= 17
    codes = {name: code for name, code, _ in observed.cli}
    assert all(code != 0 for name, code in codes.items() if name != "CLI key list"), codes
    assert codes["CLI key list"] == 0
    outputs = {name: output for name, _, output in observed.cli}
    assert "wrong PIN" in outputs["CLI wrong PIN (pin-source file)"]


def test_no_secret_in_exception_messages_or_their_chains(observed: Observed) -> None:
    for name, exc in observed.errors:
        for linked in chain(exc):
            text = f"{type(linked).__name__}: {linked} {linked!r} {linked.args!r}"
            assert not leaks(observed, text), (name, text)
        assert all(not isinstance(e, errors.KeymgrError) or "Traceback" not in str(e) for e in chain(exc))


def test_no_secret_in_log_records(observed: Observed) -> None:
    assert any("keymgr.audit.hygiene" in line for line in observed.logs)  # the logging sink was on
    for line in observed.logs:
        assert not leaks(observed, line), line


def test_no_secret_in_the_audit_log(observed: Observed) -> None:
    lines = observed.audit.splitlines()
    assert len(lines) >= 10 and b'"outcome":"failed"' in observed.audit
    assert not leaks(observed, observed.audit)


def test_no_secret_in_reprs(observed: Observed) -> None:
    for name, text in observed.reprs.items():
        assert not leaks(observed, text), (name, text)


def test_no_secret_in_cli_output(observed: Observed) -> None:
    for name, code, output in observed.cli:
        assert not leaks(observed, output), (name, output)
        if code:
            assert output.strip().splitlines()[-1].startswith("keymgr: error:") and "Traceback" not in output


def test_the_scanner_finds_a_planted_leak(observed: Observed) -> None:
    """The search is live: each secret, in each encoding, is found where it was planted."""
    for name, value in observed.secrets.items():
        for planted in (f"oops {value.hex()} oops", f"x{value[3:12]!r}", value[5:14]):
            assert name in leaks(observed, planted), (name, planted)
    assert not leaks(observed, "keymgr: error: the data failed authentication")
