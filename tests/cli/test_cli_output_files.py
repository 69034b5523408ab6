"""``keymgr encrypt/decrypt -o``: what OUT is afterwards, what a kill leaves behind, how much
input a message may make keymgr hold, and how errors and interrupts end (issue 14, parts
"Output files" and "Errors pass through").

Mostly real processes (``python -m keymgr``): kills, signals and peak memory belong to a
process. The 200 MiB plaintext and its ciphertext are made once for the module. Device nodes
are made by the tests in their own directories (``mknod`` with /dev/null's numbers, 1:3);
the real /dev/null is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

import keymgr
from keymgr import errors
from keymgr.cli import cli
from keymgr.cli._common import EXIT_CODE_MEANINGS, EXIT_CODES
from keymgr.envelope.stream import MAGIC
from keymgr.files import TEMP_NAME, atomic_output, remove_abandoned_temp_files
from tests.cli.test_cli_crypt import EXIT_INTEGRITY, EXIT_USAGE, PREVIOUS, one_error_line
from tests.conftest import TokenUnderTest, softhsm_token

MiB = 1 << 20
BIG = 200 * MiB
EXIT_POLICY = 5
KILLS = 20
#: in every 64 KiB of the big plaintext, so any piece of it that leaked is found
MARKER = b"\x00KEYMGR-PLAINTEXT-MARKER-" + uuid.uuid4().hex.encode() + b"\x00"
NULL_DEVICE = os.makedev(1, 3)
#: a named temporary file from the start (what filesystems without O_TMPFILE get)
NAMED_TEMPS = {"KEYMGR_NO_O_TMPFILE": "1"}


def command(tok: TokenUnderTest, *args: str) -> list[str]:
    return [sys.executable, "-m", "keymgr", "--token", tok.uri(), *args]


def keymgr_run(tok: TokenUnderTest, *args: str, env: dict[str, str] | None = None,
               **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command(tok, *args), capture_output=True, timeout=300, check=False,  # type: ignore[call-overload]
                          env={**os.environ, **(env or {})}, **kwargs)


def keymgr_start(tok: TokenUnderTest, *args: str, env: dict[str, str] | None = None,
                 **kwargs: object) -> subprocess.Popen[bytes]:
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen(command(tok, *args), env={**os.environ, **(env or {})}, **streams)  # type: ignore[call-overload]


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def holding_plaintext(directory: Path, marker: bytes = MARKER) -> list[str]:
    """The regular files in ``directory`` (hidden ones too) holding any piece of the big plaintext."""
    found = []
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            continue
        with open(entry.path, "rb") as handle:
            tail = b""
            while chunk := handle.read(8 * MiB):
                if marker in tail + chunk:
                    found.append(entry.name)
                    break
                tail = chunk[-len(marker):]
    return sorted(found)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Big:
    """A 200 MiB plaintext (the marker in every 64 KiB) and its stream ciphertext, in a directory of their own."""

    tok: TokenUnderTest
    key: str
    plain: Path
    cipher: Path
    plain_sha256: str


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    tok = softhsm_token()
    key = f"out-{uuid.uuid4().hex[:10]}"
    with keymgr.KeyManager(tok.uri()) as km:
        km.create_key(key)
    where = tmp_path_factory.mktemp("big")
    block = bytearray(os.urandom(MiB))
    for offset in range(0, MiB, 64 * 1024):
        block[offset:offset + len(MARKER)] = MARKER
    plain = where / "plain"
    with open(plain, "wb") as handle:
        for _ in range(BIG // MiB):
            handle.write(block)
    cipher = where / "plain.kmg"
    proc = keymgr_run(tok, "encrypt", "--key", key, str(plain), "-o", str(cipher))
    assert proc.returncode == 0, proc.stderr
    yield Big(tok, key, plain, cipher, sha256_file(plain))
    plain.unlink()
    cipher.unlink()


@pytest.fixture
def small(big: Big, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small stream ciphertext of b"small" under the module's key, outside ``tmp_path``."""
    source = tmp_path_factory.mktemp("small") / "small"
    source.write_bytes(b"small")
    cipher = source.with_suffix(".kmg")
    assert keymgr_run(big.tok, "encrypt", "--key", big.key, str(source), "-o", str(cipher)).returncode == 0
    return cipher


