"""``keymgr encrypt`` / ``keymgr decrypt``: files and pipes under a key kept in the token.

::

    keymgr encrypt --key orders --context tenant=acme report.pdf -o report.pdf.kmg
    keymgr decrypt --context tenant=acme report.pdf.kmg -o report.pdf
    tar c dir | keymgr encrypt --key backups - -o - | ssh host 'cat > dir.tar.kmg'

Thin (STYLE.md 10): the library does the cryptography; this module picks
the format, moves bytes, and keeps the promises a command line must keep:

* **Formats.** Files are written in the stream format by default (any size,
  constant memory; docs/format.md, "Streams"); ``--format message`` writes
  one CMS message (the whole input in memory), and ``--compat-openssl`` the
  attribute-free message OpenSSL 3.0 reads (no context, no key commitment:
  weaker, documented). ``decrypt`` tells the two apart by their first bytes.
* **Nothing half-written.** A file named by ``-o`` is written to a temporary
  file beside it, fsync'ed and renamed into place (:func:`keymgr._files.atomic_output`);
  on any failure (tampered input, wrong context, full disk, Ctrl-C) the
  temporary file is removed and an existing OUT is left as it was. Standard
  output (``-o -``) cannot be taken back: a stream decrypted to a pipe may
  have passed on the segments verified before a bad one, never any
  unverified byte.
* **One line per error**, with the exit code of its category (keymgr.cli._common).
* **Progress** on a terminal (stderr) for inputs of 16 MiB and more.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import click

from keymgr import errors
from keymgr._files import atomic_output, os_error_reason
from keymgr.cli._common import CliState, pass_state

__all__ = ["encrypt_command", "decrypt_command", "parse_context", "register_crypt_commands", "STREAM_MAGIC"]

#: The first bytes of a keymgr stream (keymgr.envelope.stream.MAGIC, repeated here so that
#: ``keymgr --help`` does not import the envelope package).
STREAM_MAGIC = b"\x89KMG"
_DER_SEQUENCE = 0x30
#: Inputs at least this large get a progress bar when stderr is a terminal.
PROGRESS_THRESHOLD = 16 * 1024 * 1024
_READ_CHUNK = 1024 * 1024


def parse_context(pairs: tuple[str, ...]) -> dict[str, str] | None:
    """``("k=v", ...)`` from repeated ``--context`` options as a dict; None when there are none.

    A key given twice is refused rather than letting the last one win silently:
    the context is what a later ``decrypt`` must repeat exactly.
    """
    if not pairs:
        return None
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.ConfigurationError(f"--context takes KEY=VALUE, not {pair!r}")
        if key in context:
            raise errors.ConfigurationError(f"--context key {key!r} given twice")
        context[key] = value
    return context


class _Source(io.RawIOBase):
    """The input, read once front to back: a file or stdin, with a few bytes of look-ahead
    (to tell a stream from a message), read errors as keymgr errors, and progress."""

    def __init__(self, raw: BinaryIO, name: str, advance: Callable[[int], Any] | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._name = name
        self._pending = b""
        self._advance = advance

    def readable(self) -> bool:
        return True

    def peek_bytes(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer at the end of the input), left to be read again."""
        while len(self._pending) < count:
            chunk = self._call(self._raw.read, count - len(self._pending))
            if not chunk:
                break
            self._pending += chunk
        return self._pending[:count]

    def _call(self, fn: Callable[..., Any], arg: Any) -> Any:
        try:
            return fn(arg)
        except BlockingIOError:
            raise errors.ConfigurationError(f"{self._name} has no data yet (non-blocking?)") from None
        except OSError as exc:
            raise errors.ConfigurationError(f"cannot read {self._name}: {exc.strerror or type(exc).__name__}") from None

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
        else:
            readinto = getattr(self._raw, "readinto", None)
            if readinto is not None:
                got = self._call(readinto, view)
            else:
                chunk = self._call(self._raw.read, len(view))
                got = None if chunk is None else len(chunk)
                if got:
                    view[:got] = chunk
            if got is None:  # non-blocking and empty for now: never taken for the end of the input
                raise errors.ConfigurationError(f"{self._name} has no data yet (non-blocking?)")
            n = got
        if self._advance is not None and n:
            self._advance(n)
        return n

    def read_all(self) -> bytes:
        """Everything left, for the message format (which holds the whole input in memory)."""
        out = bytearray()
        buffer = bytearray(_READ_CHUNK)
        while n := self.readinto(buffer):
            out += memoryview(buffer)[:n]
        return bytes(out)


class _StdoutSink(io.RawIOBase):
    """Standard output, unbuffered, with write errors as keymgr errors. Unbuffered so that
    nothing is left to flush (and fail again, on a second line) when the process exits."""

    def __init__(self) -> None:
        super().__init__()
        self._stream = sys.stdout.buffer
        try:
            self._fd: int | None = self._stream.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self._fd = None  # click's test runner: an in-memory stream
        if self._fd is not None:
            self._stream.flush()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            if self._fd is None:
                self._stream.write(view)
                self._stream.flush()
                return len(view)
            written = 0
            while written < len(view):
                written += os.write(self._fd, view[written:])
            return written
        except BrokenPipeError:
            raise  # the reader went away: GuardedGroup exits quietly (141), as `cat` would
        except OSError as exc:
            raise errors.StorageError(f"cannot write to standard output: {os_error_reason(exc)}") from None


