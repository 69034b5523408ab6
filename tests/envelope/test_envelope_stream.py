"""The stream format (keymgr.envelope.stream): STREAM segments behind a DER header."""

from __future__ import annotations

import contextlib
import io
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgr.envelope import (
    _der,
    decrypt_stream,
    encrypt_stream,
    other_recipient_info,
    read_stream_header,
    replace_stream_recipients,
)
from keymgr.envelope.stream import DEFAULT_SEGMENT_SIZE, MAGIC, TAG_SIZE
from keymgr.errors import ConfigurationError, FormatError, IntegrityError, KeymgrError, KeyNotFoundError
from tests._fixed_randomness import fixed_stream_randomness
from tests._softkek import SoftKek

SEG = 64
CTX = {"tenant": "acme"}


@pytest.fixture
def kek() -> SoftKek:
    return SoftKek()


@pytest.fixture
def dek() -> bytes:
    return os.urandom(32)


def encrypt(plaintext: bytes, kek: SoftKek, dek: bytes, *, context: dict[str, str] | None = CTX,
            segment_size: int = SEG) -> bytes:
    out = io.BytesIO()
    n = encrypt_stream(io.BytesIO(plaintext), out, dek=dek, recipient_infos=[kek.recipient(dek)], context=context,
                       segment_size=segment_size)
    assert n == len(plaintext)
    return out.getvalue()


def decrypt(blob: bytes, kek: SoftKek, *, context: dict[str, str] | None = CTX, dst: io.BytesIO | None = None) -> bytes:
    out = io.BytesIO() if dst is None else dst
    n = decrypt_stream(io.BytesIO(blob), out, unwrap=kek.unwrap, context=context)
    assert n == len(out.getvalue())
    return out.getvalue()


def layout(blob: bytes, size: int = SEG) -> tuple[int, list[tuple[int, int]]]:
    """(header length, [(start, end) of each sealed segment])."""
    header = len(read_stream_header(io.BytesIO(blob)).raw)
    spans, pos = [], header
    while pos < len(blob):
        spans.append((pos, min(pos + size + TAG_SIZE, len(blob))))
        pos = spans[-1][1]
    return header, spans


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG + 5, 10 * SEG])
def test_round_trip(kek: SoftKek, dek: bytes, size: int) -> None:
    plaintext = os.urandom(size)
    blob = encrypt(plaintext, kek, dek)
    header, spans = layout(blob)
    assert len(spans) == size // SEG + 1  # the last segment is always short, maybe empty
    assert spans[-1][1] - spans[-1][0] == size % SEG + TAG_SIZE
    assert decrypt(blob, kek) == plaintext


def test_default_segment_size_round_trip(kek: SoftKek, dek: bytes) -> None:
    plaintext = os.urandom(2 * DEFAULT_SEGMENT_SIZE + 12345)
    blob = encrypt(plaintext, kek, dek, segment_size=DEFAULT_SEGMENT_SIZE)
    assert len(blob) - len(read_stream_header(io.BytesIO(blob)).raw) == len(plaintext) + 3 * TAG_SIZE
    assert decrypt(blob, kek) == plaintext


def test_header_fields_and_position(kek: SoftKek, dek: bytes) -> None:
    salt, prefix = os.urandom(32), os.urandom(7)
    with fixed_stream_randomness(salt, prefix):
        blob = encrypt(b"x" * 100, kek, dek)
    assert blob.startswith(MAGIC + b"\x01")
    src = io.BytesIO(blob)
    header = read_stream_header(src)
    assert (header.segment_size, header.salt, header.nonce_prefix, header.context) == (SEG, salt, prefix, CTX)
    assert src.tell() == len(header.raw)
    out = io.BytesIO()
    assert decrypt_stream(src, out, unwrap=kek.unwrap, context=CTX, header=header) == 100
    assert out.getvalue() == b"x" * 100


def test_same_inputs_same_stream_only_with_fixed_stream_randomness(kek: SoftKek, dek: bytes) -> None:
    ri = [kek.recipient(dek)]
    outs = []
    for _ in range(2):
        out = io.BytesIO()
        with fixed_stream_randomness(bytes(32), bytes(7)):
            encrypt_stream(io.BytesIO(b"abc" * 50), out, dek=dek, recipient_infos=ri, context=CTX, segment_size=SEG)
        outs.append(out.getvalue())
    assert outs[0] == outs[1]
    assert encrypt(b"abc", kek, dek) != encrypt(b"abc", kek, dek)


