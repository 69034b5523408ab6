"""KeyManager's envelope encryption through real tokens: both key-encryption profiles,
several recipients on two tokens, contexts, tampering, unknown keys, and the data-key caches.

The format layer has its own tests with a software KEK (test_envelope_*.py); here
every data key is wrapped and unwrapped by SoftHSM itself. Spies count calls into
:mod:`keymgr.hsm` (the real call still happens); nothing is mocked.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import pytest
from asn1crypto import cms

import keymgr
from keymgr.envelope import _der, parse_message, read_kek_recipient, read_stream_header
from keymgr.envelope.cache import CachePolicy
from keymgr.errors import (
    ConfigurationError,
    IntegrityError,
    KeyNotFoundError,
    RecipientNotFoundError,
    UnsupportedAlgorithmError,
)
from keymgr.hsm import objects
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import DEFAULT_PROFILE
from keymgr.manager import INTEGRITY_MESSAGE
from tests._internals import clocked
from tests.conftest import TokenUnderTest

PROFILES = ("kw", "gcm")
CTX = {"tenant": "acme", "purpose": "orders"}
SECRET = b"card 4111 1111 1111 1111"
#: the recipient algorithm each profile writes on SoftHSM (which has plain AES-KW)
ALGORITHM = {"kw": "aes256_wrap", "gcm": "aes256_gcm"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Spy:
    """Counts calls to a function of keymgr.hsm.objects (the real function still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        real = getattr(objects, name)

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(objects, name, counting)


def stream_round_trip(km: keymgr.KeyManager, data: bytes, key: str, **kwargs: Any) -> bytes:
    sealed = io.BytesIO()
    assert km.encrypt_stream(io.BytesIO(data), sealed, key=key, **kwargs) == len(data)
    return sealed.getvalue()


@pytest.mark.parametrize("profile", PROFILES)
def test_round_trip_messages_and_streams(km: keymgr.KeyManager, key_name: str, profile: str) -> None:
    record = km.create_key(key_name, profile=profile)
    for size in (0, 1, 1024, 70_000):
        data = os.urandom(size)
        blob = km.encrypt(data, key=key_name, context=CTX)
        assert km.decrypt(blob, context=CTX) == data
        recipient = read_kek_recipient(parse_message(blob).recipient_infos.der[0])
        assert recipient.kek_id == record.primary_version.key_id
        assert recipient.algorithm == ALGORITHM[profile]
        assert cms.ContentInfo.load(blob)["content"]["recipient_infos"][0].name == "kekri"  # asn1crypto agrees
    data = os.urandom(2 * 1024 * 1024 + 333)
    sealed = stream_round_trip(km, data, key_name, context=CTX)
    out = io.BytesIO()
    assert km.decrypt_stream(io.BytesIO(sealed), out, context=CTX) == len(data)
    assert out.getvalue() == data


def test_default_profile(km: keymgr.KeyManager, key_name: str) -> None:
    assert DEFAULT_PROFILE == "kw"
    assert km.create_key(key_name).profile == DEFAULT_PROFILE


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_either_token_decrypts_a_message_to_both(km_a: keymgr.KeyManager, km_b: keymgr.KeyManager, key_name: str,
                                                 profile: str) -> None:
    """Disaster recovery: a second token (another site) as an extra recipient."""
    km_a.create_key(key_name, profile=profile)
    km_b.create_key(key_name + "-dr", profile=profile)
    dr = km_b.recipient(key_name + "-dr")
    blob = km_a.encrypt(SECRET, key=key_name, context=CTX, also_to=[dr])
    assert len(parse_message(blob).recipient_infos) == 2
    assert km_a.decrypt(blob, context=CTX) == SECRET
    assert km_b.decrypt(blob, context=CTX) == SECRET
    sealed = stream_round_trip(km_a, SECRET * 1000, key_name, context=CTX, also_to=[dr])
    assert len(read_stream_header(io.BytesIO(sealed)).recipient_infos) == 2
    for manager in (km_a, km_b):
        out = io.BytesIO()
        manager.decrypt_stream(io.BytesIO(sealed), out, context=CTX)
        assert out.getvalue() == SECRET * 1000
    # a message for site B alone is not readable at site A: no key of A's is among its recipients
    only_b = km_b.encrypt(SECRET, key=key_name + "-dr")
    with pytest.raises(KeyNotFoundError, match="none of the 1 recipients"):
        km_a.decrypt(only_b)


@pytest.mark.parametrize("profile", PROFILES)
def test_wrong_context_fails(km: keymgr.KeyManager, key_name: str, profile: str) -> None:
    km.create_key(key_name, profile=profile)
    blob = km.encrypt(SECRET, key=key_name, context=CTX)
    sealed = stream_round_trip(km, SECRET, key_name, context=CTX)
    for wrong in (None, {}, {"tenant": "acme"}, {**CTX, "purpose": "refunds"}, {**CTX, "extra": ""}):
        with pytest.raises(IntegrityError, match="^" + INTEGRITY_MESSAGE + "$"):
            km.decrypt(blob, context=wrong)
        out = io.BytesIO()
        with pytest.raises(IntegrityError, match="^" + INTEGRITY_MESSAGE + "$"):
            km.decrypt_stream(io.BytesIO(sealed), out, context=wrong)
        assert out.getvalue() == b""
    plain = km.encrypt(SECRET, key=key_name)
    with pytest.raises(IntegrityError):
        km.decrypt(plain, context=CTX)


def test_decrypt_with_context(km: keymgr.KeyManager, key_name: str) -> None:
    km.create_key(key_name)
    assert km.decrypt_with_context(km.encrypt(SECRET, key=key_name, context=CTX)) == (SECRET, CTX)
    assert km.decrypt_with_context(km.encrypt(SECRET, key=key_name)) == (SECRET, {})
    assert km.decrypt_with_context(km.encrypt(SECRET, key=key_name, compat_openssl=True)) == (SECRET, {})
    tampered = bytearray(km.encrypt(SECRET, key=key_name, context=CTX))
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError, match="^" + INTEGRITY_MESSAGE + "$"):
        km.decrypt_with_context(bytes(tampered))


