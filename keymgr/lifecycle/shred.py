"""Crypto-shredding: destroy a key version's token object, so data only it protects is gone.

Destruction cannot be undone, so :func:`destroy` is the most guarded
operation keymgr has, in this order (nothing is spent before a refusal):

1. policy: the primary is never destroyed (rotate first); the version's state must
   allow it (:data:`keymgr.lifecycle.rotation.TRANSITIONS`: not from *active*);
2. remaining data: with ``paths``, every envelope under them (files, directories
   recursively) that still names the version is counted (:mod:`keymgr.envelope.inspect`:
   recipients only, no token, no payload) and a non-zero count refuses unless ``force``;
3. the gate: :func:`keymgr.custody.authorize.authorize_destroy`: M distinct custodians'
   approvals of exactly this request where a quorum policy covers the key (an approval
   presented twice counts once), otherwise the caller's explicit confirmation.

Then, with SIGINT / SIGTERM held until the caller has recorded it (:mod:`keymgr.interrupts`),
the record is written with the version *destroyed* (the commit: from here nothing decrypts
under it, by policy), the object is destroyed and the request is consumed (a request works
once). A crash between the first two leaves an object that the record calls destroyed:
:func:`keymgr.lifecycle.rotation.orphans` lists it and the next rotate, or destroy called again, removes
it; a crash before the request is consumed leaves a request that can only ask for this
destroy again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from keymgr import errors, interrupts
from keymgr.custody.approvals import Approval, Request
from keymgr.custody.authorize import authorize_destroy, key_ceremony_transcript
from keymgr.envelope.inspect import inspect_file
from keymgr.hsm import objects
from keymgr.keyring.store import KeyRecord, Keyring, KeyVersion
from keymgr.lifecycle import rotation

__all__ = ["DestroyResult", "EnvelopeCount", "count_envelopes_needing", "destroy"]


@dataclass(frozen=True)
class EnvelopeCount:
    """What a scan of paths found: envelopes in all, those needing the version, their paths."""

    envelopes: int
    needing: tuple[str, ...]
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True)
class DestroyResult:
    """What :func:`destroy` did: the record after it, the scan, who approved, the transcript."""

    record: KeyRecord
    version: int
    scan: EnvelopeCount | None
    approvers: tuple[str, ...]
    transcript: bytes | None = None


def _files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[str, bool]]:
    """(path, checkable) for every file under ``paths``, walked as ``keymgr rewrap`` walks them
    (:func:`keymgr.rewrap.bulk.walk`). Not checkable, and so refusing the destroy: a directory
    that cannot be listed, a symbolic link (not followed), anything but a regular file (a FIFO
    would block the read). Skipping them quietly could destroy a key that data still needs.
    Like ``keymgr rewrap``'s walk, it deletes temporary files a dead rewrap left behind."""
    from keymgr.rewrap.bulk import Summary, walk

    given = [Path(path) for path in paths]
    for root in given:
        if not root.exists() and not root.is_symlink():
            raise errors.ConfigurationError(f"{root}: no such file or directory")
    for item in walk(given, Summary()):
        if not isinstance(item, str):
            yield item.path, False
            continue
        try:
            regular = stat.S_ISREG(os.stat(item).st_mode)
        except OSError:
            regular = False
        yield item, regular


def count_envelopes_needing(paths: Iterable[str | os.PathLike[str]], key_id: bytes) -> EnvelopeCount:
    """Count the envelopes under ``paths`` whose recipients name ``key_id``. Files that are not
    envelopes are ignored; ones that start like an envelope but cannot be parsed, and files
    and directories that could not be checked (:func:`_files`), are listed as unreadable
    (and refuse destruction like a needing one: they may well need it)."""
    envelopes, needing, unreadable = 0, [], []
    for path, checkable in _files(paths):
        if not checkable:
            unreadable.append(path)
            continue
        try:
            info = inspect_file(path)
        except (errors.FormatError, errors.ConfigurationError):
            unreadable.append(path)
            continue
        if info is None:
            continue
        envelopes += 1
        if info.needs(key_id):
            needing.append(path)
    return EnvelopeCount(envelopes, tuple(needing), tuple(unreadable))


