"""Canonical JSON, the encoding of every custody document keymgr signs, MACs or hashes.

Canonical here means: keys sorted, no insignificant whitespace, ASCII only
(``\\uXXXX`` escapes), as ``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=True)`` writes it. Documents are parsed, checked field by field,
and re-encoded before their bytes are signed or compared, so formatting never
matters and any change of content does.
"""

from __future__ import annotations

import json
from typing import Any

from keymgr import errors

__all__ = ["canonical", "load_document"]


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def load_document(data: bytes, what: str, *, format: str, limit: int) -> dict[str, Any]:  # noqa: A002
    """A JSON object of the given ``format`` (field ``"format"``); FormatError for anything else."""
    if len(data) > limit:
        raise errors.FormatError(f"{what}: larger than {limit} bytes")
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise errors.FormatError(f"{what}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != format:
        raise errors.FormatError(f"{what}: not a {format} document")
    return doc
