"""The one door from tests into a KeyManager's private parts.

Applications and the CLI use only the public API (``km.token_info``, ``km.custody``, ...);
tests also plant, forge and inspect token objects and keyring facts below it. They do so
through these functions, so the private names are spelled in one place (the CLI test
checks that ``keymgr.cli`` never spells them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keymgr.audit import Operation
from keymgr.hsm import TokenSession
from keymgr.keyring.store import Keyring
from keymgr.manager import KeyManager

__all__ = ["audited", "keyring_of", "token_of"]


def token_of(km: KeyManager) -> TokenSession:
    """``km``'s open token session (raises ConfigurationError once ``km`` is closed)."""
    return km._token  # noqa: SLF001 - the tests' one door


def keyring_of(km: KeyManager) -> Keyring:
    """``km``'s keyring, unchecked by any lifecycle rule: for planting and inspecting facts."""
    return km._keyring  # noqa: SLF001


def audited(km: KeyManager, op: str, *, key: str | None = None, version: int | None = None,
            detail: Mapping[str, Any] | None = None) -> Operation:
    """An operation recorded in ``km``'s audit log, as its own methods record theirs."""
    return km._audited(op, key=key, version=version, detail=detail)  # noqa: SLF001