# -- what OUT is afterwards -----------------------------------------------------------------


def make_null_device(path: Path) -> os.stat_result:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, NULL_DEVICE)
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD (root)")
    return os.lstat(path)


def still_the_device(path: Path, before: os.stat_result) -> None:
    after = os.lstat(path)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == NULL_DEVICE, "the device node was replaced"
    assert after.st_ino == before.st_ino


@pytest.mark.slow
def test_a_character_device_is_written_through(big: Big, small: Path, tmp_path: Path) -> None:
    node = tmp_path / "null"
    before = make_null_device(node)
    source = str(tmp_path / "in")
    (tmp_path / "in").write_bytes(b"to the bit bucket")
    for args in (("encrypt", "--key", big.key, source), ("encrypt", "--key", big.key, "--format", "message", source),
                 ("decrypt", str(small))):
        proc = keymgr_run(big.tok, *args, "-o", str(node))
        assert proc.returncode == 0, (args, proc.stderr)
        still_the_device(node, before)
    assert sorted(os.listdir(tmp_path)) == ["in", "null"]


class FifoReader:
    """Reads a FIFO to its end in a thread; ``close()`` unblocks a reader whose writer never came."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as fifo:
            self.data = fifo.read()

    def close(self) -> bytes:
        if self.thread.is_alive():
            with contextlib.suppress(OSError):  # no writer came: be one, so the reader sees EOF
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        return self.data


@pytest.mark.slow
def test_a_fifo_is_written_through_not_replaced(big: Big, small: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plaintext = os.urandom(3 * MiB + 7)
    (tmp_path / "in").write_bytes(plaintext)
    reader = FifoReader(fifo)
    try:
        proc = keymgr_run(big.tok, "encrypt", "--key", big.key, str(tmp_path / "in"), "-o", str(fifo))
    finally:
        blob = reader.close()
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert blob.startswith(MAGIC)
    proc = keymgr_run(big.tok, "decrypt", "-", "-o", "-", input=blob)
    assert proc.returncode == 0 and proc.stdout == plaintext
    reader = FifoReader(fifo)
    try:
        proc = keymgr_run(big.tok, "decrypt", str(small), "-o", str(fifo))
    finally:
        out = reader.close()
    assert proc.returncode == 0 and out == b"small" and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo", "in"]


@pytest.mark.slow
def test_a_symlink_is_refused_unless_followed(big: Big, small: Path, tmp_path: Path) -> None:
    target, link = tmp_path / "target", tmp_path / "link"
    target.write_bytes(PREVIOUS)
    link.symlink_to("target")
    (tmp_path / "in").write_bytes(b"through a link")
    for args in (("encrypt", "--key", big.key, str(tmp_path / "in")), ("decrypt", str(small))):
        proc = keymgr_run(big.tok, *args, "-o", str(link))
        assert proc.returncode == EXIT_USAGE, proc.stderr
        line = one_error_line(proc.stderr.decode())
        assert "symbolic link" in line and "--follow-symlinks" in line
        assert link.is_symlink() and os.readlink(link) == "target" and target.read_bytes() == PREVIOUS
    # followed: the target is replaced atomically (a new inode), the link stays a link
    inode = target.stat().st_ino
    proc = keymgr_run(big.tok, "encrypt", "--key", big.key, "--follow-symlinks", str(tmp_path / "in"), "-o", str(link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == "target" and target.stat().st_ino != inode
    assert keymgr_run(big.tok, "decrypt", str(target), "-o", "-").stdout == b"through a link"
    proc = keymgr_run(big.tok, "decrypt", "--follow-symlinks", str(small), "-o", str(link))
    assert proc.returncode == 0 and target.read_bytes() == b"small" and link.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # a dangling link's target is created; a link to a device writes through to the device
    (tmp_path / "dangling").symlink_to("created")
    proc = keymgr_run(big.tok, "decrypt", "--follow-symlinks", str(small), "-o", str(tmp_path / "dangling"))
    assert proc.returncode == 0 and (tmp_path / "created").read_bytes() == b"small"
    before = make_null_device(tmp_path / "null")
    (tmp_path / "to-null").symlink_to("null")
    proc = keymgr_run(big.tok, "decrypt", "--follow-symlinks", str(small), "-o", str(tmp_path / "to-null"))
    assert proc.returncode == 0, proc.stderr
    still_the_device(tmp_path / "null", before)
    assert (tmp_path / "to-null").is_symlink() and not temp_files(tmp_path)


# -- errors pass through --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stream", "message"])
def test_a_policy_refusal_is_the_policy_error_not_a_write_error(big: Big, softhsm: TokenUnderTest, key_name: str,
                                                                tmp_path: Path, fmt: str) -> None:
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name)
        km.suspend(key_name, 1)
    (tmp_path / "in").write_bytes(b"data")
    (tmp_path / "out").write_bytes(PREVIOUS)
    for out in (str(tmp_path / "out"), str(tmp_path / "new"), "-"):
        proc = keymgr_run(softhsm, "encrypt", "--key", key_name, "--format", fmt, str(tmp_path / "in"), "-o", out)
        assert proc.returncode == EXIT_POLICY, (out, proc.stderr)
        line = one_error_line(proc.stderr.decode())
        assert "suspended" in line and "cannot write" not in line, line
        assert proc.stdout == b""
    assert (tmp_path / "out").read_bytes() == PREVIOUS
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


@pytest.mark.parametrize("named", [False, True], ids=["o_tmpfile", "named"])
def test_atomic_output_passes_keymgr_errors_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               named: bool) -> None:
    if named:
        monkeypatch.setenv("KEYMGR_NO_O_TMPFILE", "1")
    target = tmp_path / "out"
    target.write_bytes(PREVIOUS)
    for raised, expected in ((errors.PolicyError("suspended"), errors.PolicyError),
                             (errors.StorageError("the audit log is full"), errors.StorageError),
                             (OSError(28, "No space left on device"), errors.StorageError),
                             (KeyboardInterrupt(), KeyboardInterrupt)):
        with pytest.raises(expected) as caught, atomic_output(target) as handle:
            handle.write(b"half")
            named_now = [name for name in os.listdir(tmp_path) if TEMP_NAME.match(name)]
            assert len(named_now) == int(named)  # with O_TMPFILE the data has no name until the rename
            raise raised
        if isinstance(raised, errors.KeymgrError):
            assert caught.value is raised  # itself, not "cannot write out: PolicyError"
        assert target.read_bytes() == PREVIOUS and os.listdir(tmp_path) == ["out"]
    with atomic_output(target, mode=0o600) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["out"]


def test_abandoned_temp_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / ".out.keymgr.abcd1234.tmp"
    alive = tmp_path / ".out.keymgr.efgh5678.tmp"
    rewrap = tmp_path / ".a.cms.keymgr-rewrap.123.ijkl9012.tmp"
    foreign = tmp_path / ".out.other.abcd1234.tmp"
    for path in (dead, alive, rewrap, foreign):
        path.write_bytes(b"left behind")
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)")
    writer = subprocess.Popen([sys.executable, "-c", code, str(alive)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"locked\n"
        assert remove_abandoned_temp_files(tmp_path) == 2
        assert sorted(os.listdir(tmp_path)) == sorted([alive.name, foreign.name])
    finally:
        writer.kill()
        writer.wait()


# -- kills ------------------------------------------------------------------------------------


class ThrowawayToken:
    """A SoftHSM token of its own (own configuration and token directory, own audit state), put
    back as it was before every run. SoftHSM rewrites token files in place (C_Login truncates and
    rewrites token.object; keymgr's runs update an object too), so a SIGKILL in those
    milliseconds breaks the token itself ("no token matches": it reads as uninitialised), which
    is SoftHSM's crash safety, not keymgr's output files: restoring it keeps this test about OUT."""

    def __init__(self, where: Path) -> None:
        self.where = where
        conf = where / "softhsm2.conf"
        (where / "tokens").mkdir(parents=True)
        conf.write_text(f"directories.tokendir = {where / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
        self.env = {"SOFTHSM2_CONF": str(conf), "XDG_STATE_HOME": str(where / "state")}
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "kills", "--so-pin", "5678", "--pin",
                        "1234"], check=True, capture_output=True, env={**os.environ, **self.env})
        self.tok = TokenUnderTest("softhsm", softhsm_token().module_path, "kills", "1234", "5678", self.env)
        self.run("key", "create", "k")
        shutil.copytree(where / "tokens", where / "pristine")

    def restore(self) -> None:
        shutil.rmtree(self.where / "tokens")
        shutil.copytree(self.where / "pristine", self.where / "tokens")

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        proc = keymgr_run(self.tok, *args, env={**self.env, **(env or {})})
        assert proc.returncode == 0, proc.stderr
        return proc

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.restore()
        return keymgr_start(self.tok, *args, env={**self.env, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("temps", ["o_tmpfile", "named"])
@pytest.mark.parametrize("cmd", ["encrypt", "decrypt"])
def test_sigkills_leave_no_temp_file_and_no_plaintext(big: Big, tmp_path: Path, cmd: str, temps: str) -> None:
    """20 SIGKILLs at random moments of a 200 MiB encrypt / decrypt: OUT is always the old file
    or the whole new one; after the next run only OUT is in its directory, and no file there but
    OUT (for decrypt) holds any of the plaintext. ``named``: temporary files with names from the
    start, as where the filesystem has no O_TMPFILE: the kills leave them, the next run removes them.
    Half the kills come at a random moment of the whole run, half at a random moment once the
    temporary file is open."""
    token = ThrowawayToken(tmp_path / "token")
    env = NAMED_TEMPS if temps == "named" else None
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    out = outdir / "out"
    if cmd == "encrypt":
        args: tuple[str, ...] = ("encrypt", "--key", "k", str(big.plain))
    else:
        token.run("encrypt", "--key", "k", str(big.plain), "-o", str(tmp_path / "cipher"))
        args = ("decrypt", str(tmp_path / "cipher"))
    started = time.monotonic()
    token.run(*args, "-o", str(out), env=env)
    duration = time.monotonic() - started
    full_size = out.stat().st_size
    out.write_bytes(PREVIOUS)
    rng = random.Random(f"{cmd}-{temps}")
    left, replaced, mid_write = 0, 0, 0
    for kill in range(KILLS):
        proc = token.start(*args, "-o", str(out), env=env)
        if kill % 2:  # a random moment of the whole run
            time.sleep(rng.uniform(0.05, duration))
        else:  # a random moment once the temporary file is open (named or not)
            started = time.monotonic()
            while not writing(proc.pid, outdir) and time.monotonic() - started < 3 * duration:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, duration / 3))
        mid_write += writing(proc.pid, outdir)
        proc.kill()
        proc.wait()
        left += bool(temp_files(outdir))
        size = out.stat().st_size
        assert size in (len(PREVIOUS), full_size), size  # the old file or the whole new one, never a part
        if size == full_size:
            replaced += 1
            out.write_bytes(PREVIOUS)
    assert mid_write >= KILLS // 4, f"only {mid_write} kills landed while OUT was being written"
    if temps == "named":
        assert left > 0, "no kill left a temporary file: the next run's cleanup was not tested"
    token.restore()
    token.run(*args, "-o", str(out), env=env)  # the next run
    assert os.listdir(outdir) == ["out"], os.listdir(outdir)
    if cmd == "decrypt":
        assert holding_plaintext(outdir) == ["out"] and sha256_file(out) == big.plain_sha256
    else:
        assert holding_plaintext(outdir) == [] and out.stat().st_size == full_size
        with open(out, "rb") as handle:
            assert handle.read(len(MAGIC)) == MAGIC
    print(f"{cmd}/{temps}: full run {duration:.2f} s; of {KILLS} kills {mid_write} came while the temporary file "
          f"was open, {replaced} after the rename; after {left} a temporary file was there")
    for name in ("out", "cipher"):
        with contextlib.suppress(FileNotFoundError):
            (outdir / name if name == "out" else tmp_path / name).unlink()


def writing(pid: int, directory: Path) -> bool:
    """Whether ``pid`` has a temporary file in ``directory`` open (an O_TMPFILE one reads as ``#N (deleted)``)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith(f"{directory}/") and link != f"{directory}/out" for link in links)


# -- bounded input ----------------------------------------------------------------------------


def run_measured(argv: Sequence[str], report: Path, feed: bytes | None = None) -> tuple[int, str, float, int]:
    """Run ``argv``; with ``feed``, stdin is ``feed`` followed by zeros without end. Returns the
    exit status, stderr, seconds and the peak RSS in KiB, from /usr/bin/time: a child forked by
    this (large) test process would count its pre-exec image in its own ru_maxrss."""
    if not os.access("/usr/bin/time", os.X_OK):
        pytest.skip("measuring peak RSS needs /usr/bin/time (Debian: apt install time)")
    started = time.monotonic()
    proc = subprocess.Popen(["/usr/bin/time", "-o", str(report), "-f", "%M", *argv],
                            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def endless() -> None:
        assert proc.stdin is not None
        zeros = bytes(MiB)
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            proc.stdin.write(feed or b"")
            while proc.poll() is None:
                proc.stdin.write(zeros)

    feeder = threading.Thread(target=endless, daemon=True) if feed is not None else None
    if feeder is not None:
        feeder.start()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    if feeder is not None:
        feeder.join(timeout=30)
    return code, err, time.monotonic() - started, int(report.read_text().split()[-1])


def sparse_file(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


def test_a_2gib_file_of_zeros_is_refused_at_once_in_little_memory(big: Big, tmp_path: Path) -> None:
    huge = sparse_file(tmp_path / "zeros", b"\x30", 2 << 30)
    report = tmp_path.parent / f"{tmp_path.name}.rss"
    code, err, seconds, rss_kib = run_measured(command(big.tok, "decrypt", str(huge), "-o", str(tmp_path / "out")),
                                               report)
    print(f"2 GiB of zeros from 0x30: exit {code} in {seconds:.2f} s, peak RSS {rss_kib / 1024:.1f} MiB")
    assert code == EXIT_INTEGRITY, err  # its outer length (2 bytes) is not its size: no message
    one_error_line(err)
    assert rss_kib < 100 * 1024 and seconds < 10
    assert sorted(os.listdir(tmp_path)) == ["zeros"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["file-announcing-2GiB", "stdin-announcing-2GiB", "stdin-8MiB-then-more",
                                  "stdin-indefinite", "encrypt-message-from-endless-stdin"])
def test_messages_are_read_in_bounded_memory(big: Big, tmp_path: Path, case: str) -> None:
    """A message whose length is right for its file but over the cap, endless stdin with any outer
    header, and an endless plaintext for ``--format message``: refused once past the cap (or the
    announced length), never read on, never a MemoryError."""
    out = str(tmp_path / "out")
    feed: bytes | None = None
    if case == "file-announcing-2GiB":  # its length matches its size: the cap refuses it
        size = 2 << 30
        huge = sparse_file(tmp_path / "huge", b"\x30\x84" + (size - 6).to_bytes(4, "big"), size)
        argv, expected = command(big.tok, "decrypt", str(huge), "-o", out), EXIT_USAGE
    elif case == "stdin-announcing-2GiB":
        feed, expected = b"\x30\x84\x7f\xff\xff\xf0", EXIT_USAGE
        argv = command(big.tok, "decrypt", "-", "-o", out)
    elif case == "stdin-8MiB-then-more":  # read as far as announced (+1): trailing data, no message
        feed, expected = b"\x30\x83\x80\x00\x00", EXIT_INTEGRITY
        argv = command(big.tok, "decrypt", "--max-message-size", "16M", "-", "-o", out)
    elif case == "stdin-indefinite":  # BER's indefinite length (openssl cms -stream): read up to the cap
        feed, expected = b"\x30\x80", EXIT_USAGE
        argv = command(big.tok, "decrypt", "--max-message-size", "16M", "-", "-o", out)
    else:
        feed, expected = b"", EXIT_USAGE
        argv = command(big.tok, "encrypt", "--key", big.key, "--format", "message", "--max-message-size", "32M",
                       "-", "-o", out)
    code, err, seconds, rss_kib = run_measured(argv, tmp_path.parent / f"{tmp_path.name}.rss", feed)
    print(f"{case}: exit {code} in {seconds:.2f} s, peak RSS {rss_kib / 1024:.1f} MiB")
    assert code == expected, err
    line = one_error_line(err)
    if expected == EXIT_USAGE:
        assert "--max-message-size" in line
    assert "MemoryError" not in err and rss_kib < 100 * 1024
    assert not (tmp_path / "out").exists() and not temp_files(tmp_path)


# -- interrupts ---------------------------------------------------------------------------------


def only_line(err: bytes, what: str) -> None:
    assert err.decode() == f"keymgr: {what}\n", err.decode()


@pytest.mark.slow
@pytest.mark.parametrize("temps", ["o_tmpfile", "named"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_decrypt_ends_in_one_line_and_leaves_nothing(big: Big, tmp_path: Path, signum: int,
                                                                    temps: str) -> None:
    """The signal arrives mid-stream (64 MiB of the ciphertext consumed from a pipe, the output
    half written): one line, death by the signal (the shell shows 130 / 143), OUT as it was, no
    temporary file (with named ones: there was one, and it is gone)."""
    env = NAMED_TEMPS if temps == "named" else None
    out = tmp_path / "out"
    out.write_bytes(PREVIOUS)
    proc = keymgr_start(big.tok, "decrypt", "-", "-o", str(out), env=env, stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    with open(big.cipher, "rb") as cipher:
        for _ in range(64):
            proc.stdin.write(cipher.read(MiB))  # a full pipe blocks: keymgr has read all but 64 KiB
        proc.stdin.flush()
    time.sleep(0.2)
    assert proc.poll() is None
    assert len(temp_files(tmp_path)) == (1 if temps == "named" else 0)
    proc.send_signal(signum)
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == -signum
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    only_line(err, "interrupted" if signum == signal.SIGINT else "terminated")
    assert os.listdir(tmp_path) == ["out"] and out.read_bytes() == PREVIOUS


def test_the_shell_sees_status_130(big: Big, tmp_path: Path) -> None:
    """Death by SIGINT is what the shell reports as 130 (and what stops a script's loop)."""
    script = f'{shlex.join(command(big.tok, "decrypt", "-", "-o", str(tmp_path / "out")))}; echo "status=$?"'
    shell = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert shell.stdin is not None and shell.stdout is not None and shell.stderr is not None
    child = wait_for_child(shell.pid)
    with open(big.cipher, "rb") as cipher:
        for _ in range(16):
            shell.stdin.write(cipher.read(MiB))  # consumed: keymgr is mid-stream
        shell.stdin.flush()
    os.kill(child, signal.SIGINT)
    out = shell.stdout.readline()  # bash's echo: keymgr is gone (its stdin stays open until then)
    shell.stdin.close()
    out, err = out + shell.stdout.read(), shell.stderr.read()
    shell.wait(timeout=60)
    assert out.decode().strip() == "status=130" and err.decode() == "keymgr: interrupted\n"
    assert os.listdir(tmp_path) == []


def wait_for_child(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.001)
    raise AssertionError("no child process appeared")


def wait_for_handlers(pid: int) -> None:
    """Until keymgr's first line ran (keymgr.interrupts.install: SIGTERM is caught, which Python
    alone never does). What comes before it is Python's own start-up (see keymgr.interrupts)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.0005)
    raise AssertionError("keymgr never set its signal handlers")


@pytest.mark.slow
def test_an_early_interrupt_has_no_traceback(big: Big, small: Path, tmp_path: Path) -> None:
    """SIGINT from keymgr's first line on (imports, argument parsing, token login, the decrypt,
    the shutdown): one line, never a traceback, never click's "Aborted!", no temporary file."""
    outcomes: dict[str, int] = {}
    for delay_ms in (0, 0, 0, 1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 450, 700):
        proc = keymgr_start(big.tok, "decrypt", str(small), "-o", str(tmp_path / "out"))
        assert proc.stderr is not None
        wait_for_handlers(proc.pid)
        time.sleep(delay_ms / 1000)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
        assert "Traceback" not in err.decode() and "Aborted" not in err.decode(), (delay_ms, err.decode())
        if code == 0:  # finished before the signal came (a signal during the shutdown is ignored)
            assert err == b""
        else:
            assert code == -signal.SIGINT and err == b"keymgr: interrupted\n", (delay_ms, code, err)
        # no OUT, or (the signal came after the rename) the whole of it; never a temporary file
        assert os.listdir(tmp_path) in ([], ["out"]), (delay_ms, os.listdir(tmp_path))
        if (tmp_path / "out").exists():
            assert (tmp_path / "out").read_bytes() == b"small"
            (tmp_path / "out").unlink()
        outcomes["done" if code == 0 else "interrupted"] = outcomes.get("done" if code == 0 else "interrupted", 0) + 1
    print(f"early interrupts: {outcomes}")
    assert outcomes.get("interrupted", 0) >= 10


def test_keyboard_interrupt_inside_a_command_is_exit_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (click's runner): the group turns an interrupt into one line and 130, where
    click alone prints "Aborted!" and exits 1."""
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("keymgr.cli.crypt.parse_context", interrupted)
    result = CliRunner().invoke(cli, ["encrypt", "--key", "k", "-", "-o", "-"], catch_exceptions=False)
    assert result.exit_code == 130 and result.stderr == "keymgr: interrupted\n"


def test_exit_codes_are_documented() -> None:
    result = CliRunner().invoke(cli, ["--help"], catch_exceptions=False)
    listed = {int(line.split()[0]) for line in result.stdout.split("Exit codes:")[1].splitlines() if line.strip()}
    assert {code for _, code in EXIT_CODES} | {0, 2, 130, 141, 143} <= listed
    assert listed == {code for code, _ in EXIT_CODE_MEANINGS}
    docs = (Path(__file__).resolve().parents[2] / "docs" / "getting-started.md").read_text()
    for code, _ in EXIT_CODE_MEANINGS:
        assert f"| {code} |" in docs, code


# -- every other -o of the CLI goes the same way (issue 14, the outside tester) ---------------------

@pytest.mark.leaves_objects("o-")  # the key pair token keygen writes, a name of this test's own
def test_every_cli_output_writes_devices_through_and_refuses_links(softhsm: TokenUnderTest, key_name: str,
                                                                  tmp_path: Path) -> None:
    """request -o, token keygen --out, backup -o: a device stays the same node (never a 0600 file of
    what was written), a symbolic link is neither replaced nor followed."""
    uri = softhsm.uri()
    assert CliRunner().invoke(cli, ["--token", uri, "key", "create", key_name]).exit_code == 0
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    outputs = {
        "request": lambda out: ["--token", uri, "request", "destroy", key_name, "--version", "1", "-o", out],
        "keygen": lambda out: ["token", "keygen", "--token", uri, "--type", "ec-p256", "--label",
                               f"o-{uuid.uuid4().hex[:8]}", "--out", out],
    }
    for what, args in outputs.items():
        node = tmp_path / f"{what}.dev"
        before = make_null_device(node)
        result = CliRunner().invoke(cli, args(str(node)))
        assert result.exit_code == 0, (what, result.output)
        still_the_device(node, before)
        link = tmp_path / f"{what}.link"
        link.symlink_to(victim)
        result = CliRunner().invoke(cli, args(str(link)))
        assert result.exit_code == 2 and "symbolic link" in result.stderr, (what, result.output)
        assert "--follow-symlinks" not in result.stderr, "an option these commands do not have"
        assert link.is_symlink() and victim.read_bytes() == b"keep me"
    link = tmp_path / "backup.link"
    link.symlink_to(victim)
    result = CliRunner().invoke(cli, ["--token", uri, "backup", key_name, "-o", str(link), "--so-pin-source", "env:X"],
                                env={"X": "0000"})
    assert result.exit_code == 2 and "symbolic link" in result.stderr  # before any PIN or approval
    assert link.is_symlink() and victim.read_bytes() == b"keep me"


# -- the console script: the same early signal handling as python -m keymgr (issue 14) -------------

#: imported first by the probed process (sitecustomize): records, when keymgr.cli is imported,
#: whether keymgr's signal handlers were set already
_IMPORT_PROBE = '''
import importlib.abc, os, signal, sys
class _Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "keymgr.cli":
            first = signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            with open(os.environ["KEYMGR_IMPORT_PROBE"], "a") as out:
                out.write("handlers-first\\n" if first else "cli-before-handlers\\n")
        return None
sys.meta_path.insert(0, _Probe())
'''


def _console_script() -> Path:
    script = Path(sys.executable).parent / "keymgr"
    if not script.is_file():
        pytest.skip(f"no console script installed beside {sys.executable} (pip install -e . makes it)")
    return script


def test_the_console_script_sets_the_signal_handlers_before_the_cli(tmp_path: Path) -> None:
    """``keymgr`` as pip installs it runs pyproject's entry point (keymgr.__main__:main), which sets
    the handlers before importing the CLI; a stale script (``from keymgr.cli import main``, from an
    older pyproject) imports it first, and an interrupt there is a traceback."""
    script = _console_script()
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    module, function = pyproject.split('\nkeymgr = "', 1)[1].split('"', 1)[0].split(":")
    assert f"from {module} import {function}" in script.read_text(), \
        f"{script} is stale (it does not run {module}:{function}): run scripts/setup.sh"
    (tmp_path / "sitecustomize.py").write_text(_IMPORT_PROBE)
    record = tmp_path / "probe"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])]),
           "KEYMGR_IMPORT_PROBE": str(record)}
    done = subprocess.run([str(script), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert record.read_text() == "handlers-first\n"


def test_the_console_script_ends_an_early_interrupt_in_one_line(small: Path, tmp_path: Path) -> None:
    """SIGINT as soon as the handlers are set (while the CLI is still being imported): status 130
    as the shell sees it (death by SIGINT), one line, no traceback."""
    script = _console_script()
    tok = softhsm_token()
    for _ in range(3):
        proc = subprocess.Popen([str(script), "--token", tok.uri(), "decrypt", str(small), "-o",
                                 str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert proc.stderr is not None
        wait_for_handlers(proc.pid)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
        assert code == -signal.SIGINT and err == b"keymgr: interrupted\n", (code, err)
        shell = subprocess.run(["bash", "-c", f"{shlex.quote(str(script))} --version >/dev/null & kill -INT $!; "
                                "wait $!; echo $?"], capture_output=True, text=True, timeout=60)
        assert shell.stdout.strip() in ("130", "0"), shell  # 0: done before the signal came


@pytest.mark.slow
def test_the_names_of_standard_output_write_to_it(softhsm: TokenUnderTest, key_name: str, tmp_path: Path) -> None:
    """``-o /dev/stdout`` (a link the kernel makes) is standard output, as ``-o -`` is: written
    where the shell's redirection points, appended there, never opened anew or truncated; an
    unopened descriptor is one line; any other link to a stream is still a link."""
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name)
    source = tmp_path / "in"
    source.write_bytes(b"to standard output")
    for name in ("/dev/stdout", "/proc/self/fd/1", "/dev/fd/1"):
        proc = keymgr_run(softhsm, "encrypt", "--key", key_name, str(source), "-o", name)
        assert proc.returncode == 0, proc.stderr
        back = keymgr_run(softhsm, "decrypt", "-", "-o", "-", input=proc.stdout)
        assert back.returncode == 0 and back.stdout == b"to standard output", (name, back.stderr)
    redirected = tmp_path / "appended"
    redirected.write_bytes(b"kept|")
    with open(redirected, "ab") as out:
        appended = subprocess.run(command(softhsm, "encrypt", "--key", key_name, str(source), "-o", "/dev/stdout"),
                                  stdout=out, stderr=subprocess.PIPE, timeout=300, check=False)
    assert appended.returncode == 0, appended.stderr
    written = redirected.read_bytes()
    assert written.startswith(b"kept|") and len(written) > 40
    back = keymgr_run(softhsm, "decrypt", "-", "-o", "/dev/stderr", input=written[5:])
    assert back.returncode == 0 and back.stderr == b"to standard output", back.stderr
    proc = keymgr_run(softhsm, "encrypt", "--key", key_name, str(source), "-o", "/dev/fd/57")
    assert proc.returncode == EXIT_USAGE and "descriptor 57 is not open" in one_error_line(proc.stderr.decode())
    (tmp_path / "link").symlink_to("/dev/stdout")
    proc = keymgr_run(softhsm, "encrypt", "--key", key_name, str(source), "-o", str(tmp_path / "link"))
    assert proc.returncode == EXIT_USAGE and "symbolic link" in one_error_line(proc.stderr.decode())
    assert proc.stdout == b""
