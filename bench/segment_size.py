"""Choose the stream segment size by measurement (not a test).

Run: ``python bench/segment_size.py [--mib 64] [--rounds 9]``

For each candidate segment size, in one process and one run, on the same
random input, it times:

- ``raw mem``: ``cryptography`` AESGCM ``encrypt_into`` / ``decrypt_into``
  over data already in memory, one call per segment into a preallocated
  buffer: the upper bound, no I/O at all;
- ``raw io``: the same job as keymgr's done plainly with raw AESGCM: ``read``
  a segment from the source, ``encrypt`` / ``decrypt`` it, ``write`` it;
- ``keymgr``: ``encrypt_stream`` / ``decrypt_stream``.

Sources are ``io.BytesIO`` and sinks discard, so the numbers hold CPU and
memory work only. Rounds interleave the variants and each ratio is the
median of per-round ratios, because a shared 2-vCPU VM drifts by 20-30 %
within a minute. Results are recorded in docs/format.md ("Segment size").
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asn1crypto import cms  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap  # noqa: E402

from keymgr.envelope import (  # noqa: E402
    Unwrap,
    decrypt_stream,
    encrypt_stream,
    kek_recipient_info,
    read_kek_recipient,
)
from keymgr.envelope.stream import DEFAULT_SEGMENT_SIZE  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
CANDIDATES = (16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)
Job = Callable[[], object]


class Sink(io.RawIOBase):
    """A writable that keeps nothing."""

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:  # type: ignore[override]
        return len(b)  # type: ignore[arg-type]


SINK = cast(BinaryIO, Sink())


def raw_jobs(key: bytes, data: bytes, segment: int) -> dict[str, Job]:
    aead = AESGCM(key)
    src = memoryview(data)
    nonce = os.urandom(12)
    out = memoryview(bytearray(segment + 16))
    plain = memoryview(bytearray(segment))
    sealed = [aead.encrypt(nonce, bytes(src[off:off + segment]), b"") for off in range(0, len(src), segment)]
    sealed_blob = b"".join(sealed)

    def mem_enc() -> None:
        for off in range(0, len(src), segment):
            chunk = src[off:off + segment]
            aead.encrypt_into(nonce, chunk, b"", out[:len(chunk) + 16])

    def mem_dec() -> None:
        for ct in sealed:
            aead.decrypt_into(nonce, ct, b"", plain[:len(ct) - 16])

    def io_enc() -> None:
        reader, sink = io.BytesIO(data), SINK
        while chunk := reader.read(segment):
            sink.write(aead.encrypt(nonce, chunk, b""))

    def io_dec() -> None:
        reader, sink = io.BytesIO(sealed_blob), SINK
        while chunk := reader.read(segment + 16):
            sink.write(aead.decrypt(nonce, chunk, b""))

    return {"raw mem enc": mem_enc, "raw mem dec": mem_dec, "raw io enc": io_enc, "raw io dec": io_dec}


def keymgr_encrypt(data: bytes, key: bytes, ri: cms.RecipientInfo, segment: int) -> None:
    encrypt_stream(io.BytesIO(data), SINK, dek=key, recipient_infos=[ri], context=None, segment_size=segment)


def keymgr_decrypt(blob: bytes, unwrap: Unwrap) -> None:
    decrypt_stream(io.BytesIO(blob), SINK, unwrap=unwrap, context=None)


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure stream throughput per segment size.")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    size = args.mib * MIB
    data = os.urandom(size)
    key, kek = os.urandom(32), os.urandom(32)
    ri = kek_recipient_info(b"bench", aes_key_wrap(kek, key), "aes256_wrap")

    def unwrap(r: cms.RecipientInfo) -> bytes:
        return aes_key_unwrap(kek, read_kek_recipient(r).encrypted_key)

    jobs: dict[tuple[int, str], Job] = {}
    for segment in CANDIDATES:
        for name, job in raw_jobs(key, data, segment).items():
            jobs[segment, name] = job
        stream = io.BytesIO()
        encrypt_stream(io.BytesIO(data), stream, dek=key, recipient_infos=[ri], context=None, segment_size=segment)
        jobs[segment, "keymgr enc"] = partial(keymgr_encrypt, data, key, ri, segment)
        jobs[segment, "keymgr dec"] = partial(keymgr_decrypt, stream.getvalue(), unwrap)
    times: dict[tuple[int, str], list[float]] = {k: [] for k in jobs}
    for _ in range(args.rounds):
        for k, job in jobs.items():
            start = time.perf_counter()
            job()
            times[k].append(time.perf_counter() - start)

    def rate(segment: int, name: str) -> float:
        return size / MIB / statistics.median(times[segment, name])

    def ratio(segment: int, name: str, base_segment: int, base: str) -> float:
        return statistics.median(b / t for t, b in zip(times[segment, name], times[base_segment, base], strict=True))

    ref = DEFAULT_SEGMENT_SIZE
    print(f"{args.mib} MiB, MiB/s (median of {args.rounds} interleaved rounds); ratios are per-round medians")
    print(f"{'segment':>9} {'raw mem':>13} {'raw io':>13} {'keymgr':>13} {'keymgr/raw io':>14}"
          f" {'keymgr/raw mem':>15} {'vs raw mem@1M':>14}")
    print(f"{'':>9} {'enc / dec':>13} {'enc / dec':>13} {'enc / dec':>13} {'enc / dec':>14} {'enc / dec':>15}"
          f" {'enc / dec':>14}")
    for s in CANDIDATES:
        cells = [f"{rate(s, f'{v} enc'):,.0f} / {rate(s, f'{v} dec'):,.0f}" for v in ("raw mem", "raw io", "keymgr")]
        cells += [f"{ratio(s, 'keymgr enc', s, f'{b} enc'):.2f} / {ratio(s, 'keymgr dec', s, f'{b} dec'):.2f}"
                  for b in ("raw io", "raw mem")]
        enc, dec = ratio(s, "keymgr enc", ref, "raw mem enc"), ratio(s, "keymgr dec", ref, "raw mem dec")
        cells.append(f"{enc:.2f} / {dec:.2f}")
        mark = "  <- default" if s == DEFAULT_SEGMENT_SIZE else ""
        print(f"{s // KIB:>6} KiB {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {cells[3]:>14} {cells[4]:>15}"
              f" {cells[5]:>14}{mark}")


if __name__ == "__main__":
    main()
