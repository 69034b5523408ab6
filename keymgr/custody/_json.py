"""Reading custody documents (requests, approvals, backups, transcripts): strict JSON objects.

They are written as canonical JSON (:func:`keymgr._canonical.canonical_json`);
a document read back is parsed here, checked field by field by its module, and
encoded again before its bytes are signed or compared. NaN and infinities are
refused on the way in, as canonical JSON refuses them on the way out.
"""

from __future__ import annotations

import json
from typing import Any

from keymgr import errors

__all__ = ["load_document"]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_document(data: bytes, what: str, *, format: str, limit: int) -> dict[str, Any]:  # noqa: A002
    """A JSON object of the given ``format`` (field ``"format"``); FormatError for anything else."""
    if len(data) > limit:
        raise errors.FormatError(f"{what}: larger than {limit} bytes")
    try:
        doc = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise errors.FormatError(f"{what}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != format:
        raise errors.FormatError(f"{what}: not a {format} document")
    return doc
