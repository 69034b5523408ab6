"""The ciphers and blind indexes the Django fields name (:func:`register`).

A field holds a name (``cipher="customers"``, ``index="customers-email"``), not the object: it
deconstructs into migrations as a plain string, and the KeyManager can be opened (and the
objects registered) after the models are imported.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from keymgr import errors
from keymgr.fields.cipher import FieldCipher
from keymgr.fields.index import BlindIndex

_lock = threading.Lock()
_ciphers: dict[str, FieldCipher] = {}
_indexes: dict[str, BlindIndex] = {}


def register(*, ciphers: Mapping[str, FieldCipher] | None = None, indexes: Mapping[str, BlindIndex] | None = None
             ) -> None:
    """Name the :class:`FieldCipher` and :class:`BlindIndex` objects the fields use (``cipher="..."``,
    ``index="..."``); a name registered again is replaced (a new KeyManager after a restart)."""
    for name, cipher in (ciphers or {}).items():
        if not isinstance(cipher, FieldCipher):
            raise errors.ConfigurationError(f"cipher {name!r} is a FieldCipher (km.fields(...)), "
                                            f"not {type(cipher).__name__}")
    for name, index in (indexes or {}).items():
        if not isinstance(index, BlindIndex):
            raise errors.ConfigurationError(f"index {name!r} is a BlindIndex (km.blind_index(...)), "
                                            f"not {type(index).__name__}")
    with _lock:
        _ciphers.update(ciphers or {})
        _indexes.update(indexes or {})


def registered_cipher(name: str) -> FieldCipher:
    """The cipher registered as ``name`` (a field's ``cipher=``)."""
    return _registered("cipher", _ciphers, name)  # type: ignore[no-any-return]


def registered_index(name: str) -> BlindIndex:
    """The blind index registered as ``name`` (a field's ``index=``)."""
    return _registered("index", _indexes, name)  # type: ignore[no-any-return]


def _registered(kind: str, table: Mapping[str, Any], name: str) -> Any:
    with _lock:
        found = table.get(name)
    if found is None:
        raise errors.ConfigurationError(f"no {kind} registered as {name!r}: call "
                                        f"keymgr.fields.django.register({kind}s={{{name!r}: ...}}) first")
    return found
