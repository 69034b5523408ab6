"""This machine's advisory locks on things that live in a token.

PKCS#11 has no locks and no compare-and-swap: two processes that both find a
singleton object missing (the keyring's metadata MAC key, the audit key) both
create it, and a token then holds two keys under one CKA_ID, which every later
lookup refuses (measured: four processes opening a fresh SoftHSM token at
once left three such keys in one run of four). Writers on one machine
serialise on an flock per (token, name) instead. Processes on different
machines sharing a network HSM are not covered: those rely on the keyring's
generation check, and a fresh token's first use should come from one process.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keymgr import errors
from keymgr._files import os_error_reason
from keymgr.hsm.sessions import TokenSession

__all__ = ["token_lock"]


@contextmanager
def token_lock(ts: TokenSession, name: str) -> Iterator[None]:
    """Hold this machine's (and user's) advisory lock on ``name`` of token ``ts``; blocks until free."""
    tag = hashlib.sha256(f"{ts.serial}\x00{ts.label}\x00{name}".encode()).hexdigest()[:32]
    folder = Path(tempfile.gettempdir()) / f"keymgr-locks-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise errors.ConfigurationError(f"lock directory {folder} is not a directory of this user; remove it")
        fd = os.open(folder / f"{tag}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise errors.StorageError(f"cannot take keymgr's lock in {folder} ({os_error_reason(exc)}); "
                                  "TMPDIR must name a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
