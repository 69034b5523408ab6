"""The parts of bench/envelope.py that run in child processes.

* **Streams** run in a fresh process per size, so that the RSS growth belongs
  to that stream alone: the resident set is sampled every 2 ms (psutil) while
  the stream runs, and the growth is the largest sample minus the RSS just
  before (without psutil: growth of ``ru_maxrss``, a high-water mark that
  startup may already have raised), in runs of their own: the rates come from
  runs without the sampler. The source is generated (a 1 MiB random
  block repeated) and timed encryption writes into a sink that keeps nothing;
  decryption reads a ciphertext written beforehand (untimed) to ``/dev/shm``
  where there is one (memory the process does not hold as RSS) into the same
  sink. Writing a GiB to a file, even on tmpfs, measures the kernel's page
  allocation more than anything here (three-fold swings between runs).
  Baselines in the same process:
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
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

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


def _binary(stream: io.RawIOBase) -> BinaryIO:
    """A raw stream where the API takes a binary file object (what it calls of one, it has)."""
    return cast(BinaryIO, stream)


def _seconds(fn: Any) -> float:
    """Seconds one call of ``fn`` takes (no sampler beside it: the same footing as the baselines)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed(fn: Any) -> tuple[float, float, float]:
    """(seconds, RSS growth in MiB while ``fn`` ran, RSS in MiB before) of one call. The sampler
    thread costs the call ~5 % (GIL hand-offs): rates come from :func:`_seconds` runs."""
    try:
        import psutil
    except ImportError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        return elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, before / 1024
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return elapsed, (peak[0] - base) / MIB, base / MIB


def _raw_io(size: int, path: Path) -> tuple[float, float]:
    """Seconds to encrypt a Pattern into a Sink, and to decrypt from ``path`` (written untimed)
    into a Sink: raw AESGCM, 1 MiB segments, the same I/O as keymgr's streams."""
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    plain, sealed = bytearray(SEGMENT), bytearray(SEGMENT + TAG)
    pv, sv = memoryview(plain), memoryview(sealed)

    def encrypt_to(out: Any) -> None:
        src = Pattern(size)
        while n := src.readinto(pv):
            aead.encrypt_into(nonce, pv[:n], b"", sv[:n + TAG])
            out.write(sv[:n + TAG])

    start = time.perf_counter()
    encrypt_to(Sink())
    encrypt = time.perf_counter() - start
    with path.open("wb") as out:
        encrypt_to(out)
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


def stream_child(uri: str, key: str, size: int, workdir: str, rounds: int = 3) -> dict[str, Any]:
    """MiB/s of keymgr and both baselines (medians of ``rounds`` interleaved rounds, and the
    medians of per-round ratios), and keymgr's RSS growth (the largest over the rounds)."""
    import statistics

    from bench._cases import manager

    km = manager(uri)
    where = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(workdir)
    path = where / f"keymgr-bench-{os.getpid()}.kmg"
    context = {"tenant": "acme"}
    km.encrypt(b"warm", key=key)  # login, keyring, key handle: not part of a stream's memory
    mib = size / MIB
    runs: dict[str, list[float]] = {name: [] for name in ("enc", "dec", "io_enc", "io_dec", "mem_enc", "mem_dec")}
    growth, baseline = [0.0, 0.0], 0.0
    try:
        for first in [True] + [False] * (rounds - 1):
            enc_s = _seconds(lambda: km.encrypt_stream(_binary(Pattern(size)), _binary(Sink()), key=key,
                                                       context=context))
            with path.open("wb") as out:  # the ciphertext to decrypt; memory sampled here
                _, enc_rss, before = _timed(lambda o=out: km.encrypt_stream(_binary(Pattern(size)), o, key=key,
                                                                            context=context))
            with path.open("rb") as fh:
                dec_s = _seconds(lambda f=fh: km.decrypt_stream(f, _binary(Sink()), context=context))
            dec_rss = growth[1]
            if first:  # one more decryption, for its memory
                with path.open("rb") as fh:
                    _, dec_rss, _ = _timed(lambda f=fh: km.decrypt_stream(f, _binary(Sink()), context=context))
                baseline = before
            io, mem = _raw_io(size, path), _raw_mem(size)
            for name, seconds in zip(runs, (enc_s, dec_s, *io, *mem), strict=True):
                runs[name].append(mib / seconds)
            growth = [max(growth[0], enc_rss), max(growth[1], dec_rss)]
    finally:
        path.unlink(missing_ok=True)

    def ratio(top: str, bottom: str) -> float:
        return statistics.median(a / b for a, b in zip(runs[top], runs[bottom], strict=True))

    med = {name: statistics.median(values) for name, values in runs.items()}
    return {"size_mib": mib, "keymgr": [med["enc"], med["dec"]], "raw_io": [med["io_enc"], med["io_dec"]],
            "raw_mem": [med["mem_enc"], med["mem_dec"]], "rss_growth_mib": growth, "rss_baseline_mib": baseline,
            "vs_io": [ratio("enc", "io_enc"), ratio("dec", "io_dec")],
            "vs_mem": [ratio("enc", "mem_enc"), ratio("dec", "mem_dec")]}


def messages_child(uri: str, key: str, seconds: float, start_at: float) -> dict[str, Any]:
    from bench._cases import manager

    km = manager(uri)
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