def test_every_single_byte_tamper_is_refused_and_only_verified_segments_are_written(kek: SoftKek,
                                                                                       dek: bytes) -> None:
    plaintext = os.urandom(3 * SEG + 10)
    ri = kek.recipient(dek)
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), out, dek=dek, recipient_infos=[ri], context=CTX, segment_size=SEG)
    blob = out.getvalue()
    header, spans = layout(blob)
    recipient = range(blob.index(ri.dump()), blob.index(ri.dump()) + len(ri.dump()))
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01 if i % 2 else 0x80
        dst = io.BytesIO()
        with pytest.raises(KeymgrError) as info:
            decrypt(bytes(tampered), kek, dst=dst)
        assert isinstance(info.value, IntegrityError | FormatError | KeyNotFoundError), (i, info.value)
        assert not isinstance(info.value, KeyNotFoundError) or i in recipient
        if i < header:
            assert dst.getvalue() == b""
        else:
            failed = next(n for n, (start, end) in enumerate(spans) if start <= i < end)
            assert dst.getvalue() == plaintext[:failed * SEG]  # verified segments only


def test_truncation_anywhere_including_segment_boundaries(kek: SoftKek, dek: bytes) -> None:
    for size in (2 * SEG, 2 * SEG + 7):
        plaintext = os.urandom(size)
        blob = encrypt(plaintext, kek, dek)
        header, spans = layout(blob)
        boundaries = {end for _, end in spans[:-1]}
        for cut in range(len(blob)):
            dst = io.BytesIO()
            with pytest.raises(FormatError if cut < header else IntegrityError):
                decrypt(blob[:cut], kek, dst=dst)
            if cut in boundaries:  # a clean cut after a whole segment: still refused
                assert len(dst.getvalue()) % SEG == 0


def test_dropping_the_empty_last_segment_is_detected(kek: SoftKek, dek: bytes) -> None:
    blob = encrypt(os.urandom(2 * SEG), kek, dek)
    _, spans = layout(blob)
    assert spans[-1][1] - spans[-1][0] == TAG_SIZE
    with pytest.raises(IntegrityError):
        decrypt(blob[:spans[-1][0]], kek)


def test_reordered_segments(kek: SoftKek, dek: bytes) -> None:
    blob = encrypt(os.urandom(3 * SEG + 1), kek, dek)
    header, spans = layout(blob)
    seg = [blob[s:e] for s, e in spans]
    for order in ([1, 0, 2, 3], [0, 2, 1, 3], [0, 1, 3, 2], [0, 1, 2, 2, 3], [0, 1, 2]):
        with pytest.raises(IntegrityError):
            decrypt(blob[:header] + b"".join(seg[k] for k in order), kek)


def test_splicing_between_streams_under_the_same_data_key(kek: SoftKek, dek: bytes) -> None:
    plaintext = os.urandom(3 * SEG)
    one, two = encrypt(plaintext, kek, dek), encrypt(plaintext, kek, dek)
    h1, s1 = layout(one)
    h2, s2 = layout(two)
    assert decrypt(two, kek) == plaintext
    with pytest.raises(IntegrityError):
        decrypt(one[:s1[1][0]] + two[s2[1][0]:s2[1][1]] + one[s1[1][1]:], kek)  # segment 1 from the other stream
    with pytest.raises(IntegrityError):
        decrypt(one[:h1] + two[h2:], kek)  # the other stream's segments behind this header


def test_trailing_garbage(kek: SoftKek, dek: bytes) -> None:
    blob = encrypt(os.urandom(SEG + 3), kek, dek)
    _, spans = layout(blob)
    for extra in (b"\x00", os.urandom(TAG_SIZE), os.urandom(SEG + TAG_SIZE), blob[spans[0][0]:spans[0][1]]):
        with pytest.raises(IntegrityError):
            decrypt(blob + extra, kek)


