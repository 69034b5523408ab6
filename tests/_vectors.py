"""Published test vectors, loaded from data files (never pasted into code).

Vectors ship with the repository in ``tests/vectors`` (``wycheproof/README.md``
there names their source, commit and licence), so a fresh clone on a fresh
machine runs them; ``$KEYMGR_VECTORS`` points the suite at another copy. A
missing file fails the test that asked for it: vectors that silently skip are
vectors nobody runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parents[1]


def vectors_dir() -> Path:
    return Path(os.environ.get("KEYMGR_VECTORS") or _REPO / "tests" / "vectors")


def load_wycheproof(name: str) -> dict[str, Any]:
    """The Wycheproof file ``wycheproof/<name>.json`` (e.g. ``aes_gcm_test``), parsed."""
    path = vectors_dir() / "wycheproof" / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"Wycheproof vectors missing: {path} (set KEYMGR_VECTORS to the vectors directory)")
    with path.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def wycheproof_cases(name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(group, test) pairs of a Wycheproof file, for parametrisation."""
    return [(group, test) for group in load_wycheproof(name)["testGroups"] for test in group["tests"]]
