"""What an encrypted column gives back (:class:`Stored`) and what a save writes (the markers).

A sealed or term column takes only a value of one of the marker types below, which only the
fields' ``pre_save`` makes: anything else (a plaintext, a term read from another row, a NULL
given to ``update()``) is refused by the column before it becomes a query parameter.
"""

from __future__ import annotations

from typing import Any

from keymgr.fields.index import Term


class Stored:
    """A value as read from an encrypted column: sealed, with the row it was read for (bound when
    the instance is made), and its plaintext once opened. ``values()`` and ``values_list()``
    return these, never plaintext."""

    __slots__ = ("sealed", "row", "db", "plain")

    def __init__(self, sealed: bytes, row: str | None = None, db: str | None = None) -> None:
        self.sealed = sealed
        self.row = row
        self.db = db  # the database alias it was read from: unchanged only when written back there
        self.plain: str | bytes | None = None

    def __repr__(self) -> str:
        return f"Stored({len(self.sealed)} bytes)"

    def __getstate__(self) -> tuple[bytes, str | None, str | None]:  # a pickled instance carries no plaintext
        return self.sealed, self.row, self.db

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.sealed, self.row = state[0], state[1]
        self.db = state[2] if len(state) > 2 else None  # pickled before the alias was kept: re-sealed at a save
        self.plain = None


class Sealed(bytes):
    """What :meth:`EncryptedField.pre_save` returns: the only kind of value the column takes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Sealed({len(self)} bytes)"


class SavedTerm(Term):
    """What :meth:`BlindIndexField.pre_save` returns (the instance keeps a plain :class:`Term`):
    the only term a write takes, so a term read from another row cannot be written to this one."""

    __slots__ = ()


class SavedNull:
    """What ``pre_save`` returns for NULL: a write of NULL that ``save()`` computed, told apart
    from ``update(email=None)``, which would leave a source and its blind index out of step."""

    def __repr__(self) -> str:
        return "SavedNull"


NULL = SavedNull()
