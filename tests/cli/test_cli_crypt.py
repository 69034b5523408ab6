"""``keymgr encrypt`` / ``keymgr decrypt`` on the real token: click's runner and real processes.

What must hold whatever goes wrong: a non-zero exit with one line on stderr
naming the error's category, and no output file (an existing OUT untouched).
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import keymgr
from keymgr.cli import cli
from keymgr.cli.crypt import STREAM_MAGIC
from keymgr.envelope import parse_message, read_stream_header
from keymgr.envelope.stream import MAGIC
from tests.conftest import TokenUnderTest
from tests.recipients.test_envelope_token import algorithm_spans

EXIT_INTEGRITY, EXIT_FORMAT, EXIT_STORAGE, EXIT_NOT_FOUND, EXIT_USAGE = 4, 7, 8, 6, 2
CTX = ("--context", "tenant=acme", "--context", "purpose=test")
PREVIOUS = b"an older file that a failed run must leave alone"
SEGMENT = 1024 * 1024


def run(tok: TokenUnderTest, *args: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(cli, ["--token", tok.uri(), *args], input=stdin, catch_exceptions=False)
    return result.exit_code, result.stdout_bytes, result.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keymgr: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


def no_leftovers(directory: Path, *expected: str) -> None:
    """Only the files named are in ``directory``: no temporary file survived."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(expected)


@pytest.fixture
def key(softhsm: TokenUnderTest, key_name: str) -> str:
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name)
    return key_name


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [(), ("--format", "stream"), ("--format", "message")], ids=["default", "stream",
                                                                                          "message"])
def test_file_round_trip(softhsm: TokenUnderTest, key: str, tmp_path: Path, fmt: tuple[str, ...]) -> None:
    plaintext = os.urandom(300_000)
    (tmp_path / "in").write_bytes(plaintext)
    code, _, err = run(softhsm, "encrypt", "--key", key, *CTX, *fmt, str(tmp_path / "in"), "-o", str(tmp_path / "ct"))
    assert code == 0, err
    blob = (tmp_path / "ct").read_bytes()
    if fmt == ("--format", "message"):
        assert parse_message(blob).context == {"tenant": "acme", "purpose": "test"}
    else:  # files are streams unless asked otherwise
        assert blob.startswith(MAGIC)
    code, _, err = run(softhsm, "decrypt", *CTX, str(tmp_path / "ct"), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out").read_bytes() == plaintext
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600  # plaintext: owner only
    no_leftovers(tmp_path, "in", "ct", "out")


def test_pipes_both_ways(softhsm: TokenUnderTest, key: str) -> None:
    plaintext = os.urandom(3 * SEGMENT + 5)
    for fmt in ("stream", "message"):
        code, blob, err = run(softhsm, "encrypt", "--key", key, "--format", fmt, "-", "-o", "-", stdin=plaintext)
        assert code == 0 and blob[:4] == (MAGIC[:4] if fmt == "stream" else blob[:4]), err
        code, out, err = run(softhsm, "decrypt", "-", "-o", "-", stdin=blob)
        assert code == 0 and out == plaintext, err


def test_compat_openssl_message(softhsm: TokenUnderTest, key: str, tmp_path: Path, key_name: str) -> None:
    (tmp_path / "in").write_bytes(b"for openssl")
    code, _, err = run(softhsm, "encrypt", "--key", key, "--compat-openssl", str(tmp_path / "in"), "-o",
                       str(tmp_path / "ct"))
    assert code == 0, err
    assert parse_message((tmp_path / "ct").read_bytes()).auth_attrs is None
    for bad in (("--format", "stream"), CTX[:2]):
        code, _, err = run(softhsm, "encrypt", "--key", key, "--compat-openssl", *bad, str(tmp_path / "in"), "-o",
                           str(tmp_path / "bad"))
        assert code == EXIT_USAGE and "compat-openssl" in one_error_line(err)
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name + "-gcm", profile="gcm")
    code, _, err = run(softhsm, "encrypt", "--key", key_name + "-gcm", "--compat-openssl", str(tmp_path / "in"),
                       "-o", str(tmp_path / "bad"))
    assert code == EXIT_USAGE and "OpenSSL" in one_error_line(err)
    no_leftovers(tmp_path, "in", "ct")