def _input_size(raw: BinaryIO) -> int | None:
    try:
        info = os.fstat(raw.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    import stat

    return info.st_size if stat.S_ISREG(info.st_mode) else None


@contextlib.contextmanager
def _progress(size: int | None, wanted: bool | None, label: str) -> Iterator[Callable[[int], Any] | None]:
    """A rich progress bar on stderr (auto: a terminal and a large input), or nothing."""
    show = wanted if wanted is not None else (size is not None and size >= PROGRESS_THRESHOLD
                                               and sys.stderr.isatty())
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    # --progress draws even where stderr is not a terminal (it was asked for)
    stderr = Console(file=sys.stderr, force_terminal=True if wanted else None)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=size)
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def _opened(path: str, *, progress: bool | None, label: str) -> Iterator[_Source]:
    if path == "-":
        raw: BinaryIO = sys.stdin.buffer
        name, closing = "standard input", False
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise errors.ConfigurationError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
        name, closing = path, True
    try:
        with _progress(_input_size(raw), progress, label) as advance:
            yield _Source(raw, name, advance)
    finally:
        if closing:
            raw.close()


@contextlib.contextmanager
def _output(path: str, *, mode: int) -> Iterator[BinaryIO]:
    """Standard output, or a file replaced atomically (nothing left behind on any failure)."""
    if path == "-":
        yield _StdoutSink()  # type: ignore[misc]
        return
    with atomic_output(_checked_output(path), mode=mode) as handle:
        yield handle


def _checked_output(path: str) -> Path:
    """OUT as a path, refused early (before the token is asked anything) if it cannot be a file."""
    target = Path(path)
    if path != "-" and target.is_dir():
        raise errors.ConfigurationError(f"cannot write {path}: it is a directory")
    return target


def _common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((
        click.option("--context", "-c", "context_items", multiple=True, metavar="KEY=VALUE",
                     help="Encryption context entry (repeatable); decrypt needs exactly the same entries."),
        click.option("-o", "--output", required=True, metavar="OUT", help="Output file, or - for standard output."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar on stderr (default: on a terminal, for inputs of 16 MiB or more)."),
        click.argument("input_path", metavar="IN"),
    )):
        command = option(command)
    return command


@click.command("encrypt")
@click.option("--key", "key", required=True, metavar="NAME", help="Named key whose primary version protects the data.")
@click.option("--format", "fmt", type=click.Choice(["stream", "message"]), default=None,
              help="stream (default: any size, constant memory) or message (one CMS message, held in memory).")
@click.option("--compat-openssl", is_flag=True,
              help="Write the attribute-free CMS message that `openssl cms -decrypt` reads: no context, "
                   "no key commitment (weaker; docs/format.md).")
@_common_options
@pass_state
def encrypt_command(state: CliState, key: str, fmt: str | None, compat_openssl: bool, context_items: tuple[str, ...],
                    output: str, progress: bool | None, input_path: str) -> None:
    """Encrypt IN (a file, or - for standard input) under key NAME into OUT."""
    context = parse_context(context_items)
    _checked_output(output)
    if compat_openssl:
        if fmt == "stream":
            raise errors.ConfigurationError("--compat-openssl writes a CMS message: OpenSSL cannot read streams")
        if context:
            raise errors.ConfigurationError("--compat-openssl messages carry no attributes, so no --context")
        fmt = "message"
    km = state.manager()
    km.describe_key(key)  # an unknown key fails before any output file exists
    with _opened(input_path, progress=progress, label="encrypting") as src, _output(output, mode=0o644) as dst:
        if fmt == "message":
            dst.write(km.encrypt(src.read_all(), key=key, context=context, compat_openssl=compat_openssl))
        else:
            km.encrypt_stream(src, dst, key=key, context=context)


@click.command("decrypt")
@_common_options
@pass_state
def decrypt_command(state: CliState, context_items: tuple[str, ...], output: str, progress: bool | None,
                    input_path: str) -> None:
    """Decrypt IN (a keymgr stream or CMS message; - for standard input) into OUT.

    OUT is created readable by its owner only (0600): it holds plaintext.
    """
    context = parse_context(context_items)
    _checked_output(output)
    km = state.manager()
    with _opened(input_path, progress=progress, label="decrypting") as src:
        head = src.peek_bytes(len(STREAM_MAGIC))
        if head == STREAM_MAGIC:
            with _output(output, mode=0o600) as dst:
                km.decrypt_stream(src, dst, context=context)
            return
        if not head or head[0] != _DER_SEQUENCE:
            raise errors.FormatError(f"{input_path if input_path != '-' else 'standard input'} is neither a "
                                     "keymgr stream nor a CMS message")
        plaintext = km.decrypt(src.read_all(), context=context)
        with _output(output, mode=0o600) as dst:
            dst.write(plaintext)


def register_crypt_commands(group: click.Group) -> None:
    """Add ``encrypt`` and ``decrypt`` to the ``keymgr`` group."""
    group.add_command(encrypt_command)
    group.add_command(decrypt_command)
