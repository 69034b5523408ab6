"""The data-key table: each field data key, wrapped by the token's KEK, stored once.

A row is ``(key_ref, key name, recipient, commitment)``: ``recipient`` is the DER of the
standard CMS ``KEKRecipientInfo`` (RFC 5652 6.2.3) a message would carry (the KEK version's
CKA_ID, the key-encryption algorithm, the wrapped data key), ``commitment`` the data key's
HKDF commitment (:func:`keymgr.envelope._aead.key_commitment`), checked after every unwrap.
The row holds nothing secret: the data key is only ever in it wrapped.

Stores: :class:`MemoryKeyStore` (tests, short-lived data) and the database table of
:mod:`keymgr.fields.sql`. A store must make a row durable before :meth:`save` returns:
a value naming a key_ref whose row was lost would be lost with it. A row no value names (the
insert that used it rolled back) is harmless garbage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["StoredKey", "KeyStore", "MemoryKeyStore"]


@dataclass(frozen=True)
class StoredKey:
    """One wrapped field data key (no secret in it)."""

    key_ref: bytes
    key: str
    recipient: bytes
    commitment: bytes

    def __repr__(self) -> str:
        return f"StoredKey({self.key_ref.hex()}, key={self.key!r})"


class KeyStore(Protocol):
    """Where wrapped field data keys live."""

    def load(self, key_ref: bytes) -> StoredKey | None: ...

    def save(self, stored: StoredKey) -> None:
        """Store a new row, durably, before any value that names it is written."""

    def replace(self, stored: StoredKey) -> None:
        """Overwrite the recipient of an existing row (rewrap); atomic per row."""

    def delete(self, key: str, key_refs: Iterable[bytes]) -> int:
        """Delete these rows of ``key`` (old data keys no value names any more); how many went."""

    def scan(self, key: str, *, after: bytes = b"", limit: int = 1000) -> list[StoredKey]:
        """Rows of ``key`` with key_ref > ``after``, in key_ref order (a resumable walk)."""


class MemoryKeyStore:
    """A :class:`KeyStore` in memory: for tests and data that lives no longer than the process."""

    def __init__(self) -> None:
        self._rows: dict[bytes, StoredKey] = {}
        self._lock = threading.Lock()

    def load(self, key_ref: bytes) -> StoredKey | None:
        return self._rows.get(key_ref)

    def save(self, stored: StoredKey) -> None:
        with self._lock:
            self._rows[stored.key_ref] = stored

    def replace(self, stored: StoredKey) -> None:
        with self._lock:
            self._rows[stored.key_ref] = stored

    def delete(self, key: str, key_refs: Iterable[bytes]) -> int:
        with self._lock:
            gone = [ref for ref in key_refs if ref in self._rows and self._rows[ref].key == key]
            for ref in gone:
                del self._rows[ref]
        return len(gone)

    def scan(self, key: str, *, after: bytes = b"", limit: int = 1000) -> list[StoredKey]:
        rows = sorted((r for r in self._rows.values() if r.key == key and r.key_ref > after), key=lambda r: r.key_ref)
        return rows[:limit]

    def __iter__(self) -> Iterator[StoredKey]:
        return iter(list(self._rows.values()))

    def __len__(self) -> int:
        return len(self._rows)
