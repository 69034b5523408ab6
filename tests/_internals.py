"""The one door from tests into a KeyManager's private parts.

Applications and the CLI use only the public API (``km.token_info``, ``km.custody``, ...);
tests also plant, forge and inspect token objects and keyring facts below it. They do so
through these functions, so the private names are spelled in one place (the CLI test
checks that ``keymgr.cli`` never spells them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from keymgr.audit import Operation
from keymgr.hsm import TokenSession
from keymgr.keyring.store import Keyring
from keymgr.manager import KeyManager

__all__ = ["audited", "clocked", "keyring_of", "token_of"]


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


def clocked(km: KeyManager, *, clock: Callable[[], float] | None = None,
            wall_clock: Callable[[], str] | None = None) -> KeyManager:
    """``km`` with test clocks, given before its first operation: ``clock`` (monotonic seconds)
    for its rate limits and data-key caches, ``wall_clock`` (UTC text) for its keyring, which
    dates versions and ends cryptoperiods. KeyManager takes no clock: no caller of the library
    can make a key look younger or a rate window emptier than it is."""
    if wall_clock is not None:
        km._keyring_unchecked._clock = wall_clock  # noqa: SLF001
    if clock is not None:
        for part in (km._audit._limiter, km._encrypt_cache, km._decrypt_cache):  # noqa: SLF001
            if part is not None:
                part._clock = clock  # noqa: SLF001
    return km