def _failed_decrypt(tok: TokenUnderTest, tmp_path: Path, blob: bytes, *args: str) -> tuple[int, str]:
    """Decrypt ``blob`` over an existing OUT; the run must fail and leave OUT as it was."""
    (tmp_path / "bad").write_bytes(blob)
    (tmp_path / "out").write_bytes(PREVIOUS)
    code, _, err = run(tok, "decrypt", *args, str(tmp_path / "bad"), "-o", str(tmp_path / "out"))
    assert code != 0
    assert (tmp_path / "out").read_bytes() == PREVIOUS
    no_leftovers(tmp_path, "bad", "out")
    return code, one_error_line(err)


def recipient_span(blob: bytes, recipient: bytes) -> range:
    """Where the recipient sits in ``blob``: an edited one may name no key of this token."""
    return range(blob.index(recipient), blob.index(recipient) + len(recipient))


def integrity_failure(code: int, line: str, i: int, recipient: range) -> None:
    """Exit 4 with the integrity message; or, for an edited recipient only, exit 4 saying that
    no recipient is a key of this token (RecipientNotFoundError is an IntegrityError)."""
    assert code == EXIT_INTEGRITY, (i, line)
    assert "failed authentication" in line or (i in recipient and "none of the 1 recipients" in line), (i, line)


@pytest.mark.slow
def test_every_tampered_byte_of_a_message_fails_cleanly(softhsm: TokenUnderTest, key: str, tmp_path: Path) -> None:
    with keymgr.KeyManager(softhsm.uri()) as km:
        blob = km.encrypt(b"pay 100 to alice", key=key, context={"tenant": "acme", "purpose": "test"})
    parsed = parse_message(blob)
    key_id, content = recipient_span(blob, parsed.recipient_infos.der[0]), parsed.encrypted_content
    sealed = set(range(blob.index(content), blob.index(content) + len(content))) | set(range(len(blob) - 16, len(blob)))
    algorithms = algorithm_spans(blob)  # the content type's and content algorithm's OIDs
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        code, line = _failed_decrypt(softhsm, tmp_path, bytes(tampered), *CTX)
        if i == 0:  # no longer starts like either format: refused before it is read whole (7)
            assert code == EXIT_FORMAT and "neither a keymgr stream nor a CMS message" in line
            continue
        if code == EXIT_FORMAT and i in algorithms:  # a public field named: UnsupportedAlgorithmError
            assert "keymgr reads" in line, (i, line)
            continue
        integrity_failure(code, line, i, key_id)  # whatever the edit broke, the DER framing included
        if i in sealed:  # the ciphertext and the tag
            assert "failed authentication" in line, (i, line)
    for cut in range(1, len(blob)):
        code, line = _failed_decrypt(softhsm, tmp_path, blob[:cut], *CTX)
        assert code == EXIT_INTEGRITY and "failed authentication" in line, (cut, line)


