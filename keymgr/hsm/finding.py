"""Finding token objects while other processes and hosts destroy some of them.

Every host of a fleet compacts the keyring and sweeps objects on the one token, so an object
a C_FindObjects returned may be gone by the time its attributes are read. python-pkcs11 reads
each found object's class as it hands it out, and one vanished object then loses the rest of
its C_FindObjects batch: :func:`find_objects` looks again, one object per C_FindObjects,
skipping only the objects that are gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import Attribute

__all__ = ["find_objects"]

#: python-pkcs11's find operation, used directly to choose the batch size of C_FindObjects.
_SearchIter: Any = getattr(import_module("pkcs11._pkcs11"), "SearchIter")  # noqa: B009 - not in its stubs


def find_objects(session: pkcs11.Session, template: Mapping[Attribute, Any]) -> list[Any]:
    """Every object matching ``template`` that still exists when it is looked at.

    An object destroyed after the find is gone either way, so skipping it is the answer a find
    made a moment later would give. (Starting the whole scan over, as keymgr did before, failed
    on a token where eight hosts compacted at once: every retry met another vanished object.)
    The first try is one ordinary find; only a scan that met a vanished object pays one
    C_FindObjects per object."""
    try:
        return list(session.get_objects(dict(template)))
    except p11x.ObjectHandleInvalid:
        pass
    found: list[Any] = []
    with _SearchIter(session, dict(template), 1) as search:
        for batch in search:
            try:
                found.extend(batch)
            except p11x.ObjectHandleInvalid:
                continue
    return found