#: How long a version must have stopped being the primary (or, never activated, have existed)
#: before it may be destroyed. Other hosts see a new primary only at their next keyring refresh
#: (keymgr.keyring.store: 1 s by default); until then they may still encrypt under the old one, and a
#: destroy inside that window would make what they wrote unreadable. Measured on the writers'
#: clocks, so it also absorbs clock skew; far longer than any refresh interval.
SETTLE = rotation.SETTLE


def destroy(keyring: Keyring, name: str, version: int, *, paths: Sequence[str | os.PathLike[str]] = (),
            request: Request | None = None, approvals: Sequence[Approval] = (), confirmed: bool = False,
            force: bool = False, transcript: bool = False, immediately: bool = False) -> DestroyResult:
    """Destroy ``version`` of key ``name`` (module docstring: the checks and their order).
    ``immediately`` skips the wait for other hosts (:data:`SETTLE`): for one host, or once every
    host is known to have seen the newer primary."""
    keyring.reload()
    record = keyring.get(name)
    target = record.version(version)
    # destroyed by the facts, yet its object is on the token: a destroy that crashed after its
    # commit, or a forged fact. Finishing it takes every check a destroy takes (it cannot tell which)
    finishing = target.state == "destroyed"
    if finishing and not objects.key_exists(keyring.token, target.key_id):
        raise errors.PolicyError(f"key {name!r} version {version} is already destroyed")
    if not finishing:
        rotation.check_transition(record, target, "destroyed")
    if not immediately:
        rotation.check_settled(keyring, record, target, "Destroy")
    scan = count_envelopes_needing(paths, target.key_id) if paths else None
    if scan is not None and (scan.needing or scan.unreadable) and not force:
        raise errors.PolicyError(
            f"{len(scan.needing)} envelope(s) under the given paths still need key {name!r} version {version}"
            + (f" and {len(scan.unreadable)} file(s) could not be checked (unreadable, not a regular file, "
               "or a symbolic link, which is not followed)" if scan.unreadable else "")
            + ": rewrap them first (keymgr rewrap PATH) or pass --force to make them unreadable for good")
    with interrupts.commit_scope():
        return _commit(keyring, record, target, scan, request=request, approvals=approvals, confirmed=confirmed,
                       force=force, transcript=transcript, finishing=finishing)


def _commit(keyring: Keyring, record: KeyRecord, target: KeyVersion, scan: EnvelopeCount | None, *,
            request: Request | None, approvals: Sequence[Approval], confirmed: bool, force: bool,
            transcript: bool, finishing: bool) -> DestroyResult:
    """Check the approvals, then (signals held: :mod:`keymgr.interrupts`) spend them, record the
    version destroyed, destroy its object and sign the transcript: an interrupt before spends and
    destroys nothing, one after waits until the caller has recorded the destroy. ``finishing``:
    the facts already say destroyed (a destroy stopped after its commit, or a forged fact)."""
    name, version = record.name, target.version
    auth = authorize_destroy(keyring, name, [version], request=request, approvals=approvals, confirmed=confirmed,
                             consume=False)
    interrupts.hold_signals()
    if not finishing:
        record = rotation.record_destroyed(keyring, name, version)
    objects.destroy_key(keyring.token, target.key_id)
    if auth is not None:  # after the destroy: a kill before it leaves a request that can only ask for it again
        auth.consume(keyring)
    signed = None
    if transcript:
        needing = None if scan is None else len(scan.needing)
        signed = key_ceremony_transcript(keyring, "destroy", record, versions=[version], auth=auth, forced=force,
                                         envelopes_needing=needing)
    return DestroyResult(record, version, scan, auth.approvers if auth else (), signed)