def algorithm_spans(blob: bytes) -> set[int]:
    """Where a message names its content type and content-encryption algorithm: public fields,
    so an edit there may instead be named (UnsupportedAlgorithmError, not an integrity failure)."""
    content_type = _der.encode_oid("1.2.840.113549.1.9.16.1.23")
    gcm = _der.encode_oid("2.16.840.1.101.3.4.1.46")
    at = blob.index(content_type)  # the first OID of the message
    algorithm = blob.rindex(gcm)  # after the recipients (a gcm-profile recipient names GCM too)
    return set(range(at, at + len(content_type))) | set(range(algorithm, algorithm + len(gcm)))


def _refused(decrypt: Callable[[bytes], Any], data: bytes, recipient: range | None, i: int | None,
             algorithms: set[int] | None = None) -> type:
    """Run ``decrypt(data)``: it must raise the integrity error (the one message), or, only
    where byte ``i`` lies in the recipient, RecipientNotFoundError (also an IntegrityError),
    or, only where it lies in an algorithm's OID, UnsupportedAlgorithmError naming the OID found."""
    with pytest.raises((IntegrityError, UnsupportedAlgorithmError)) as info:
        decrypt(data)
    if isinstance(info.value, UnsupportedAlgorithmError):
        assert algorithms is not None and i in algorithms, (i, info.value)
        assert SECRET not in repr(info.value).encode()
        return UnsupportedAlgorithmError
    if isinstance(info.value, RecipientNotFoundError):
        assert recipient is not None and i in recipient, (i, info.value)
        assert "none of the 1 recipients" in str(info.value)
    else:
        assert str(info.value) == INTEGRITY_MESSAGE and type(info.value) is IntegrityError, (i, info.value)
    assert SECRET not in repr(info.value).encode()
    return type(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_every_tampered_byte_is_refused(km_a: keymgr.KeyManager, key_name: str, profile: str) -> None:
    """Exhaustive: two bit flips at every position and a cut at every length. Every one is the
    integrity error with its one message, whatever the edit broke (the tag, the wrapped key,
    the DER framing); only an edited recipient (its key id or choice tag) may instead say that
    no recipient is a key here (RecipientNotFoundError, still an IntegrityError): exactly what
    a message for another token looks like; and only an edited content type or content
    algorithm OID may be named as one keymgr does not read (UnsupportedAlgorithmError): those
    fields are public, and a named algorithm tells nothing about the ciphertext."""
    km_a.create_key(key_name, profile=profile)
    blob = km_a.encrypt(SECRET, key=key_name, context=CTX)
    recipient = parse_message(blob).recipient_infos.der[0]
    recipient_span = range(blob.index(recipient), blob.index(recipient) + len(recipient))
    algorithms = algorithm_spans(blob)
    outcomes = {IntegrityError: 0, RecipientNotFoundError: 0, UnsupportedAlgorithmError: 0}

    def decrypt(data: bytes) -> bytes:
        return km_a.decrypt(data, context=CTX)

    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[i] ^= flip
            outcomes[_refused(decrypt, bytes(tampered), recipient_span, i, algorithms)] += 1
    for cut in range(len(blob)):
        assert _refused(decrypt, blob[:cut], None, None) is IntegrityError
    assert outcomes[IntegrityError] > len(blob)  # most positions are under the tag or in the wrapped key
    assert 0 < outcomes[RecipientNotFoundError] <= 2 * len(recipient_span)
    assert 0 < outcomes[UnsupportedAlgorithmError] <= 2 * len(algorithms)
    assert km_a.decrypt(blob, context=CTX) == SECRET  # nothing above broke the session or the key


class Recorder(io.RawIOBase):
    """A destination that records every byte written to it (nothing is buffered away)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(memoryview(b))


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_every_tampered_byte_of_a_stream_is_refused(km_a: keymgr.KeyManager, key_name: str, profile: str) -> None:
    """The same through KeyManager's streams, exhaustively over a small stream (header and its
    one short segment: 1 KiB of plaintext, the default 1 MiB segment size). Multi-segment
    streams are flipped exhaustively at the format layer (test_envelope_stream.py, 64-byte
    segments) and at segment boundaries through the CLI (test_cli_crypt.py): the segment
    code is the same whatever the size. Nothing of the plaintext reaches ``dst``."""
    km_a.create_key(key_name, profile=profile)
    plaintext = os.urandom(1024)
    blob = stream_round_trip(km_a, plaintext, key_name, context=CTX)
    header = read_stream_header(io.BytesIO(blob))
    recipient = header.recipient_infos.der[0]
    recipient_span = range(blob.index(recipient), blob.index(recipient) + len(recipient))
    assert len(blob) == len(header.raw) + len(plaintext) + 16

    def decrypt(data: bytes) -> int:
        dst = Recorder()
        try:
            return km_a.decrypt_stream(io.BytesIO(data), dst, context=CTX)
        finally:
            assert not dst.data  # one segment: it fails before anything is written
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01 if i % 2 else 0x80
        _refused(decrypt, bytes(tampered), recipient_span, i)
    for cut in range(len(blob)):
        assert _refused(decrypt, blob[:cut], None, None) is IntegrityError
    out = io.BytesIO()
    assert km_a.decrypt_stream(io.BytesIO(blob), out, context=CTX) == len(plaintext)
    assert out.getvalue() == plaintext


@pytest.mark.parametrize("profile", PROFILES)
def test_stream_reordering_splicing_and_wrong_context(km_a: keymgr.KeyManager, key_name: str, profile: str) -> None:
    """Streams through the token with several 1 MiB segments: swapped segments, a segment from
    another stream under the same key, a cut at a segment boundary, a dropped last segment and
    a wrong context are all the integrity error, with only verified segments written."""
    km_a.create_key(key_name, profile=profile)
    seg = 1024 * 1024
    plaintext = os.urandom(2 * seg + 100)
    one = stream_round_trip(km_a, plaintext, key_name, context=CTX)
    two = stream_round_trip(km_a, plaintext, key_name, context=CTX)
    h1, h2 = (len(read_stream_header(io.BytesIO(b)).raw) for b in (one, two))
    cuts = [h1, h1 + seg + 16, h1 + 2 * (seg + 16)]  # segment starts
    segments = [one[cuts[0]:cuts[1]], one[cuts[1]:cuts[2]], one[cuts[2]:]]
    other = two[h2 + seg + 16:h2 + 2 * (seg + 16)]  # segment 1 of the other stream
    cases = {
        "swapped": (one[:h1] + segments[1] + segments[0] + segments[2], 0),
        "spliced": (one[:h1] + segments[0] + other + segments[2], 1),
        "other header": (two[:h2] + one[h1:], 0),
        "cut at a boundary": (one[:cuts[2]], 2),
        "last segment dropped and a full one marked": (one[:cuts[1]], 1),
    }
    for name, (data, verified) in cases.items():
        dst = Recorder()
        with pytest.raises(IntegrityError, match="^" + INTEGRITY_MESSAGE + "$"):
            km_a.decrypt_stream(io.BytesIO(data), dst, context=CTX)
        assert bytes(dst.data) == plaintext[:verified * seg], name
    for wrong in (None, {"tenant": "acme"}, {**CTX, "tenant": "evil"}):
        dst = Recorder()
        with pytest.raises(IntegrityError, match="^" + INTEGRITY_MESSAGE + "$"):
            km_a.decrypt_stream(io.BytesIO(one), dst, context=wrong)
        assert not dst.data


def test_unknown_key(km: keymgr.KeyManager, key_name: str) -> None:
    with pytest.raises(KeyNotFoundError, match=key_name):
        km.encrypt(SECRET, key=key_name)
    with pytest.raises(KeyNotFoundError):
        km.encrypt_stream(io.BytesIO(SECRET), io.BytesIO(), key=key_name)
    with pytest.raises(KeyNotFoundError):
        km.recipient(key_name)
    with pytest.raises(ConfigurationError):
        km.encrypt(SECRET, key="not a valid name!")


def test_compat_openssl_needs_a_kw_key(km: keymgr.KeyManager, key_name: str) -> None:
    km.create_key(key_name, profile="gcm")
    with pytest.raises(ConfigurationError, match="OpenSSL"):
        km.encrypt(SECRET, key=key_name, compat_openssl=True)


def test_gcm_profile_makes_one_token_call_per_message(km_a: keymgr.KeyManager, key_name: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    km_a.create_key(key_name, profile="gcm")
    blob = km_a.encrypt(SECRET, key=key_name, context=CTX)  # warm: keyring read, handle looked up
    km_a.refresh_interval = 3600.0  # no periodic keyring re-read inside the count
    calls = {"n": 0}
    real_run = TokenSession.run

    def counting_run(self: TokenSession, operation: str, call: Callable[..., Any]) -> Any:
        calls["n"] += 1
        return real_run(self, operation, call)

    monkeypatch.setattr(TokenSession, "run", counting_run)
    for _ in range(20):
        km_a.decrypt(km_a.encrypt(SECRET, key=key_name, context=CTX), context=CTX)
    assert calls["n"] == 40
    assert km_a.decrypt(blob, context=CTX) == SECRET


# -- data-key caches ---------------------------------------------------------------


def wrapped_key(blob: bytes) -> bytes:
    return parse_message(blob).recipient_infos.der[0]


def test_encrypt_cache_limits(softhsm: TokenUnderTest, key_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    policy = CachePolicy(max_age=60, max_messages=3, max_bytes=10_000, max_entries=10)
    with clocked(keymgr.KeyManager(softhsm.uri(), cache=policy), clock=clock) as km:
        km.create_key(key_name)
        wraps = Spy(monkeypatch, "wrap_data_key")
        blobs = [km.encrypt(b"m%d" % i, key=key_name, context=CTX) for i in range(4)]
        assert wraps.calls == 2  # three messages per data key
        assert len({wrapped_key(b) for b in blobs[:3]}) == 1 and wrapped_key(blobs[3]) != wrapped_key(blobs[0])
        assert len({parse_message(b).nonce for b in blobs}) == 4  # each message its own nonce
        km.encrypt(b"x", key=key_name, context={"tenant": "other"})
        assert wraps.calls == 3  # contexts never share a data key
        big = km.encrypt(bytes(6000), key=key_name)
        bigger = km.encrypt(bytes(6000), key=key_name)
        assert wraps.calls == 5 and wrapped_key(big) != wrapped_key(bigger)  # 12,000 bytes > max_bytes
        assert wrapped_key(km.encrypt(b"y", key=key_name)) == wrapped_key(bigger)  # 6,001 bytes: still fits
        calls = wraps.calls
        first = km.encrypt(b"a", key=key_name, context={"k": "age"})
        clock.now += 59
        assert wrapped_key(km.encrypt(b"b", key=key_name, context={"k": "age"})) == wrapped_key(first)
        clock.now += 1
        assert wrapped_key(km.encrypt(b"c", key=key_name, context={"k": "age"})) != wrapped_key(first)
        assert wraps.calls == calls + 2
        for i, blob in enumerate(blobs):
            assert km.decrypt(blob, context=CTX) == b"m%d" % i
        assert km.decrypt(big) == bytes(6000)
        with pytest.raises(IntegrityError):
            km.decrypt(blobs[0], context={"tenant": "other"})


def test_a_forked_child_encrypts_under_a_data_key_of_its_own(softhsm: TokenUnderTest, key_name: str) -> None:
    """The parent's cached data key stays the parent's: a child that went on with it would spend
    the same max_messages again (N forked workers, N times the limit under one key). The child's
    lock is its own too, and the parent's cache is untouched."""
    import os
    import signal

    km = keymgr.KeyManager(softhsm.uri(), cache=CachePolicy(max_messages=100))
    km.create_key(key_name)
    parent = wrapped_key(km.encrypt(b"before fork", key=key_name, context=CTX))
    cache = km._encrypt_cache
    assert cache is not None
    cache._lock.acquire()  # as another thread of the parent could hold it at the fork
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the wrapped key of its first message, and whether it opens
        try:
            os.close(read_fd)
            signal.alarm(10)  # a lock inherited held would hang the child: SIGALRM ends it instead
            blob = km.encrypt(b"in the child", key=key_name, context=CTX)
            ok = km.decrypt(blob, context=CTX) == b"in the child"
            os.write(write_fd, (b"1" if ok else b"0") + wrapped_key(blob))
        finally:
            os._exit(0)
    cache._lock.release()
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        got = pipe.read()
    os.waitpid(pid, 0)
    assert got[:1] == b"1" and got[1:] and got[1:] != parent
    assert wrapped_key(km.encrypt(b"after fork", key=key_name, context=CTX)) == parent
    km.close()


