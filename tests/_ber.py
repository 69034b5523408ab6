"""A BER re-encoder for tests: keymgr's DER messages in the forms other writers use (indefinite
lengths, non-minimal lengths, strings in segments, as X.690 section 8 allows), so that the
plaintext behind a BER input is known (tests/envelope/test_envelope_ber.py, the fuzz seeds)."""

from __future__ import annotations

import random

from keymgr.envelope import _der

__all__ = ["OneByteSegments", "reencode", "to_ber"]


def _ber(data: bytes, start: int, end: int, *, rng: random.Random, inside_eci: bool = False,
         depth: int = 0) -> bytes:
    """``data[start:end]`` (DER elements) re-encoded with BER's freedoms, chosen by ``rng``."""
    out = b""
    pos = start
    index = 0
    while pos < end:
        el = _der.read_at(data, pos, end)
        body = data[el.body:el.end]
        if el.tag & 0x20:
            inner = _ber(data, el.body, el.end, rng=rng, inside_eci=el.tag == _der.SEQUENCE and depth == 3,
                         depth=depth + 1)
            out += bytes([el.tag, 0x80]) + inner + b"\x00\x00" if rng.random() < 0.8 else \
                bytes([el.tag, 0x84]) + len(inner).to_bytes(4, "big") + inner
        elif (el.tag == 0x80 and inside_eci and index == 2) or (el.tag == _der.OCTET_STRING and len(body) > 8):
            size = rng.choice([1, 7, 1000])  # a constructed string in segments (BC cuts at 1000 bytes)
            segments = b"".join(_der.octets(body[i:i + size]) for i in range(0, len(body), size))
            out += bytes([el.tag | 0x20, 0x80]) + segments + b"\x00\x00"
        else:
            out += bytes([el.tag, 0x82]) + len(body).to_bytes(2, "big") + body  # non-minimal length
        pos = el.end
        index += 1
    return out


class OneByteSegments(random.Random):
    """Indefinite lengths everywhere, strings in 1-byte segments."""

    def random(self) -> float:
        return 0.0

    def choice(self, seq):  # type: ignore[no-untyped-def, override]
        return seq[0]


def reencode(der: bytes, rng: random.Random) -> bytes:
    """``der`` (one DER element) with the BER freedoms ``rng`` picks."""
    return _ber(der, 0, len(der), rng=rng)


def to_ber(der: bytes, seed: int) -> bytes:
    """``der`` re-encoded as BER, reproducibly for ``seed``."""
    return reencode(der, random.Random(seed))
