"""Regenerate kat.json with an independent, table-based GF(2^8) (see README.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

EXP = [0] * 512
LOG = [0] * 256
x = 1
for i in range(255):
    EXP[i] = x
    LOG[x] = i
    # multiply by the generator 3 = x + 1
    x ^= (x << 1) ^ (0x11B if x & 0x80 else 0)
    x &= 0xFF
for i in range(255, 512):
    EXP[i] = EXP[i - 255]


def mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else EXP[LOG[a] + LOG[b]]


def coefficients(seed: bytes, count: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < count:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:count]


def main() -> None:
    cases = []
    for m, n, secret in [(2, 3, b"\x00"), (2, 3, b"keymgr"), (3, 5, bytes(range(32))), (5, 5, b"\xff" * 17),
                         (2, 255, b"Z"), (4, 7, bytes(range(255, 191, -1)))]:
        seed = f"{m}-{n}-{secret.hex()}".encode()
        coeffs = coefficients(seed, (m - 1) * len(secret))
        shares = []
        for xi in range(1, n + 1):
            value = bytearray()
            for pos, byte in enumerate(secret):
                poly = [byte, *coeffs[pos * (m - 1):(pos + 1) * (m - 1)]]
                y, power = 0, 1
                for c in poly:
                    y ^= mul(c, power)
                    power = mul(power, xi)
                value.append(y)
            shares.append({"index": xi, "value": value.hex()})
        cases.append({"m": m, "n": n, "secret": secret.hex(), "coefficients": coeffs.hex(), "shares": shares})
    Path(__file__).with_name("kat.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