def test_context(kek: SoftKek, dek: bytes) -> None:
    blob = encrypt(b"data", kek, dek, context=CTX)
    for wrong in (None, {}, {"tenant": "other"}, {**CTX, "x": "y"}):
        with pytest.raises(IntegrityError):
            decrypt(blob, kek, context=wrong)
    assert kek.calls == 0  # refused before any unwrap
    plain = encrypt(b"data", kek, dek, context=None)
    assert decrypt(plain, kek, context=None) == b"data"
    with pytest.raises(IntegrityError):
        decrypt(plain, kek, context=CTX)


def test_replace_recipients_keeps_every_segment(dek: bytes) -> None:
    old, new = SoftKek(b"v1"), SoftKek(b"v2")
    plaintext = os.urandom(2 * SEG + 9)
    blob = encrypt(plaintext, old, dek)
    header = read_stream_header(io.BytesIO(blob))
    new_header = replace_stream_recipients(header.raw, [new.recipient(dek, "aes256_gcm")])
    rewrapped = new_header + blob[len(header.raw):]
    reread = read_stream_header(io.BytesIO(rewrapped))
    assert reread.header_hash == header.header_hash and reread._params == header._params
    assert decrypt(rewrapped, new) == plaintext
    with pytest.raises(KeyNotFoundError):
        decrypt(rewrapped, old)


def test_a_recipient_carrying_another_key_fails_the_commitment(kek: SoftKek, dek: bytes) -> None:
    blob = encrypt(os.urandom(SEG), kek, dek)
    header = read_stream_header(io.BytesIO(blob))
    swapped = replace_stream_recipients(header.raw, [kek.recipient(os.urandom(32))]) + blob[len(header.raw):]
    with pytest.raises(IntegrityError):
        decrypt(swapped, kek)


@pytest.mark.parametrize("field", ["segment_size", "salt", "prefix"])
def test_header_parameter_edits(kek: SoftKek, dek: bytes, field: str) -> None:
    salt, prefix = bytes(range(32)), bytes(range(100, 107))
    plaintext = os.urandom(2 * SEG)
    with fixed_stream_randomness(salt, prefix):
        blob = encrypt(plaintext, kek, dek)
    if field == "segment_size":
        edited = blob.replace(b"\x02\x01\x40", b"\x02\x01\x20", 1)  # INTEGER 64 -> 32
    else:
        old = salt if field == "salt" else prefix
        edited = blob.replace(old, bytes([old[0] ^ 1]) + old[1:], 1)
    assert edited != blob
    with pytest.raises(IntegrityError):
        decrypt(edited, kek)


@pytest.mark.parametrize("bad", [b"", MAGIC[:5], b"not a keymgr stream at all", MAGIC + b"\x02" + bytes(4),
                                 MAGIC + b"\x01" + b"\xff\xff\xff\xff", MAGIC + b"\x01\x00\x00\x00\x10" + bytes(3)])
def test_not_a_stream(kek: SoftKek, bad: bytes) -> None:
    with pytest.raises(FormatError):
        read_stream_header(io.BytesIO(bad))
    with pytest.raises(FormatError):
        decrypt(bad, kek)


def test_configuration_errors(kek: SoftKek, dek: bytes) -> None:
    for size in (0, 15, 64 * 1024 * 1024 + 1, True, 1.5):
        with pytest.raises(ConfigurationError):
            encrypt(b"x", kek, dek, segment_size=size)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        encrypt_stream(io.BytesIO(b"x"), io.BytesIO(), dek=dek[:16], recipient_infos=[kek.recipient(dek)], context=None)


class Trickle(io.RawIOBase):
    """A pipe-like reader that returns at most ``step`` bytes per call."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._step, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class ReadOnly:
    """A reader with ``read`` and no ``readinto``."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._src.read(min(n, 5))