@pytest.mark.slow
def test_tampered_or_truncated_stream_fails_cleanly(softhsm: TokenUnderTest, key: str, tmp_path: Path) -> None:
    plaintext = os.urandom(2 * SEGMENT + 1000)
    (tmp_path / "in").write_bytes(plaintext)
    assert run(softhsm, "encrypt", "--key", key, *CTX, str(tmp_path / "in"), "-o", str(tmp_path / "ct"))[0] == 0
    blob = (tmp_path / "ct").read_bytes()
    (tmp_path / "in").unlink()
    (tmp_path / "ct").unlink()
    header = read_stream_header(io.BytesIO(blob))
    header_len = len(header.raw)
    seg = SEGMENT + 16
    positions = set(range(header_len))  # every header byte
    for start in (header_len, header_len + seg, header_len + 2 * seg):
        positions |= {start, start + 1, start + 500, min(start + seg, len(blob)) - 1}  # each segment and tag
    key_id = recipient_span(blob, header.recipient_infos.der[0])
    for i in sorted(positions):
        tampered = bytearray(blob)
        tampered[i] ^= 0x80
        code, line = _failed_decrypt(softhsm, tmp_path, bytes(tampered), *CTX)
        if i < len(STREAM_MAGIC):  # no longer starts like either format: refused before it is read (7)
            assert code == EXIT_FORMAT and "neither a keymgr stream nor a CMS message" in line
            continue
        integrity_failure(code, line, i, key_id)
    # truncation anywhere after the header, at segment boundaries included, and appended bytes
    for cut in (header_len, header_len + 16, header_len + seg, header_len + 2 * seg, len(blob) - 1):
        code, line = _failed_decrypt(softhsm, tmp_path, blob[:cut], *CTX)
        assert code == EXIT_INTEGRITY and "failed authentication" in line, cut
    assert _failed_decrypt(softhsm, tmp_path, blob + b"\x00", *CTX)[0] == EXIT_INTEGRITY
    for cut in (len(MAGIC), header_len // 2, header_len - 1):  # inside the header
        assert _failed_decrypt(softhsm, tmp_path, blob[:cut], *CTX)[0] == EXIT_INTEGRITY


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stream", "message"])
def test_wrong_or_missing_context(softhsm: TokenUnderTest, key: str, tmp_path: Path, fmt: str) -> None:
    (tmp_path / "in").write_bytes(b"x" * 5000)
    assert run(softhsm, "encrypt", "--key", key, "--format", fmt, *CTX, str(tmp_path / "in"), "-o",
               str(tmp_path / "ct"))[0] == 0
    blob = (tmp_path / "ct").read_bytes()
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    for args in ((), ("--context", "tenant=acme"), ("--context", "tenant=evil", "--context", "purpose=test"),
                 (*CTX, "--context", "extra=1")):
        code, line = _failed_decrypt(softhsm, tmp_path, blob, *args)
        assert code == EXIT_INTEGRITY and "failed authentication" in line


def test_message_for_another_token_says_so(softhsm: TokenUnderTest, key: str, tmp_path: Path,
                                           key_name: str) -> None:
    other = TokenUnderTest(softhsm.kind, softhsm.module_path, "keymgr-B", softhsm.user_pin, softhsm.so_pin)
    with keymgr.KeyManager(other.uri()) as km_b:
        km_b.create_key(key_name + "-b")
        blob = km_b.encrypt(b"for site B", key=key_name + "-b")
    code, line = _failed_decrypt(softhsm, tmp_path, blob)
    assert code == EXIT_INTEGRITY and "none of the 1 recipients" in line and "another token" in line


def test_bad_arguments_are_one_line(softhsm: TokenUnderTest, key: str, tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"data")
    out = str(tmp_path / "out")
    cases = [
        (("encrypt", "--key", "no-such-key", str(tmp_path / "in"), "-o", out), EXIT_NOT_FOUND),
        (("encrypt", "--key", key, "--context", "novalue", str(tmp_path / "in"), "-o", out), EXIT_USAGE),
        (("encrypt", "--key", key, "-c", "a=1", "-c", "a=2", str(tmp_path / "in"), "-o", out), EXIT_USAGE),
        (("encrypt", "--key", key, str(tmp_path / "missing"), "-o", out), EXIT_USAGE),
        (("decrypt", str(tmp_path / "in"), "-o", out), EXIT_FORMAT),  # neither stream nor message
        (("decrypt", str(tmp_path / "in"), "-o", str(tmp_path)), EXIT_USAGE),  # a directory
    ]
    for args, expected in cases:
        code, _, err = run(softhsm, *args)
        assert code == expected, (args, err)
        one_error_line(err)
    no_leftovers(tmp_path, "in")


def test_progress_bar_when_asked(softhsm: TokenUnderTest, key: str, tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(bytes(2 * SEGMENT))
    code, _, err = run(softhsm, "encrypt", "--key", key, "--progress", str(tmp_path / "in"), "-o",
                       str(tmp_path / "ct"))
    assert code == 0 and "encrypting" in err
    code, _, err = run(softhsm, "decrypt", str(tmp_path / "ct"), "-o", str(tmp_path / "out"))
    assert code == 0 and err == ""  # not a terminal: no bar unless asked


# -- real processes ---------------------------------------------------------------


def keymgr_process(tok: TokenUnderTest, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.run([sys.executable, "-m", "keymgr", "--token", tok.uri(), *args], timeout=120,
                          check=False, **streams)  # type: ignore[call-overload]


@pytest.mark.slow
def test_process_tampered_stream_leaves_nothing(softhsm: TokenUnderTest, key: str, tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(os.urandom(100_000))
    assert keymgr_process(softhsm, "encrypt", "--key", key, *CTX, str(tmp_path / "in"), "-o",
                          str(tmp_path / "ct")).returncode == 0
    blob = bytearray((tmp_path / "ct").read_bytes())
    blob[-20] ^= 1
    (tmp_path / "ct").write_bytes(bytes(blob))
    proc = keymgr_process(softhsm, "decrypt", *CTX, str(tmp_path / "ct"), "-o", str(tmp_path / "out"))
    assert proc.returncode == EXIT_INTEGRITY
    assert "failed authentication" in one_error_line(proc.stderr.decode())
    no_leftovers(tmp_path, "in", "ct")
    proc = keymgr_process(softhsm, "decrypt", "--context", "tenant=acme", str(tmp_path / "ct"), "-o",
                          str(tmp_path / "out"))
    assert proc.returncode == EXIT_INTEGRITY and not (tmp_path / "out").exists()


@contextlib.contextmanager
def small_disk(tmp_path: Path, how: str) -> Iterator[tuple[Path, dict[str, object]]]:
    """A directory that fills up after 1 MiB: a real tmpfs (``how="tmpfs"``, needs root), or a
    file-size limit for the child (``"rlimit"``: RLIMIT_FSIZE, with SIGXFSZ ignored so that the
    write fails with EFBIG instead of killing the process)."""
    where = tmp_path / "small"
    where.mkdir()
    if how == "rlimit":
        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

        yield where, {"preexec_fn": limit}
        return
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the rlimit variant of this test covers the rest")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where, {}
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_full_disk_is_one_storage_error_and_no_partial_file(softhsm: TokenUnderTest, key: str, tmp_path: Path,
                                                            command: str, how: str) -> None:
    plaintext = os.urandom(3 * SEGMENT)
    (tmp_path / "in").write_bytes(plaintext)
    source = tmp_path / "in"
    if command == "decrypt":
        assert keymgr_process(softhsm, "encrypt", "--key", key, str(source), "-o", str(tmp_path / "ct")).returncode == 0
        source = tmp_path / "ct"
    args = ("--key", key) if command == "encrypt" else ()
    with small_disk(tmp_path, how) as (where, limits):
        (where / "out").write_bytes(PREVIOUS)
        proc = keymgr_process(softhsm, command, *args, str(source), "-o", str(where / "out"), **limits)
        assert proc.returncode == EXIT_STORAGE, proc.stderr
        line = one_error_line(proc.stderr.decode())
        assert "cannot write" in line and ("disk is full" if how == "tmpfs" else "too large") in line
        assert (where / "out").read_bytes() == PREVIOUS
        no_leftovers(where, "out")


@pytest.mark.slow
def test_stdout_on_a_full_device(softhsm: TokenUnderTest, key: str, tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (tmp_path / "in").write_bytes(os.urandom(200_000))
    with open("/dev/full", "wb") as full:
        proc = keymgr_process(softhsm, "encrypt", "--key", key, str(tmp_path / "in"), "-o", "-", stdout=full)
    assert proc.returncode == EXIT_STORAGE
    assert "standard output: the disk is full" in one_error_line(proc.stderr.decode())


@pytest.mark.slow
def test_progress_bar_on_a_terminal(softhsm: TokenUnderTest, key: str, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    (tmp_path / "in").write_bytes(bytes(40 * SEGMENT))
    child = pexpect.spawn(sys.executable, ["-m", "keymgr", "--token", softhsm.uri(), "encrypt", "--key", key,
                                           str(tmp_path / "in"), "-o", str(tmp_path / "ct")],
                          env=dict(os.environ, COLUMNS="100", TERM="xterm"), timeout=120)
    child.expect("encrypting")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "ct").stat().st_size > 40 * SEGMENT


def test_an_announced_length_over_the_limit_gets_the_limit_message(softhsm: TokenUnderTest, tmp_path: Path) -> None:
    """Issue 14: ``30 84 7f ff ff ff`` + zeros announces 2 GiB, more than --max-message-size and the file:
    the limit is what is said (exit 2), as for the indefinite ``30 80``; a length within the limit
    but beyond the file is a truncated message (integrity, exit 4)."""
    huge = tmp_path / "huge.cms"
    for head in (b"\x30\x84\x7f\xff\xff\xff", b"\x30\x80"):
        huge.write_bytes(head + bytes(2 * SEGMENT))  # 2 MiB: over the limit, far under what is announced
        code, _, err = run(softhsm, "decrypt", "--max-message-size", "1M", str(huge), "-o", str(tmp_path / "out"))
        assert code == EXIT_USAGE and "--max-message-size" in err.strip().splitlines()[-1], (head, err)
    short = tmp_path / "short.cms"
    short.write_bytes(b"\x30\x82\x10\x00" + bytes(64))  # 4 KiB announced, within 1M, 68 bytes there
    code, _, err = run(softhsm, "decrypt", "--max-message-size", "1M", str(short), "-o", str(tmp_path / "out"))
    assert code == EXIT_INTEGRITY, err
    assert not (tmp_path / "out").exists()
