"""Fixtures shared by the field tests that need a real database server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests._postgres import TempPostgres, missing_reason


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    """One throwaway PostgreSQL server for the session (tests/_postgres.py); skipped where none can
    run, unless KEYMGR_REQUIRE_INTEROP=1 (scripts/test.sh), which makes that a failure."""
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("KEYMGR_REQUIRE_INTEROP") == "1":
            pytest.fail(f"KEYMGR_REQUIRE_INTEROP=1 but {reason}")
        pytest.skip(reason)
    with TempPostgres(durable=False) as server:
        yield server