class PartialWriter(io.RawIOBase):
    """A writer that accepts at most 3 bytes per call, as a raw file may."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += bytes(b[:3])
        return min(len(b), 3)


def test_short_reads_and_partial_writes(kek: SoftKek, dek: bytes) -> None:
    plaintext = os.urandom(5 * SEG + 3)
    sink = PartialWriter()
    encrypt_stream(Trickle(plaintext), sink, dek=dek, recipient_infos=[kek.recipient(dek)], context=None,  # type: ignore[arg-type]
                   segment_size=SEG)
    blob = bytes(sink.data)
    out = PartialWriter()
    assert decrypt_stream(ReadOnly(blob), out, unwrap=kek.unwrap, context=None) == len(plaintext)  # type: ignore[arg-type]
    assert bytes(out.data) == plaintext
    assert decrypt(blob, kek, context=None) == plaintext


class NonBlocking(io.RawIOBase):
    """A reader with nothing available yet, as a non-blocking pipe."""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> None:  # type: ignore[override]
        return None


def test_a_non_blocking_source_is_refused_not_taken_for_the_end(kek: SoftKek, dek: bytes) -> None:
    with pytest.raises(ConfigurationError):
        encrypt_stream(NonBlocking(), io.BytesIO(), dek=dek, recipient_infos=[kek.recipient(dek)],  # type: ignore[arg-type]
                       context=None)


def test_header_size_is_capped_when_writing(kek: SoftKek, dek: bytes) -> None:
    """64 recipients of almost 16 KiB and a large context: over the 1 MiB a reader accepts."""
    big = [other_recipient_info(f"1.2.3.{i}", _der.octets(os.urandom(16_360))) for i in range(64)]
    with pytest.raises(ConfigurationError):
        encrypt_stream(io.BytesIO(b"x"), io.BytesIO(), dek=dek, recipient_infos=big, context={"k": "v" * 16_000})


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced on demand."""

    BLOCK = bytes(4096)

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._left, len(self.BLOCK))
        buf[:n] = self.BLOCK[:n]
        self._left -= n
        return n


class Discard(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.count += len(b)
        return len(b)


def test_memory_stays_constant(kek: SoftKek, dek: bytes, tmp_path: Path) -> None:
    """32 MiB through 1 MiB segments, both ways: Python allocations peak at the two segment
    buffers, not at anything the size of the input."""
    size, segment = 32 * 1024 * 1024, 1024 * 1024
    path = tmp_path / "stream"
    ri = [kek.recipient(dek)]
    with path.open("wb") as dst:
        tracemalloc.start()
        try:
            encrypt_stream(Zeros(size), dst, dek=dek, recipient_infos=ri, context=None,  # type: ignore[arg-type]
                           segment_size=segment)
            _, encrypt_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert 0 < path.stat().st_size - size - 33 * TAG_SIZE < 1024  # 32 full segments, an empty last one, a header
    sink = Discard()
    with path.open("rb") as src:
        tracemalloc.start()
        try:
            decrypt_stream(src, sink, unwrap=kek.unwrap, context=None)  # type: ignore[arg-type]
            _, decrypt_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert sink.count == size
    assert encrypt_peak < 2 * segment + 256 * 1024, encrypt_peak
    assert decrypt_peak < 2 * segment + 256 * 1024, decrypt_peak


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_keymgr_errors(data: bytes) -> None:
    kek = SoftKek(b"fuzz", bytes(32))
    for blob in (data, MAGIC + b"\x01" + len(data).to_bytes(4, "big") + data):
        for call in (lambda b=blob: read_stream_header(io.BytesIO(b)),
                     lambda b=blob: decrypt_stream(io.BytesIO(b), io.BytesIO(), unwrap=kek.unwrap, context=None)):
            with contextlib.suppress(KeymgrError):
                call()


FUZZ_KEK = SoftKek(b"fuzz", bytes(32))
FUZZ_DEK = bytes(range(32))
_out = io.BytesIO()
encrypt_stream(io.BytesIO(bytes(100)), _out, dek=FUZZ_DEK, recipient_infos=[FUZZ_KEK.recipient(FUZZ_DEK)],
               context=CTX, segment_size=32)
FUZZ_BLOB = _out.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(FUZZ_BLOB) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_streams_raise_only_keymgr_errors(edits: list[tuple[int, int]]) -> None:
    data = bytearray(FUZZ_BLOB)
    for pos, value in edits:
        data[pos] = value
    try:
        out = io.BytesIO()
        decrypt_stream(io.BytesIO(bytes(data)), out, unwrap=FUZZ_KEK.unwrap, context=CTX)
    except KeymgrError:
        return
    assert bytes(data) == FUZZ_BLOB and out.getvalue() == bytes(100)
