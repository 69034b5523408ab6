"""Shamir secret sharing over GF(2^8), byte by byte.

Why our own (docs/shamir.md): pycryptodome's ``Shamir`` shares only 16-byte
secrets over GF(2^128) and would add a dependency for ~100 lines; the
``shamir`` package on PyPI is unmaintained since 2017. GF(2^8) with the AES
polynomial x^8+x^4+x^3+x+1 (0x11B) is the field of SLIP-0039 and HashiCorp
Vault's unseal keys, shares are as long as the secret, and up to 255 shares.

Side channels: field multiplication is shift-and-add with arithmetic masks
(no branch and no table index depends on a secret byte), and inversion is
exponentiation a^254 (no table). Python integers are not constant time at
the machine level, so this is "no secret-dependent control flow or memory
access in our code", not a guarantee about the interpreter.

Plain Shamir cannot tell a wrong share from a right one: any M shares
interpolate to *some* secret. :func:`share_commitment` gives each share a
domain-separated SHA-256 commitment; the backup format stores the list of
commitments under a signature/MAC, so a corrupted share is named by its
custodian before interpolation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from keymgr import errors
from keymgr._memory import zero

__all__ = ["Share", "split", "combine", "share_commitment", "verify_share", "gf_mul", "gf_inv"]

_FORMAT = 1
MAX_SECRET = 1024


def gf_mul(a: int, b: int) -> int:
    """Multiply in GF(2^8) mod 0x11B, with no branch or table lookup on the operands."""
    result = 0
    for _ in range(8):
        result ^= a & -(b & 1)
        carry = -((a >> 7) & 1)
        a = ((a << 1) ^ (0x11B & carry)) & 0xFF
        b >>= 1
    return result


def gf_inv(a: int) -> int:
    """Multiplicative inverse as a^254 (Fermat); 0 maps to 0 (never used for 0)."""
    result = 1
    base = a
    exponent = 254
    for _ in range(8):
        result = gf_mul(result, base) if exponent & 1 else gf_mul(result, 1)
        base = gf_mul(base, base)
        exponent >>= 1
    return result


@dataclass(frozen=True)
class Share:
    """One share: x-coordinate ``index`` (1..255) and the y-values, one per secret byte."""

    index: int
    value: bytearray = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", bytearray(self.value))
        if not 1 <= self.index <= 255:
            raise errors.FormatError("a share index must be 1..255")
        if not 1 <= len(self.value) <= MAX_SECRET:
            raise errors.FormatError("a share value must be 1..1024 bytes")

    def __repr__(self) -> str:
        return f"Share(index={self.index}, length={len(self.value)})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("shares cannot be pickled")

    def wipe(self) -> None:
        """Zero the share's value in place (the share is useless afterwards)."""
        zero(self.value)

    def to_bytes(self) -> bytes:
        """version (1) || index (1) || length (2, big-endian) || value."""
        return bytes((_FORMAT, self.index)) + len(self.value).to_bytes(2, "big") + bytes(self.value)

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        data = bytes(data)
        if len(data) < 5 or data[0] != _FORMAT:
            raise errors.FormatError("not a keymgr share")
        length = int.from_bytes(data[2:4], "big")
        if len(data) != 4 + length:
            raise errors.FormatError("a share's length does not match its header")
        return cls(data[1], bytearray(data[4:]))


def _check_threshold(m: int, n: int) -> None:
    if not (isinstance(m, int) and isinstance(n, int)):
        raise errors.ConfigurationError("quorum sizes must be integers")
    if not 2 <= m <= n <= 255:
        raise errors.ConfigurationError(
            f"a quorum needs 2 <= M <= N <= 255 (got {m} of {n}); M = 1 would be a plain copy of the secret")


def _split_with_rng(secret: bytes, m: int, n: int, rng: Callable[[int], bytes]) -> list[Share]:
    """:func:`split` with the randomness passed in, so tests are deterministic."""
    _check_threshold(m, n)
    if not 1 <= len(secret) <= MAX_SECRET:
        raise errors.ConfigurationError("a secret to share must be 1..1024 bytes")
    values = [bytearray() for _ in range(n)]
    for byte in bytes(secret):
        coefficients = bytearray(rng(m - 1))
        for x in range(1, n + 1):
            y = 0
            for c in reversed(coefficients):  # Horner: ((c_{m-1} x + ...) x + c_1) x + secret
                y = gf_mul(y, x) ^ c
            values[x - 1].append(gf_mul(y, x) ^ byte)
        zero(coefficients)
    shares = [Share(x + 1, bytearray(v)) for x, v in enumerate(values)]
    for v in values:
        zero(v)
    return shares


def split(secret: bytes, m: int, n: int) -> list[Share]:
    """Split ``secret`` into ``n`` shares, any ``m`` of which rebuild it; fewer learn nothing."""
    return _split_with_rng(secret, m, n, secrets.token_bytes)


def combine(shares: Sequence[Share], threshold: int) -> bytearray:
    """Rebuild the secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    Returns a ``bytearray`` the caller should :func:`keymgr._memory.zero` after use.
    """
    if len(shares) < threshold:
        raise errors.PolicyError(f"{len(shares)} share(s) given; this quorum needs {threshold}")
    chosen = list(shares)[:threshold]
    indexes = [s.index for s in chosen]
    if len(set(indexes)) != len(indexes):
        raise errors.PolicyError("the same share was given twice")
    length = len(chosen[0].value)
    if any(len(s.value) != length for s in chosen):
        raise errors.FormatError("shares of different lengths cannot belong to one secret")
    # Lagrange basis at x = 0: l_j = prod_{k != j} x_k / (x_j - x_k); minus is XOR in GF(2^8).
    basis = []
    for j, xj in enumerate(indexes):
        numerator, denominator = 1, 1
        for k, xk in enumerate(indexes):
            if k != j:
                numerator = gf_mul(numerator, xk)
                denominator = gf_mul(denominator, xj ^ xk)
        basis.append(gf_mul(numerator, gf_inv(denominator)))
    secret = bytearray(length)
    for position in range(length):
        acc = 0
        for share, weight in zip(chosen, basis, strict=True):
            acc ^= gf_mul(share.value[position], weight)
        secret[position] = acc
    return secret


def share_commitment(share: Share, *, context: bytes) -> bytes:
    """SHA-256 over a domain-separated encoding of (context, index, value)."""
    data = share.to_bytes()
    return hashlib.sha256(b"keymgr share commitment v1\x00" + len(context).to_bytes(4, "big") + bytes(context)
                          + data).digest()


def verify_share(share: Share, commitment: bytes, context: bytes) -> bool:
    """Whether ``share`` matches its recorded commitment (constant-time comparison)."""
    return hmac.compare_digest(share_commitment(share, context=context), bytes(commitment))