def test_encrypt_cache_wipes_evicted_keys(softhsm: TokenUnderTest, key_name: str) -> None:
    policy = CachePolicy(max_messages=2, max_entries=2)
    km = keymgr.KeyManager(softhsm.uri(), cache=policy)
    km.create_key(key_name)
    cache = km._encrypt_cache
    assert cache is not None
    km.encrypt(b"1", key=key_name, context={"n": "1"})
    first = next(iter(cache._entries.values())).dek
    assert "wiped" not in repr(first)
    km.encrypt(b"2", key=key_name, context={"n": "1"})
    km.encrypt(b"3", key=key_name, context={"n": "1"})  # third message: over max_messages
    assert "wiped" in repr(first) and first._key == bytearray(32)
    km.encrypt(b"4", key=key_name, context={"n": "2"})
    second = next(iter(cache._entries.values())).dek
    km.encrypt(b"5", key=key_name, context={"n": "3"})  # a third partition: over max_entries
    assert "wiped" in repr(second) and len(cache) == 2
    remaining = [entry.dek for entry in cache._entries.values()]
    km.close()  # closing wipes everything
    assert all("wiped" in repr(dek) for dek in remaining)


def test_decrypt_cache_limits_and_wiping(softhsm: TokenUnderTest, key_name: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    with clocked(keymgr.KeyManager(softhsm.uri(), cache=CachePolicy(max_age=30, max_entries=2)), clock=clock) as km:
        km.create_key(key_name, profile="gcm")
        blobs = [km.encrypt(b"m%d" % i, key=key_name, context={"n": str(i)}) for i in range(3)]
        unwraps = Spy(monkeypatch, "gcm_decrypt")
        for _ in range(3):
            assert km.decrypt(blobs[0], context={"n": "0"}) == b"m0"
        assert unwraps.calls == 1
        clock.now += 30
        km.decrypt(blobs[0], context={"n": "0"})
        assert unwraps.calls == 2  # expired
        cache = km._decrypt_cache
        assert cache is not None
        key_bytes = next(iter(cache._entries.values()))[0]._key  # the cached key's own buffer
        assert key_bytes != bytearray(32)
        km.decrypt(blobs[1], context={"n": "1"})
        km.decrypt(blobs[2], context={"n": "2"})  # a third entry: the oldest goes
        assert len(cache) == 2 and unwraps.calls == 4
        assert key_bytes == bytearray(32)  # evicted, nobody else held it: zeroed
        km.decrypt(blobs[0], context={"n": "0"})
        assert unwraps.calls == 5
