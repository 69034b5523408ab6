"""The examples in examples/ run as a user would run them, each in a fresh process and a fresh local token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "KEYMGR_TOKEN", "KEYMGR_AUDIT_LOG")}
    env.update({"KEYMGR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)})
    result = subprocess.run([sys.executable, str(example)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_there_are_examples() -> None:
    assert EXAMPLES
