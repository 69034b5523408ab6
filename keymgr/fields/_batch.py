"""Rows of field values checked and laid out flat, ready for :meth:`FieldCipher.encrypt_rows`.

A bulk insert seals thousands of values at once. Checking every row first (row identity,
extra context, table and column names, each value ``str`` or ``bytes``) makes a batch all or
nothing: a bad row k raises before any value is sealed or any data key made. The layout is a
few flat lists (plaintexts, AAD prefixes, results) and one AAD suffix per row rather than a
tuple or dict per value: a batch of 5,000 rows held that many small containers alive at once,
and the garbage collector's passes over them cost more (~5 µs a row) than the sealing saved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from keymgr import errors
from keymgr.fields._format import MAX_PART, check_extra, check_part, column_prefix, row_suffix

__all__ = ["Batch", "plain"]

_SURROGATE = "a text field value is not valid Unicode (a lone surrogate)"


def plain(value: object) -> bytes:
    """A field value as the bytes to seal: text is UTF-8; anything but str or bytes is refused
    (``bytes(5)`` would be five zero bytes) without showing it."""
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError:  # a lone surrogate; the error would carry the whole text
            raise errors.ConfigurationError(_SURROGATE) from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise errors.ConfigurationError(f"a field value is str or bytes, not {type(value).__name__}")


class Batch:
    """Checked rows: for row ``r``, its values sit at positions ``offsets[r]`` to
    ``offsets[r + 1]`` of ``datas`` (plaintext or None), ``prefixes`` (the column's AAD prefix),
    ``sealed`` (filled by the cipher) and ``names`` (the column names, in the row's order)."""

    __slots__ = ("names", "suffixes", "offsets", "prefixes", "datas", "sealed")

    def __init__(self, key: str, table: str, rows: Sequence[Mapping[str, object]], row_ids: Sequence[str],
                 extra: Mapping[str, str] | None = None, columns: Sequence[str] | None = None) -> None:
        """``columns``: read exactly these from every row (absent is None); without it, each
        row's own keys, in its order."""
        if len(rows) != len(row_ids):
            raise errors.ConfigurationError("one row identity per row")
        if extra:
            check_extra(extra)
        self.suffixes = [row_suffix(_checked_row(row_id), extra) for row_id in row_ids]
        known: dict[str, bytes] = {}  # one AAD prefix per column, computed once per batch

        def prefix(column: str) -> bytes:
            found = known.get(column)
            if found is None:
                found = known[column] = column_prefix(key, table, column)
            return found

        if columns is not None:
            shared = tuple(columns)
            width = len(shared)
            self.names: list[str] = list(shared) * len(rows)
            self.offsets = list(range(0, width * len(rows) + 1, width))
            self.prefixes = [prefix(column) for column in shared] * len(rows)
            try:  # text encoded inline (the common case): plain() per value is a call a value
                self.datas = [None if (value := row.get(column)) is None
                              else value.encode() if value.__class__ is str else plain(value)
                              for row in rows for column in shared]
            except UnicodeEncodeError:  # a lone surrogate; the error would carry the whole text
                raise errors.ConfigurationError(_SURROGATE) from None
        else:
            # names and values from one pass over items(): a mapping whose keys() order differs from
            # its values() order must not put a value under another column's binding
            pairs = [list(row.items()) for row in rows]
            self.names = [column for items in pairs for column, _ in items]
            self.offsets = [0]
            for items in pairs:
                self.offsets.append(self.offsets[-1] + len(items))
            self.prefixes = [prefix(column) for column in self.names]
            self.datas = [None if value is None else plain(value) for items in pairs for _, value in items]
        self.sealed: list[bytes | None] = [None] * len(self.datas)

    def __len__(self) -> int:
        return len(self.suffixes)

    def __repr__(self) -> str:  # never a value
        return f"Batch({len(self)} rows, {len(self.datas)} values)"

    def values(self, start: int = 0, stop: int | None = None) -> int:
        """How many values (not None) rows ``start`` to ``stop`` hold."""
        stop = len(self) if stop is None else stop
        return sum(data is not None for data in self.datas[self.offsets[start]:self.offsets[stop]])

    def cuts(self, most: int) -> Iterator[tuple[int, int, int]]:
        """``(start, stop, values)`` spans of rows with at most ``most`` values each (a row is never
        split; a row with more is a span of its own)."""
        total = self.values()
        if total <= most:  # the common case, one span: without counting row by row
            if len(self):
                yield 0, len(self), total
            return
        start, count = 0, 0
        for r in range(len(self)):
            here = self.values(r, r + 1)
            if r > start and count + here > most:
                yield start, r, count
                start, count = r, 0
            count += here
        if len(self):
            yield start, len(self), count

    def rows(self) -> list[dict[str, bytes | None]]:
        """The sealed values as one dict per row (column → value or None)."""
        names, sealed, offsets = self.names, self.sealed, self.offsets
        return [dict(zip(names[offsets[r]:offsets[r + 1]], sealed[offsets[r]:offsets[r + 1]], strict=True))
                for r in range(len(self))]


def _checked_row(row_id: str) -> str:
    if row_id.__class__ is str and 0 < len(row_id) <= MAX_PART and row_id.isascii():
        return row_id  # ASCII: as many UTF-8 bytes as characters, no lone surrogate (a UUID's text)
    check_part("row", row_id)
    return row_id
