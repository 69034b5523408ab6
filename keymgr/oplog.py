"""Operator logging: what keymgr tells the people who run it, through stdlib :mod:`logging`.

Everything goes to the ``"keymgr"`` logger and four children with stable names (they do not
follow the module layout, which may move): ``keymgr.hsm`` (session reopens, logins,
module re-initialisations), ``keymgr.keyring`` (refreshes, compaction, sweeps, provenance
refusals), ``keymgr.cache`` (data-key cache evictions), ``keymgr.audit`` (the audit log
failing closed and recovering). DEBUG is for what keymgr handled by itself, WARNING for
what an operator must act on. docs/deployment.md ("Operator logging") lists every event.

Never a secret in a record: no PIN, key bytes, share, plaintext or MAC value; CKA_IDs,
labels, key names, counts and timings only. Messages built per operation are guarded by
``isEnabledFor``, so logging that is off costs the per-message path nothing.

keymgr gives the ``"keymgr"`` logger a :class:`logging.NullHandler` (the library
convention): an application that configures no logging sees nothing, not even WARNINGs on
stderr. The CLI sends records to stderr when ``KEYMGR_LOG`` names a level (:func:`from_env`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["ROOT", "hsm", "keyring", "cache", "audit", "warn_once", "from_env", "ENV_VAR"]

ROOT = logging.getLogger("keymgr")
hsm = logging.getLogger("keymgr.hsm")
keyring = logging.getLogger("keymgr.keyring")
cache = logging.getLogger("keymgr.cache")
audit = logging.getLogger("keymgr.audit")

#: The CLI's switch: ``KEYMGR_LOG=debug keymgr key rotate orders`` prints keymgr's records on stderr.
ENV_VAR = "KEYMGR_LOG"

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()
_WARNED_MAX = 10_000  # a bound on memory, should something be warned about per object forever


def warn_once(logger: logging.Logger, what: str, message: str, *args: object) -> None:
    """A WARNING the first time ``what`` (a label, a CKA_ID) is seen in this process, DEBUG after:
    a forged object that stays on the token is found again on every refresh (once a second), and
    one warning an operator can act on beats a log that repeats it forever."""
    key = (logger.name, what)
    with _warned_lock:
        first = key not in _warned
        if first and len(_warned) < _WARNED_MAX:
            _warned.add(key)
    logger.log(logging.WARNING if first else logging.DEBUG, message, *args)


def from_env() -> None:
    """Route the ``keymgr`` logger to stderr at the level ``KEYMGR_LOG`` names (``debug``,
    ``info``, ``warning``, ``error``); nothing when it is unset. An unknown level is ignored
    with one line on stderr rather than failing the command."""
    name = os.environ.get(ENV_VAR, "").strip().upper()
    if not name:
        return
    level = logging.getLevelNamesMapping().get(name)
    if level is None:
        print(f"keymgr: {ENV_VAR}={name.lower()!r} is no log level (debug, info, warning, error); ignored",
              file=sys.stderr)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("keymgr: %(levelname)s %(name)s: %(message)s"))
    ROOT.addHandler(handler)
    ROOT.setLevel(level)


ROOT.addHandler(logging.NullHandler())
