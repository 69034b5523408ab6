"""This machine's advisory locks on things that live in a token.

A lock file in this machine's TMPDIR protects nothing on another machine, so
no correctness across hosts rests on these locks: shared token state is made
of write-once facts (DESIGN.md, "Many hosts on one token"; keymgr.keyring.store),
and singleton keys tolerate the duplicates racing hosts make
(:func:`keymgr.hsm.objects.ensure_singleton_key`). The locks only spare work
between processes of one host: one first MAC key instead of one per process,
one automatic rotation instead of one per process.
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
from keymgr.files import os_error_reason
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
