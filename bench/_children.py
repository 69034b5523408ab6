"""The parts of bench/envelope.py that run in child processes.

* **Streams** run in a fresh process per size, so that the peak RSS growth
  (``ru_maxrss`` after the run minus before it) belongs to that stream alone.
  The source is generated (a 1 MiB random block repeated), the ciphertext goes to a
  file in the bench's temporary directory (page cache, not RSS), and decryption
  reads it back into a sink that keeps nothing. Baselines in the same process:
  ``raw mem``, ``cryptography`` AESGCM over 1 MiB segments already in memory
  (``encrypt_into`` / ``decrypt_into``, no I/O: the ceiling), and ``raw io``, the
  same segments with the same source, file and sink as keymgr.
* **Message throughput** runs in N processes started together, each with its
  own token session (processes are how keymgr scales: STACK-FACTS 1), doing
  encrypt + decrypt round trips of 1 KiB for a fixed time.
"""

from __future__ import annotations

import io
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MIB = 1024 * 1024
SEGMENT = MIB
TAG = 16


class Pattern(io.RawIOBase):
    """``size`` bytes made of one random MiB repeated: a source of any size in constant memory."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._block = memoryview(os.urandom(MIB))
        self._left = size
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = 0
        while n < len(view) and self._left:
            take = min(len(view) - n, MIB - self._at, self._left)
            view[n:n + take] = self._block[self._at:self._at + take]
            self._at = (self._at + take) % MIB
            self._left -= take
            n += take
        return n


class Sink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(memoryview(data))


def _peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _timed(fn: Any) -> tuple[float, int]:
    """(seconds, growth of the peak RSS in KiB) of one call."""
    before = _peak_rss_kib()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, _peak_rss_kib() - before


def _raw_io(size: int, path: Path) -> tuple[float, float]:
    """Seconds to encrypt a Pattern into ``path`` and decrypt it into a Sink, raw AESGCM, 1 MiB segments."""
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    plain, sealed = bytearray(SEGMENT), bytearray(SEGMENT + TAG)
    pv, sv = memoryview(plain), memoryview(sealed)
    src, start = Pattern(size), time.perf_counter()
    with path.open("wb") as out:
        while n := src.readinto(pv):
            aead.encrypt_into(nonce, pv[:n], b"", sv[:n + TAG])
            out.write(sv[:n + TAG])
    encrypt = time.perf_counter() - start
    start, sink = time.perf_counter(), Sink()
    with path.open("rb") as fh:
        while n := fh.readinto(sv):
            aead.decrypt_into(nonce, sv[:n], b"", pv[:n - TAG])
            sink.write(pv[:n - TAG])
    return encrypt, time.perf_counter() - start


def _raw_mem(size: int) -> tuple[float, float]:
    """Seconds for AESGCM over ``size`` bytes in 1 MiB segments already in memory (64 MiB, reused)."""
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    span = min(size, 64 * MIB)
    data = memoryview(bytearray(os.urandom(span)))
    sealed = memoryview(bytearray(span + span // SEGMENT * TAG))
    opened = memoryview(bytearray(span))
    rounds = size // span
    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(span // SEGMENT):
            aead.encrypt_into(nonce, data[i * SEGMENT:(i + 1) * SEGMENT], b"",
                              sealed[i * (SEGMENT + TAG):(i + 1) * (SEGMENT + TAG)])
    encrypt = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(span // SEGMENT):
            aead.decrypt_into(nonce, sealed[i * (SEGMENT + TAG):(i + 1) * (SEGMENT + TAG)], b"",
                              opened[i * SEGMENT:(i + 1) * SEGMENT])
    return encrypt, time.perf_counter() - start


def stream_child(uri: str, key: str, size: int, workdir: str) -> dict[str, Any]:
    import keymgr

    km = keymgr.KeyManager(uri)
    path = Path(workdir) / f"stream-{os.getpid()}.kmg"
    context = {"tenant": "acme"}
    km.encrypt_stream(Pattern(MIB), Sink(), key=key, context=context)  # warm: imports, key handle, buffers
    with path.open("wb") as out:
        enc_s, enc_rss = _timed(lambda: km.encrypt_stream(Pattern(size), out, key=key, context=context))
    with path.open("rb") as fh:
        dec_s, dec_rss = _timed(lambda: km.decrypt_stream(fh, Sink(), context=context))
    raw_io = _raw_io(size, path)
    path.unlink()
    raw_mem = _raw_mem(size)
    mib = size / MIB
    return {"size_mib": mib, "keymgr": [mib / enc_s, mib / dec_s], "rss_growth_mib": [enc_rss / 1024, dec_rss / 1024],
            "raw_io": [mib / raw_io[0], mib / raw_io[1]], "raw_mem": [mib / raw_mem[0], mib / raw_mem[1]]}


def messages_child(uri: str, key: str, seconds: float, start_at: float) -> dict[str, Any]:
    import keymgr

    km = keymgr.KeyManager(uri)
    message, context = os.urandom(1024), {"tenant": "acme"}
    for _ in range(50):  # warm: login, keyring, key handle
        km.decrypt(km.encrypt(message, key=key, context=context), context=context)
    time.sleep(max(0.0, start_at - time.time()))
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        km.decrypt(km.encrypt(message, key=key, context=context), context=context)
        count += 1
    return {"round_trips": count, "seconds": seconds}


def run_child(argv: list[str]) -> None:
    """``--child stream URI KEY SIZE WORKDIR`` or ``--child messages URI KEY SECONDS START_AT``: JSON on stdout."""
    kind, uri, key, *rest = argv
    if kind == "stream":
        result = stream_child(uri, key, int(rest[0]), rest[1])
    else:
        result = messages_child(uri, key, float(rest[0]), float(rest[1]))
    print(json.dumps(result))
