"""``keymgr encrypt`` / ``keymgr decrypt``: files and pipes under a key kept in the token.

::

    keymgr encrypt --key orders --context tenant=acme report.pdf -o report.pdf.kmg
    keymgr decrypt --context tenant=acme report.pdf.kmg -o report.pdf
    tar c dir | keymgr encrypt --key backups - -o - | ssh host 'cat > dir.tar.kmg'
    keymgr encrypt --recipient colleague.crt -c case=7 notes.txt -o notes.kmg   # no token: their public key

Thin (STYLE.md 10): the library does the cryptography; this module picks
the format, moves bytes, and keeps the promises a command line must keep:

* **Formats.** Files are written in the stream format by default (any size,
  constant memory; docs/format.md, "Streams"); ``--format message`` writes
  one CMS message (the whole input in memory), and ``--compat-openssl`` the
  attribute-free message OpenSSL 3.0 reads (no context, no key commitment:
  weaker, documented). ``decrypt`` tells the two apart by their first bytes.
* **Nothing half-written, nothing left behind.** A regular file named by ``-o``
  is written to a temporary file beside it (an unnamed ``O_TMPFILE`` where the
  filesystem has one, so a killed run leaves no plaintext), fsync'ed and
  renamed into place (:func:`keymgr.files.atomic_output`); on any failure
  (tampered input, wrong context, full disk, Ctrl-C) the temporary file is
  removed and an existing OUT is left as it was, and every run first removes
  what a killed writer left in OUT's directory. Standard output (``-o -``)
  cannot be taken back: a stream decrypted to a pipe may have passed on the
  segments verified before a bad one, never any unverified byte.
* **Devices, FIFOs and links stay what they are** (:mod:`keymgr.cli._output`, which every
  other command's output file goes through too). A character or block device,
  FIFO or socket named by ``-o`` is written through, like standard output
  (opened for writing, never truncated, never replaced). A symbolic link is
  refused unless ``--follow-symlinks`` is given; then its target is written
  (atomically if it is a regular file) and the link stays a link.
* **Bounded input.** A CMS message is decrypted in memory, so its outer DER
  length is read first and checked against the file's size and against
  ``--max-message-size`` (default 1 GiB, less where memory is short) before
  the rest is read: a huge or endless input is refused at once. Streams are
  read in constant memory and have no limit.
* **Public keys** (keymgr.cli._recipients): ``--recipient FILE`` encrypts to someone's key
  pair, with or without ``--key``; ``decrypt`` finds the token's key pair a message names.
* **One line per error**, with the exit code of its category (keymgr.cli._common).
* **Progress** on a terminal (stderr) for inputs of 16 MiB and more.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import click

from keymgr import errors
from keymgr.cli._common import CliState, pass_state
from keymgr.cli._output import checked_output, open_output
from keymgr.cli._recipients import load_recipients, recipient_options, use_key_pairs

__all__ = ["encrypt_command", "decrypt_command", "parse_context", "register_crypt_commands", "STREAM_MAGIC"]

#: The first bytes of a keymgr stream (keymgr.envelope.stream.MAGIC, repeated here so that
#: ``keymgr --help`` does not import the envelope package).
STREAM_MAGIC = b"\x89KMG"
_DER_SEQUENCE = 0x30
#: Inputs at least this large get a progress bar when stderr is a terminal.
PROGRESS_THRESHOLD = 16 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
#: The largest message read whole by default (keymgr.envelope.inspect.DEFAULT_MAX_MESSAGE_BYTES)
MAX_MESSAGE_SIZE = 1 << 30


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

    def __init__(self, raw: BinaryIO, name: str, advance: Callable[[int], Any] | None = None,
                 size: int | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._name = name
        self._pending = b""
        self._advance = advance
        #: bytes left in the input when it is a regular file, else None (a pipe, a terminal)
        self.size = size

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
            # readinto1: one read() per call. BufferedReader.readinto loops over a pipe in C, and
            # a signal that lands between two of its reads leaves it asleep in the next one, the
            # interrupt unhandled until more input comes (a Ctrl-C that does nothing)
            readinto = getattr(self._raw, "readinto1", None) or getattr(self._raw, "readinto", None)
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

    def read_all(self, limit: int) -> bytes:
        """Everything left, for the message format (which holds the whole input in memory);
        refused as soon as it passes ``limit`` bytes (before, for a file known to be larger)."""
        if self.size is not None and self.size > limit:
            raise _too_large(f"{self._name} ({self.size} bytes)", limit)
        out = bytearray()
        buffer = bytearray(_READ_CHUNK)
        while n := self.readinto(buffer):
            out += memoryview(buffer)[:n]
            if len(out) > limit:
                raise _too_large(self._name, limit)
        return bytes(out)


def _too_large(what: str, limit: int) -> errors.ConfigurationError:
    return errors.ConfigurationError(f"{what} is larger than --max-message-size ({limit} bytes) allows for a "
                                     "message held in memory; use the stream format, or raise the limit")


def _input_size(raw: BinaryIO) -> int | None:
    """The bytes left in a regular file (from where its descriptor stands: ``< file`` too); None otherwise."""
    try:
        fd = raw.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        return max(0, info.st_size - os.lseek(fd, 0, os.SEEK_CUR))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


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
        size = _input_size(raw)
        with _progress(size, progress, label) as advance:
            yield _Source(raw, name, advance, size)
    finally:
        if closing:
            raw.close()


class _ByteSize(click.ParamType):  # type: ignore[type-arg]
    """A size in bytes: ``1073741824``, ``512M``, ``1GiB`` (K, M, G are powers of 1024)."""

    name = "SIZE"
    _UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        found = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if found is None or int(found[1]) < 1:
            self.fail(f"{value!r} is not a size in bytes (e.g. 1073741824, 512M, 1GiB)", param, ctx)
        return int(found[1]) * self._UNITS[found[2].lower()]


def _available_memory() -> int | None:
    """Memory this process could still get: MemAvailable, within the cgroup's and RLIMIT_AS's room."""
    room: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as meminfo:
        room += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                              "memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            cap = Path("/sys/fs/cgroup", limit).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:
                room.append(int(cap) - int(Path("/sys/fs/cgroup", usage).read_text()))
    import resource

    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        room.append(soft)
    return max(0, min(room)) if room else None


def default_max_message_size() -> int:
    """1 GiB, or a fifth of :func:`_available_memory` where that is less: decrypting a message
    holds it, a copy while it is read, its parse and its plaintext (measured: a peak of about 4x
    its size, 862 MB for 200 MiB), so a message that passes the check also fits in memory."""
    available = _available_memory()
    return MAX_MESSAGE_SIZE if available is None else max(1 << 20, min(MAX_MESSAGE_SIZE, available // 5))


def _common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((
        click.option("--context", "-c", "context_items", multiple=True, metavar="KEY=VALUE",
                     help="Encryption context entry (repeatable); decrypt needs exactly the same entries."),
        click.option("-o", "--output", required=True, metavar="OUT",
                     help="Output file (replaced atomically), or - for standard output. A device, FIFO or "
                          "socket is written through, never replaced; a symbolic link is refused unless "
                          "--follow-symlinks."),
        click.option("--follow-symlinks", is_flag=True,
                     help="If OUT is a symbolic link, write to its target (atomically if that is a regular "
                          "file); the link stays. Without it a link is refused."),
        click.option("--max-message-size", type=_ByteSize(), default=None, metavar="SIZE",
                     help="Largest CMS message held in memory (decrypt: its announced length; encrypt "
                          "--format message: the input), e.g. 512M; default 1 GiB, or a fifth of the "
                          "available memory if less. Streams have no limit."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar on stderr (default: on a terminal, for inputs of 16 MiB or more)."),
        click.argument("input_path", metavar="IN"),
    )):
        command = option(command)
    return command


@click.command("encrypt")
@click.option("--key", "key", default=None, metavar="NAME",
              help="Named key whose primary version protects the data (and/or --recipient).")
@recipient_options
@click.option("--format", "fmt", type=click.Choice(["stream", "message"]), default=None,
              help="stream (default: any size, constant memory) or message (one CMS message, held in memory).")
@click.option("--compat-openssl", is_flag=True,
              help="Write the attribute-free CMS message that `openssl cms -decrypt` reads: no context, "
                   "no key commitment (weaker; docs/format.md).")
@_common_options
@pass_state
def encrypt_command(state: CliState, key: str | None, recipient_files: tuple[str, ...], oaep_hash: str | None,
                    fmt: str | None, compat_openssl: bool, context_items: tuple[str, ...],
                    output: str, follow_symlinks: bool, max_message_size: int | None, progress: bool | None,
                    input_path: str) -> None:
    """Encrypt IN (a file, or - for standard input) under key NAME and/or to the public keys of
    --recipient FILEs into OUT. With only --recipient no token is used (no PIN).

    A regular OUT is replaced atomically (a killed run leaves no temporary file behind); a device,
    FIFO or socket is written through and stays what it is; a symbolic link is refused unless
    --follow-symlinks.
    """
    context = parse_context(context_items)
    checked_output(output, follow_symlinks)
    if key is None and not recipient_files:
        raise errors.ConfigurationError("name a key (--key NAME), a public key (--recipient FILE), or both")
    recipients = load_recipients(recipient_files, oaep_hash)  # a bad file fails before any output exists
    if compat_openssl:
        if fmt == "stream":
            raise errors.ConfigurationError("--compat-openssl writes a CMS message: OpenSSL cannot read streams")
        if context:
            raise errors.ConfigurationError("--compat-openssl messages carry no attributes, so no --context")
        fmt = "message"
    km = None if key is None else state.manager()
    if km is not None:
        km.describe_key(key)  # an unknown key fails before any output file exists
    from keymgr.recipients.pubkey import encrypt_stream_to, encrypt_to

    with _opened(input_path, progress=progress, label="encrypting") as src, \
            open_output(output, mode=0o644, follow_symlinks=follow_symlinks) as dst:
        if fmt == "message":
            plaintext = src.read_all(max_message_size or default_max_message_size())
            dst.write(encrypt_to(plaintext, recipients, context=context, compat_openssl=compat_openssl) if km is None
                      else km.encrypt(plaintext, key=key, context=context, compat_openssl=compat_openssl,
                                      also_to=recipients))
        elif km is None:
            encrypt_stream_to(src, dst, recipients, context=context)  # type: ignore[arg-type]
        else:
            km.encrypt_stream(src, dst, key=key, context=context, also_to=recipients)


@click.command("decrypt")
@click.option("--with-key", "with_keys", multiple=True, metavar="URI",
              help="Also decrypt with this key pair (a pkcs11: URI with object= or id=, on any token; "
                   "repeatable). The token's own key pairs are found without it.")
@_common_options
@pass_state
def decrypt_command(state: CliState, with_keys: tuple[str, ...], context_items: tuple[str, ...], output: str,
                    follow_symlinks: bool, max_message_size: int | None, progress: bool | None,
                    input_path: str) -> None:
    """Decrypt IN (a keymgr stream or CMS message; - for standard input) into OUT, with a key of
    the token, or one of its key pairs that a recipient names (by key id or certificate).

    OUT is created readable by its owner only (0600): it holds plaintext. A killed run leaves no
    temporary file behind; devices, FIFOs and links are handled as by encrypt.
    """
    context = parse_context(context_items)
    checked_output(output, follow_symlinks)
    km = state.manager()
    use_key_pairs(km, with_keys)
    with _opened(input_path, progress=progress, label="decrypting") as src:
        head = src.peek_bytes(len(STREAM_MAGIC))
        if head == STREAM_MAGIC:
            with open_output(output, mode=0o600, follow_symlinks=follow_symlinks) as dst:
                km.decrypt_stream(src, dst, context=context)
            return
        if not head or head[0] != _DER_SEQUENCE:
            raise errors.FormatError(f"{input_path if input_path != '-' else 'standard input'} is neither a "
                                     "keymgr stream nor a CMS message")
        from keymgr.envelope.inspect import read_message

        try:
            blob = read_message(src, size=src.size, max_bytes=max_message_size or default_max_message_size(),
                                name=input_path if input_path != "-" else "standard input")
        except errors.FormatError:
            # framing no message has (announced length beyond the input, or short of it): refused by
            # the manager like every malformed ciphertext, one integrity error and an audit entry
            blob = b""
        plaintext = km.decrypt(blob, context=context)
        with open_output(output, mode=0o600, follow_symlinks=follow_symlinks) as dst:
            dst.write(plaintext)


def register_crypt_commands(group: click.Group) -> None:
    """Add ``encrypt`` and ``decrypt`` to the ``keymgr`` group."""
    group.add_command(encrypt_command)
    group.add_command(decrypt_command)
