"""Encrypt and decrypt database fields under a named key of the token.

A :class:`FieldCipher` (made by :meth:`keymgr.KeyManager.fields`) seals each value with
AES-256-GCM under a data key shared by many values, each with its own random 96-bit nonce.
A data key is made on the host (``os.urandom``), wrapped once by the key's primary KEK
version in the token (the same ``KEKRecipientInfo`` a CMS message carries), and stored in
the data-key table before the first value uses it (:mod:`keymgr.fields.keys`). It is used
for at most ``max_messages`` values and ``max_age`` seconds (:class:`CachePolicy`, the
envelope cache's limits and defaults: 10,000 values, 300 s), and is replaced when the key
rotates or its primary stops encrypting: at the next value (:meth:`FieldCipher.encrypt`), row
(:meth:`FieldCipher.encrypt_row`) or batch (:meth:`FieldCipher.encrypt_rows` from
:data:`BATCH_MIN_ROWS` rows: batches of at most :data:`BATCH_VALUES` values, one audited
operation and one check of the key's state each; docs/fields.md, "Bulk inserts").

Decrypting unwraps a data key once per ``max_age`` (a small cache keyed by ``key_ref``); a
cached key still passes the version's state check and the audit's rate limits on every
value, as the manager's decrypt cache does. The unwrapped key is checked against its
commitment and its key name before use (a row of the data-key table moved from another
key fails). Every failure of a value is the one :class:`~keymgr.errors.IntegrityError`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keymgr import errors
from keymgr.envelope._aead import NONCE_SIZE, DataKey
from keymgr.envelope._nonces import random_nonce
from keymgr.envelope.cache import CachePolicy
from keymgr.envelope.recipients import read_kek_recipient
from keymgr.fields._batch import Batch, plain
from keymgr.fields._format import (
    FIELD_INTEGRITY,
    KEY_REF_SIZE,
    Place,
    check_extra,
    check_part,
    column_prefix,
    header,
    pack,
    row_suffix,
    unpack,
)
from keymgr.fields.keys import KeyStore, StoredKey
from keymgr.keyring.store import KeyRecord, KeyVersion
from keymgr.recipients.kek import KekProtector
from keymgr.rewrap.message import Rewrapper

if TYPE_CHECKING:
    from keymgr.audit import Operation

__all__ = ["BATCH_MIN_ROWS", "BATCH_VALUES", "FieldCipher", "Place"]

Audited = Callable[..., AbstractContextManager[Any]]

#: :meth:`FieldCipher.encrypt_rows` seals at most this many values per batch: one audited
#: operation, one check of the key's state. It bounds how long a suspension or rotation waits
#: for a batch under way (~50-100 ms of sealing here); the keyring itself sees another process's
#: suspension within its ``refresh_interval`` (1 s).
BATCH_VALUES = 16_384
#: From this many rows on, :meth:`FieldCipher.encrypt_rows` seals in batches, each an audit
#: entry of its own (~0.6 ms with its fsync and token MAC: ~2.4 µs a row here, about what a
#: row's own aggregated operation and state check cost); fewer rows are sealed row by row.
BATCH_MIN_ROWS = 256
_BULK_NONCES = 32  # from this many nonces on, one os.urandom read for all of them


@dataclass
class _Current:
    key_ref: bytes
    dek: DataKey
    kek_id: bytes
    created: float
    uses: int = 0


@dataclass(frozen=True)
class _Opened:
    """An unwrapped data key, its recipient, when it was opened, and the version that wrapped it
    (for the audit's attribution: names and numbers; its state is read anew on every use)."""

    dek: DataKey
    der: bytes
    opened: float
    record: KeyRecord
    version: KeyVersion


#: Every live FieldCipher of this process: a forked child forgets their current data keys.
_live_ciphers: weakref.WeakSet[FieldCipher] = weakref.WeakSet()


def _forget_current_keys_in_child() -> None:
    """After fork: the child must not go on sealing under the parent's current data key, whose
    use count both would then spend (a pre-forking server's N workers made up to N x
    max_messages values under one key). The child takes a data key of its own on first use;
    keys it only opens (decrypt) stay."""
    for cipher in list(_live_ciphers):
        cipher._current = None  # noqa: SLF001 - the class's own fork hook
        cipher._lock = threading.RLock()  # noqa: SLF001 - a lock held by another thread at fork stays held


os.register_at_fork(after_in_child=_forget_current_keys_in_child)


class FieldCipher:
    """Seal and open field values for one named key and one data-key store."""

    def __init__(self, *, key: str, store: KeyStore, protector: KekProtector, rewrapper: Rewrapper,
                 audited: Audited, on_unwrap: Callable[[KeyRecord, KeyVersion], None],
                 policy: CachePolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._key = key
        self._store = store
        self._protector = protector
        self._rewrapper = rewrapper
        self._audited = audited
        self._on_unwrap = on_unwrap  # the audit's attribution and rate limits, for cached data keys
        self._policy = policy or CachePolicy()
        self._clock = clock
        self._lock = threading.RLock()  # a new data key is remembered while the lock is held
        self._current: _Current | None = None
        _live_ciphers.add(self)
        self._opened: OrderedDict[bytes, _Opened] = OrderedDict()
        protector.keyring.get(key)  # fail now, not at the first insert, for a key that does not exist

    def __repr__(self) -> str:
        return f"FieldCipher(key={self._key!r})"

    @property
    def key(self) -> str:
        return self._key

    def describe(self) -> KeyRecord:
        """The key's record now (versions, primary)."""
        return self._protector.keyring.get(self._key)

    @property
    def store(self) -> KeyStore:
        return self._store

    # -- encrypt ---------------------------------------------------------------

    def encrypt(self, value: bytes | str, place: Place) -> bytes:
        """The field form of ``value`` (text is UTF-8) bound to ``place``."""
        with self._audited("encrypt", key=self._key) as op:
            data = plain(value)
            ((current, _),) = self._data_keys(self._checked_record(op), 1)
            return self._seal(current, data, column_prefix(self._key, place.table, place.column),
                              row_suffix(place.row, place.extra), random_nonce())

    def encrypt_row(self, values: Mapping[str, bytes | str | None], *, table: str, row: str,
                    extra: Mapping[str, str] | None = None) -> dict[str, bytes | None]:
        """Several columns of one row (``None`` stays ``None``): one audited operation, one
        check of the key's state, each value bound to its own column."""
        return self.encrypt_rows([(values, row)], table=table, extra=extra)[0]

    def encrypt_rows(self, rows: Sequence[tuple[Mapping[str, bytes | str | None], str]], *, table: str,
                     extra: Mapping[str, str] | None = None) -> list[dict[str, bytes | None]]:
        """:meth:`encrypt_row` for many ``(values, row)`` pairs (a bulk insert), all or nothing.

        Every row and value is checked first (row identity, extra context, table and column
        names, ``str`` or ``bytes``): a bad one raises before anything is sealed. Then, from
        :data:`BATCH_MIN_ROWS` rows on, the rows are sealed in batches of at most
        :data:`BATCH_VALUES` values (a row is never split): per batch one audited operation (an
        entry of its own, detail ``rows`` and ``values``), one check of the key's state (a
        suspension or rotation takes effect at the next batch), data keys reserved for exactly
        the batch's values (the current one up to ``max_messages``, then a new one mid-batch),
        and its nonces from one read of the OS CSPRNG. Fewer rows are sealed row by row, each
        one aggregated operation with its own check, as :meth:`encrypt_row`: one entry written
        per batch (~0.6 ms, an fsync and a token MAC) would cost them more than it saves. An
        error in a later batch (a suspension) returns nothing of the earlier ones."""
        batch = self._checked(lambda: Batch(self._key, table, [values for values, _ in rows],
                                            [row for _, row in rows], extra))
        self._seal_all(batch)
        return batch.rows()

    def encrypt_columns(self, rows: Sequence[Mapping[str, object]], row_ids: Sequence[str], *, table: str,
                        columns: Sequence[str], extra: Mapping[str, str] | None = None) -> list[bytes | None]:
        """:meth:`encrypt_rows` of ``columns`` read from each of ``rows`` (absent: None), bound to
        ``row_ids``, flat: row ``i``'s column ``j`` at ``i * len(columns) + j``. What a codec calls
        with the rows it inserts, so no per-row dict is made for the cipher."""
        return self.seal(self.prepare_columns(rows, row_ids, table=table, columns=columns, extra=extra))

    def prepare_columns(self, rows: Sequence[Mapping[str, object]], row_ids: Sequence[str], *, table: str,
                        columns: Sequence[str], extra: Mapping[str, str] | None = None) -> Batch:
        """The first half of :meth:`encrypt_columns`: every row checked (a bad one raises, one failed
        ``encrypt`` entry) and laid out, nothing sealed, no token call. A codec checks its rows
        with it before it spends any work on them (blind-index terms), then calls :meth:`seal`."""
        return self._checked(lambda: Batch(self._key, table, rows, row_ids, extra, columns))

    def seal(self, batch: Batch) -> list[bytes | None]:
        """The second half of :meth:`encrypt_columns`: the values of ``batch`` sealed, flat."""
        self._seal_all(batch)
        return batch.sealed

    def _checked(self, make: Callable[[], Batch]) -> Batch:
        """``make()``; a bad row or value is one failed ``encrypt`` entry (nothing was sealed)."""
        try:
            return make()
        except errors.KeymgrError:
            with self._audited("encrypt", key=self._key):
                raise

    def _seal_all(self, batch: Batch) -> None:
        if len(batch) < BATCH_MIN_ROWS:
            for r in range(len(batch)):
                with self._audited("encrypt", key=self._key) as op:
                    self._seal_span(batch, r, r + 1, batch.values(r, r + 1), op)
            return
        for start, stop, values in batch.cuts(BATCH_VALUES):
            with self._audited("encrypt", key=self._key, detail={"rows": stop - start, "values": values}) as op:
                self._seal_span(batch, start, stop, values, op)

    def _seal_span(self, batch: Batch, start: int, stop: int, count: int, op: Operation) -> None:
        """Seal rows ``start`` to ``stop`` (``count`` values) after one check of the key's state,
        under data keys reserved for exactly those values."""
        segments = iter(self._data_keys(self._checked_record(op), count))
        if not count:
            return  # the state was checked all the same: a suspended key refuses a row of NULLs too
        nonces = _nonces(count)
        datas, prefixes, suffixes, offsets, sealed = (batch.datas, batch.prefixes, batch.suffixes, batch.offsets,
                                                      batch.sealed)
        current, left = next(segments)
        key_ref, head, seal = current.key_ref, header(current.key_ref), current.dek.encryptor()
        used = [current]
        n = 0
        for r in range(start, stop):
            suffix = suffixes[r]
            for at in range(offsets[r], offsets[r + 1]):
                data = datas[at]
                if data is None:
                    continue
                if not left:
                    current, left = next(segments)
                    key_ref, head, seal = current.key_ref, header(current.key_ref), current.dek.encryptor()
                    used.append(current)
                left -= 1
                nonce = nonces[n]
                n += 1
                sealed[at] = head + nonce + seal(nonce, data, prefixes[at] + key_ref + suffix)
        if any(segment.dek.wiped for segment in used):  # closed meanwhile: the batch is refused, as a
            raise errors.ConfigurationError("this data key was wiped")  # per-value check would have

    @staticmethod
    def _seal(current: _Current, data: bytes, prefix: bytes, suffix: bytes, nonce: bytes) -> bytes:
        return pack(current.key_ref, nonce, current.dek.seal(nonce, data, prefix + current.key_ref + suffix))

    def _checked_record(self, op: Operation) -> KeyRecord:
        """The key's record, refused unless its primary encrypts now (a suspension stops a cached
        data key at the next check: per value, row or batch). The audit entry names the primary:
        every value of the operation is sealed under a data key it wrapped (:meth:`_data_keys`),
        and a refusal names the version refused."""
        record = self._protector.keyring.get(self._key)
        op.version = record.primary
        self._protector.check_encrypts(record, provenance=False)
        return record

    def _data_keys(self, record: KeyRecord, values: int) -> list[tuple[_Current, int]]:
        """Data keys for the next ``values`` values, each with how many it seals: the current one
        up to ``max_messages`` (and while it is younger than ``max_age`` and under the primary),
        then new ones. Reserved under the lock, so concurrent batches never share a use."""
        now = self._clock()
        policy = self._policy
        out: list[tuple[_Current, int]] = []
        with self._lock:
            while values > 0:
                current = self._current
                if (current is None or current.kek_id != record.primary_version.key_id
                        or current.uses >= policy.max_messages or now - current.created >= policy.max_age):
                    current = self._current = self._new_data_key(now, record)
                take = min(values, policy.max_messages - current.uses)
                current.uses += take
                out.append((current, take))
                values -= take
        return out

    def _new_data_key(self, now: float, record: KeyRecord) -> _Current:
        """A fresh data key, wrapped in the token by ``record``'s primary (the version just checked,
        which the operation's audit entry names) and stored before any value names it. The old
        one stays in the decrypt cache (values sealed under it still open) until it ages out."""
        dek = DataKey(os.urandom(32))
        der = self._protector.wrap_der(record, dek)  # reserves a use, checks the version object
        key_ref = os.urandom(KEY_REF_SIZE)
        self._store.save(StoredKey(key_ref, self._key, der, dek.commitment))
        kek_id = read_kek_recipient(der).kek_id
        self._remember(key_ref, _Opened(dek, der, now, *self._protector.keyring.find_by_id(kek_id)))
        return _Current(key_ref, dek, kek_id, now)

    # -- decrypt ---------------------------------------------------------------

    def decrypt(self, value: bytes, place: Place) -> bytes:
        """The plaintext of a value made by :meth:`encrypt` for the same ``place``."""
        with self._audited("decrypt", key=self._key):
            return self._open(value, column_prefix(self._key, place.table, place.column),
                              row_suffix(place.row, place.extra))

    def decrypt_text(self, value: bytes, place: Place) -> str:
        return _text(self.decrypt(value, place))

    def decrypt_row(self, values: Mapping[str, bytes | None], *, table: str, row: str,
                    extra: Mapping[str, str] | None = None, text: Container[str] = ()) -> dict[str, Any]:
        """:meth:`encrypt_row` undone: columns named in ``text`` come back as ``str``. One
        audited operation; any value that fails is the one integrity error."""
        return self.decrypt_rows([(values, row)], table=table, extra=extra, text=text)[0]

    def decrypt_rows(self, rows: Sequence[tuple[Mapping[str, bytes | None], str]], *, table: str,
                     extra: Mapping[str, str] | None = None, text: Container[str] = ()) -> list[dict[str, Any]]:
        """:meth:`decrypt_row` for several rows (a lookup's candidates) as one audited operation,
        each data key checked once."""
        if extra:
            check_extra(extra)
        keys: dict[bytes, DataKey] = {}  # values share their data keys, mostly: each checked once per call
        with self._audited("decrypt", key=self._key):
            return [self._open_row(values, table, row, extra, text, keys) for values, row in rows]

    def open_candidates(self, rows: Sequence[tuple[Mapping[str, bytes | None], str]], *, probe: Collection[str],
                        accept: Callable[[dict[str, Any]], bool], table: str,
                        extra: Mapping[str, str] | None = None,
                        text: Container[str] = ()) -> tuple[list[tuple[int, dict[str, Any]]], int]:
        """A lookup's candidates in one audited operation: each row's ``probe`` columns opened
        first, and only the rows ``accept`` keeps opened whole, so a false positive costs one
        decryption. Returns (index, opened row) of each accepted row and how many rows failed
        authentication: another context's rows (another tenant's row in the same term bucket,
        which is not this caller's row) or tampered ones, dropped rather than an error for all.
        Other errors (a retired version, a rate limit) still raise."""
        if extra:
            check_extra(extra)
        keys: dict[bytes, DataKey] = {}  # checked once per call, for the probes and the rests alike
        found: list[tuple[int, dict[str, Any]]] = []
        dropped = 0
        with self._audited("decrypt", key=self._key):
            for i, (values, row) in enumerate(rows):
                try:
                    opened = self._open_row({c: v for c, v in values.items() if c in probe}, table, row, extra,
                                            text, keys)
                    if accept(opened):
                        opened.update(self._open_row({c: v for c, v in values.items() if c not in probe}, table,
                                                     row, extra, text, keys))
                        found.append((i, opened))
                except errors.IntegrityError:
                    dropped += 1
        return found, dropped

    def _open_row(self, values: Mapping[str, bytes | None], table: str, row: str, extra: Mapping[str, str] | None,
                  text: Container[str], keys: dict[bytes, DataKey]) -> dict[str, Any]:
        check_part("row", row)
        suffix = row_suffix(row, extra)
        out: dict[str, Any] = {}
        for column, value in values.items():
            plain = None if value is None else self._open(value, column_prefix(self._key, table, column), suffix, keys)
            out[column] = _text(plain) if plain is not None and column in text else plain
        return out

    def _open(self, value: bytes, prefix: bytes, suffix: bytes, keys: dict[bytes, DataKey] | None = None) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise errors.ConfigurationError(f"a sealed field value is bytes, not {type(value).__name__}")
        key_ref, nonce, sealed = unpack(bytes(value))
        dek = keys.get(key_ref) if keys is not None else None
        if dek is None:
            dek = self._opened_key(key_ref)
            if keys is not None:
                keys[key_ref] = dek
        try:
            return dek.open(nonce, sealed, prefix + key_ref + suffix)
        except errors.IntegrityError:
            raise errors.IntegrityError(FIELD_INTEGRITY) from None

    def _opened_key(self, key_ref: bytes) -> DataKey:
        now = self._clock()
        with self._lock:
            hit = self._opened.get(key_ref)
        if hit is not None and now - hit.opened < self._policy.max_age:
            try:
                self._on_unwrap(hit.record, hit.version)  # the audit's limits, then the version's state now
                self._protector.check_der(hit.der)
                return hit.dek
            except errors.PolicyError:
                self._forget(key_ref)  # perhaps rewrapped since (old version retired): read the row again
        return self._unwrap(key_ref, now)

    def _unwrap(self, key_ref: bytes, now: float) -> DataKey:
        stored = self._store.load(key_ref)
        if stored is None or stored.key != self._key:
            raise errors.IntegrityError(FIELD_INTEGRITY)
        found = self._protector.find(read_kek_recipient(stored.recipient).kek_id)
        if found is None:
            raise errors.RecipientNotFoundError(
                f"the data key of this field is wrapped by no key of token {self._protector.keyring.token.label!r}")
        if found[0].name != self._key:
            raise errors.IntegrityError(FIELD_INTEGRITY)
        dek = self._protector.unwrap_der(stored.recipient)
        if dek is None or not dek.matches(stored.commitment):
            raise errors.IntegrityError(FIELD_INTEGRITY)
        self._remember(key_ref, _Opened(dek, stored.recipient, now, *found))
        return dek

    def _remember(self, key_ref: bytes, opened: _Opened) -> None:
        with self._lock:
            self._opened[key_ref] = opened
            self._opened.move_to_end(key_ref)
            while len(self._opened) > self._policy.max_entries:
                self._opened.popitem(last=False)  # not wiped: a value may be opening with it now

    def _forget(self, key_ref: bytes) -> None:
        with self._lock:
            self._opened.pop(key_ref, None)

    # -- rotation --------------------------------------------------------------

    def rewrap(self, stored: StoredKey) -> StoredKey | None:
        """``stored`` with its data key under the key's current primary, or None when it is
        already there. The data key is checked against the row's commitment first; no value
        is read. The caller writes the row back (:meth:`KeyStore.replace`)."""
        if stored.key != self._key:
            raise errors.ConfigurationError(f"data key {stored.key_ref.hex()} belongs to key {stored.key!r}")
        found = self._protector.find(read_kek_recipient(stored.recipient).kek_id)
        if found is None:
            raise errors.RecipientNotFoundError(f"data key {stored.key_ref.hex()} is wrapped by no key of token "
                                                f"{self._protector.keyring.token.label!r}")
        if found[0].name != self._key:  # a row relabelled from another key, as _unwrap refuses it
            raise errors.IntegrityError(f"data key {stored.key_ref.hex()} is labelled {self._key!r} but wrapped by "
                                        "another key: tampered")
        with self._audited("rewrap", key=self._key):
            recipients, moves, _ = self._rewrapper.recipients([stored.recipient], stored.commitment)
        if not moves:
            return None
        self._forget(stored.key_ref)
        return StoredKey(stored.key_ref, stored.key, recipients[0], stored.commitment)

    def renew(self) -> None:
        """Seal the next value under a fresh data key (a re-encryption pass starts with one, so
        no value it writes names a data key from before it)."""
        with self._lock:
            self._current = None

    def close(self) -> None:
        """Wipe every data key held (the current one and the opened ones)."""
        with self._lock:
            for opened in self._opened.values():
                opened.dek.wipe()
            self._opened.clear()
            if self._current is not None:
                self._current.dek.wipe()
            self._current = None


def _nonces(count: int) -> list[bytes]:
    """``count`` random 96-bit nonces. Many at once are cut from one ``os.urandom`` read made for
    this batch alone: bytes no other call gets and no buffer kept (so nothing a fork could
    share), the guarantee :func:`random_nonce` gives, at one system call per batch."""
    if count < _BULK_NONCES:
        return [random_nonce() for _ in range(count)]
    pool = os.urandom(NONCE_SIZE * count)
    return [pool[at:at + NONCE_SIZE] for at in range(0, len(pool), NONCE_SIZE)]


def _text(plain: bytes) -> str:
    try:
        return plain.decode()
    except UnicodeDecodeError:
        raise errors.IntegrityError(FIELD_INTEGRITY) from None
