"""Canonical JSON: the one encoding of every document whose bytes keymgr MACs, signs or hashes.

Keyring facts and snapshots (MACed in the token), audit entries (hash chain and
MAC), custody documents (the register, approval requests and signatures, backup
files, ceremony transcripts) all go through :func:`canonical_json`. Readers
parse a document, check it, and encode it again before they compare or verify,
so formatting never matters and any change of content does.

Canonical here means: keys sorted, no insignificant whitespace, ASCII only
(``\\uXXXX`` escapes), NaN and infinities refused (they are not JSON, RFC 8259
section 6). These are the bytes the three encoders this one replaced wrote for
every document keymgr makes (none holds a float that is not finite), so MACs,
signatures and logs made before still verify; ``tests/test_canonical.py``
checks the old encoders against this one.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(data: Any) -> bytes:
    """``data`` as canonical JSON bytes; :class:`ValueError` for NaN or an infinity, :class:`TypeError`
    for anything JSON cannot hold."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")
