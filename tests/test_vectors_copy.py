"""The vectors shipped in tests/vectors are the team's shared copy, byte for byte.

The suite reads its own copy (a clone anywhere must run them); where the shared
vectors stand beside the checkout (``../shared/vectors``, as on our machines and
in CI), every shipped file must equal its original, so the copy cannot drift.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_SHARED = _REPO.parent / "shared" / "vectors" / "wycheproof"
_SHIPPED = _REPO / "tests" / "vectors" / "wycheproof"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_shared_vector_file_is_shipped_unchanged() -> None:
    if not _SHARED.is_dir():
        pytest.skip(f"no shared vectors beside this checkout ({_SHARED})")
    shared = {p.name: _digest(p) for p in _SHARED.iterdir() if p.suffix == ".json"}
    shipped = {p.name: _digest(p) for p in _SHIPPED.iterdir() if p.suffix == ".json"}
    assert shared, "the shared vectors directory holds no JSON files"
    assert shipped == shared
