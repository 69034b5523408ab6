"""KeyManager: the safe API that applications use.

::

    with keymgr.KeyManager() as km:                  # the embedded local token
        km.create_key("orders")
        blob = km.encrypt(b"card 4111...", key="orders", context={"tenant": "acme"})
        km.decrypt(blob, context={"tenant": "acme"})

A ``KeyManager`` is bound to one token (named by an RFC 7512 URI, or the
embedded SoftHSM token when none is given). It is safe to share between
threads, but token calls are serialised per module underneath: processes, not
threads, add throughput (:class:`KeyManager`, "Threads").
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from keymgr import errors, interrupts
from keymgr.audit import AuditLog, Operation, RateLimit, resolve_audit
from keymgr.audit._config import ENV_VAR, audit_is_off, default_token_log, record_audit_off
from keymgr.audit._guard import AuditGuard
from keymgr.envelope import DataKey, decrypt_stream, encrypt_stream, open_message, seal_message
from keymgr.envelope._attrs import checked_context
from keymgr.envelope.cache import CachePolicy, DecryptCache, EncryptCache
from keymgr.envelope.recipients import RecipientLike, load_recipient_info
from keymgr.hsm import Capabilities, PinCallback, Pkcs11Uri, TokenSession, objects, open_token, probe
from keymgr.hsm.templates import DEFAULT_PROFILE
from keymgr.keyring.facts import check_policy
from keymgr.keyring.provenance import VersionCheck, check_version, untrusted_keys
from keymgr.keyring.store import KeyPolicy, KeyRecord, Keyring
from keymgr.lifecycle import rotation
from keymgr.lifecycle.usage import UsageMeter
from keymgr.recipients.kek import KekProtector, KeyRecipient, Recipient
from keymgr.rewrap.message import Rewrapper, RewrapResult

if TYPE_CHECKING:
    from keymgr.custody.approvals import Approval, Request
    from keymgr.custody.backup_file import BackupFile
    from keymgr.custody.ceremony import BackupResult, RestoreResult
    from keymgr.custody.custodian_token import CustodianToken
    from keymgr.custody.facade import Custody
    from keymgr.fields.cipher import FieldCipher
    from keymgr.fields.index import BlindIndex, Normaliser
    from keymgr.fields.keys import KeyStore
    from keymgr.fields.subkeys import SubkeyPolicy
    from keymgr.hsm.pins import Pin
    from keymgr.lifecycle.shred import DestroyResult
    from keymgr.rewrap.bulk import Summary
    from keymgr.rewrap.file import FileOutcome

#: The one message for every authentication failure of a ciphertext: no oracle.
INTEGRITY_MESSAGE = "the data failed authentication: tampered, truncated, wrong key or wrong context"

__all__ = ["KeyManager", "TokenInfo"]


@dataclass(frozen=True)
class TokenInfo:
    """Facts about a KeyManager's token that callers print or need to open another token of the
    same module (a custodian's): values only, with no session, handle or PIN behind them."""

    label: str
    serial: str
    module_path: str


def _ciphertext_failure(exc: errors.IntegrityError | errors.FormatError) -> errors.KeymgrError:
    """What a decrypt raises for ``exc``: the one integrity error (a malformed ciphertext
    too: an edited byte must not be told apart by where it broke the parse), except
    that a message for no key here says so (:class:`~keymgr.errors.RecipientNotFoundError`),
    and one asking for an algorithm keymgr does not read names it
    (:class:`~keymgr.errors.UnsupportedAlgorithmError`): both tell only what the message
    shows in the clear."""
    if isinstance(exc, (errors.RecipientNotFoundError, errors.UnsupportedAlgorithmError)):
        return exc
    return errors.IntegrityError(INTEGRITY_MESSAGE)


def _names_local_token(token: str | Pkcs11Uri) -> bool:
    """Whether ``token`` is the URI of the embedded local token (as ``keymgr init`` prints it):
    then it is the local token, with the local token's default audit log."""
    text = token if isinstance(token, str) else token.format()
    if "softhsm2-conf=" not in text:
        return False
    from keymgr.hsm.local import LocalToken

    return LocalToken.default().is_named_by(text)


class KeyManager:
    """Keys in one token, and everything applications do with them.

    **Threads.** One KeyManager may be shared by any number of threads, and several
    KeyManagers of one process on the same token share its one logged-in session
    (:mod:`keymgr.hsm.sessions`). Every PKCS#11 call of a module runs under that module's
    process-wide lock: python-pkcs11 initialises modules without OS locking, and SoftHSM
    crashed the process when two threads called it at once (STACK-FACTS 1). So token calls
    never run in parallel within a process, and threads add no token throughput, not even
    on a network HSM (STACK-FACTS 20); for that, use processes (a forked child re-initialises
    the module and reopens its session by itself). What needs no token call (a cached data
    key's AES-GCM, the keyring view between refreshes) takes no module lock; the keyring,
    the data-key caches and the audit log guard their own state with locks, and the keyring
    refreshes in a background thread of its own. Call :meth:`close` once no other thread
    uses the manager: it wipes the cached data keys, and later calls fail.
    """

    def __init__(self, token: str | Pkcs11Uri | None = None, *, pin_callback: PinCallback | None = None,
                 cache: CachePolicy | bool = False, allow_compromised: bool = False,
                 audit: AuditLog | str | os.PathLike[str] | bool | None = None,
                 rate_limits: Mapping[str, RateLimit] | RateLimit | None = None) -> None:
        """Open the token named by ``token`` (a ``pkcs11:`` URI), or the local token.

        The PIN comes from the URI's ``pin-source`` / ``pin-value`` or, failing
        those, from ``pin_callback`` (default: a no-echo terminal prompt).

        ``cache``: reuse data keys within limits (``True`` for the defaults of
        :class:`~keymgr.envelope.cache.CachePolicy`); off by default, because
        it trades per-message token use (and its audit) for speed.
        ``allow_compromised``: let versions marked compromised decrypt, for recovery only.
        ``audit``: where operations are recorded (:class:`~keymgr.audit.AuditLog`, a path,
        ``False`` for nowhere; default: ``KEYMGR_AUDIT_LOG``, else ``$KEYMGR_HOME/audit.log``
        for the local token; docs/audit.md). ``rate_limits``: decryptions allowed per
        principal per interval, per key name or ``"*"`` (:class:`~keymgr.audit.RateLimit`).
        """
        local_token = token is None or _names_local_token(token)
        if local_token:
            from keymgr.hsm.local import LocalToken  # only for the embedded token: spares importers its imports

            local = LocalToken.default()
            local.activate()
        if token is None:
            token = local.uri()
        uri = Pkcs11Uri.parse(token) if isinstance(token, str) else token
        if local_token and uri.pin_source is None and uri.pin_value is None:
            # the URI `keymgr init` printed: the local token's PIN too (PIN file, else $KEYMGR_PIN)
            uri = uri.with_(pin_source=Pkcs11Uri.parse(local.uri()).pin_source)
        self._uri = uri
        self._audit = AuditGuard(resolve_audit(audit, local=local_token), rate_limits,
                                 owns_log=not isinstance(audit, AuditLog), suspend=self.suspend)
        with self._audit.opening(uri.token):
            self._ts: TokenSession | None = open_token(uri, pin_callback=pin_callback)
        self._audit.attach(self._ts)
        if audit_is_off(audit):
            record_audit_off(self._ts, local=local_token, why="audit=False" if audit is False else ENV_VAR)
        elif self._audit.log is None and audit is None and not local_token:
            self._audit.adopt(default_token_log(self._ts))
        self._keyring_unchecked = Keyring(self._ts)
        self._usage = UsageMeter(self._keyring_unchecked, rotate=self._auto_rotate)
        self._protector = KekProtector(self._keyring_unchecked, allow_compromised=allow_compromised,
                                       reserve=self._usage.reserve, on_unwrap=self._audit.on_unwrap)
        policy = CachePolicy() if cache is True else (cache or None)
        self._encrypt_cache = EncryptCache(policy) if policy else None
        self._indexes: weakref.WeakSet[BlindIndex] = weakref.WeakSet()  # their subkeys are zeroed on close
        self._field_ciphers: weakref.WeakSet[FieldCipher] = weakref.WeakSet()  # their data keys too
        self._decrypt_cache = DecryptCache(policy) if policy else None
        self._private_keys: list[Any] = []  # keymgr.recipients.token_keys.TokenPrivateKey
        self._token_pairs: Any = None  # keymgr.recipients.token_keys.TokenKeyPairs, made on first need

    def __repr__(self) -> str:
        state = "closed" if self._ts is None else repr(self._ts.label)
        return f"KeyManager(token={state})"

    def __enter__(self) -> KeyManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Wipe cached data keys and forget the token handle. The process stays logged in
        for other users of the same token (the login is per process); :func:`keymgr.hsm.close_all`
        logs out."""
        for cache in (self._encrypt_cache, self._decrypt_cache):
            if cache is not None:
                cache.clear()
        for index in list(self._indexes):
            index.close()
        for cipher in list(self._field_ciphers):
            cipher.close()
        self._keyring_unchecked.close()
        self._ts = None
        self._audit.close()

    # The token session and keyring stay private: ``km.keyring.write(record)`` would change states
    # or the primary with no transition check and no audit entry. What callers need is a method
    # here (or on :attr:`custody`), audited and lifecycle-checked; tests that plant or inspect
    # token objects reach these two through tests/_internals.py, and nothing else outside does.

    @property
    def _token(self) -> TokenSession:
        """The open token session (raises once the manager is closed)."""
        if self._ts is None:
            raise errors.ConfigurationError("this KeyManager is closed")
        return self._ts

    @property
    def _keyring(self) -> Keyring:
        """The keyring, checked open: every public path to it goes through this."""
        self._token  # noqa: B018 - raises when closed
        return self._keyring_unchecked

    @property
    def token_info(self) -> TokenInfo:
        """What the token is (label, serial, module path), for messages and for opening other
        tokens of the same module: facts only, no session and no PIN."""
        ts = self._token
        return TokenInfo(label=ts.label, serial=ts.serial, module_path=ts.module.path)

    @property
    def refresh_interval(self) -> float:
        """Seconds between background re-reads of the token (another host's rotation is seen
        within this plus one refresh; docs/deployment.md)."""
        return self._keyring.refresh_interval

    @refresh_interval.setter
    def refresh_interval(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:  # NaN too
            raise errors.ConfigurationError(f"refresh_interval is a number of seconds, 0 or more (0: re-read "
                                            f"before every operation), not {seconds!r}")
        self._keyring.refresh_interval = float(seconds)

    @property
    def custody(self) -> Custody:
        """Custodians, quorum policies, requests and approvals, threshold recipients and key
        ceremony transcripts of this token (:class:`keymgr.custody.facade.Custody`): each change
        audited here, each call refused once the manager is closed."""
        from keymgr.custody.facade import Custody

        return Custody(lambda: self._keyring, self._audited)

    def _auto_rotate(self, name: str, if_primary: int, why: str) -> KeyRecord:
        """An automatic rotation (``auto_rotate``: a use limit or cryptoperiod reached while
        encrypting), audited like one by hand: intent, then outcome, with ``automatic`` and why."""
        known = {v.key_id for v in self._keyring_unchecked.get(name).versions}
        with self._audited("rotate", key=name, detail={"automatic": True, "reason": why}) as op:
            record = rotation.rotate(self._keyring_unchecked, name, if_primary=if_primary)
            op.version = record.primary
            if record.primary_version.key_id in known:  # another process had rotated already
                op.detail = {"automatic": True, "reason": why, "made": False}
            return record

    def _audited(self, op: str, *, key: str | None = None, version: int | None = None,
                 detail: Mapping[str, Any] | None = None) -> Operation:
        """The one audit helper of every operation: ``with self._audited("rotate", key=name) as op:``
        records ok / refused (PolicyError) / failed with the error class when the block ends
        (:class:`keymgr.audit.Operation`; encrypt / decrypt successes are aggregated). Refused once
        the manager is closed: the field ciphers, indexes and rewrappers it handed out all record
        through here, so none of them works on after :meth:`close` wiped their keys."""
        if self._ts is None:  # the _token property's check, inline: this runs once per message
            raise errors.ConfigurationError("this KeyManager is closed")
        return self._audit.operation(op, key=key, version=version, detail=detail)

    # -- keys -------------------------------------------------------------------

    def create_key(self, name: str, *, profile: str = DEFAULT_PROFILE, rotate_after_days: int | None = None,
                   max_messages: int | None = None, backup: bool = False, auto_rotate: bool = False,
                   exist_ok: bool = False) -> KeyRecord:
        """Generate version 1 of a named key inside the token.

        ``profile`` chooses how the key protects data keys: ``"kw"`` (the default: AES
        key wrap, RFC 3394, the standard form OpenSSL reads) or ``"gcm"`` (AES-GCM inside
        the token: one token call per message, ~3x the uncached rate on SoftHSM, but
        caller-chosen nonces). See docs/format.md and docs/performance.md.
        ``backup=True`` makes every version backup-capable (docs/ceremonies.md); without it
        the key can never leave the token, not even in a backup.
        ``exist_ok=True`` makes this get-or-create (what a service that starts on many hosts at
        once wants): a key of that name, profile and ``backup`` is returned as it is, its other
        policy untouched,
        and a create that lost a race to another host returns the winner's key. A key of that
        name with another profile raises :class:`~keymgr.errors.KeyExistsError` either way.
        ``rotate_after_days`` (cryptoperiod) and ``max_messages`` (encryptions per version) end a
        version's use; with ``auto_rotate`` the next encryption rotates instead of failing
        (:mod:`keymgr.lifecycle.usage`).
        """
        policy = check_policy(KeyPolicy(rotate_after_days=rotate_after_days, max_messages=max_messages,
                                         backup=backup, auto_rotate=auto_rotate))
        if exist_ok and (existing := self._existing_key(name, profile, backup)) is not None:
            return existing
        try:
            with self._audited("create", key=name, version=1, detail={"profile": profile}):
                return self._keyring.create(name, profile=profile, policy=policy)
        except errors.KeyExistsError:
            if exist_ok and (existing := self._existing_key(name, profile, backup)) is not None:
                return existing
            raise

    def _existing_key(self, name: str, profile: str, backup: bool) -> KeyRecord | None:
        """The key ``name`` if it exists with ``profile`` and ``backup``; None if there is none."""
        try:
            record = self._keyring.get(name)
        except errors.KeyNotFoundError:
            return None
        if record.profile != profile:
            raise errors.KeyExistsError(f"a key named {name!r} already exists with profile {record.profile!r}, "
                                        f"not {profile!r}")
        if record.policy.backup != backup:
            raise errors.KeyExistsError(f"a key named {name!r} already exists, "
                                        f"{'with' if record.policy.backup else 'without'} backup")
        return record

    def list_keys(self) -> list[KeyRecord]:
        """Every named key on the token, with its versions."""
        return self._keyring.records()

    def describe_key(self, name: str) -> KeyRecord:
        """One named key: versions, states, primary, key check values, policy."""
        return self._keyring.get(name)

    def verify_token_objects(self, name: str | None = None) -> tuple[list[str], list[str]]:
        """What ``keymgr key verify`` reports beside the versions: (failures, notes). Failures:
        MAC keys keymgr ignores because the token did not make them (planted), and key objects
        labelled as a version (``NAME/vN``) that no fact names, not even a pending one (facts
        deleted, a key's whole keyring included, or an object made by hand). Notes: such objects
        a rotation wrote a pending fact for (in progress, or crashed: swept a day after). With
        ``name``, only that key's objects (and no MAC keys)."""
        from keymgr.audit._token import AUDIT_KEY_LABEL
        from keymgr.keyring.store import META_MAC_LABEL

        failures = [] if name is not None else untrusted_keys(self._token, [META_MAC_LABEL, AUDIT_KEY_LABEL])
        notes: list[str] = []
        records = {r.name: r for r in self._keyring.records()}
        for label, key_id in objects.list_secret_keys(self._token):
            owner, _, number = label.rpartition("/v")
            if not owner or not number.isdigit() or (name is not None and owner != name):
                continue
            record = records.get(owner)
            if record is not None and any(v.key_id == key_id for v in record.versions):
                continue  # a version's own object (a destroyed one's is in its version check)
            pending = record is not None and any(f.kind == "pending" and f.kid == key_id.hex()
                                                 for f in self._keyring.facts(owner))
            if pending:
                notes.append(f"object {label!r} (id {key_id.hex()}) has no version yet: a rotation in "
                             "progress, or one that crashed (swept a day after it started), or one whose "
                             "version fact was deleted: if no host is rotating, look for it in the audit log")
            else:
                whose = f"key {owner!r}" if record is not None else f"any key (no key {owner!r} is on the token)"
                failures.append(f"object {label!r} (id {key_id.hex()}) is named by no fact of {whose}: made by "
                                "hand, or its facts were deleted (a rotation undone, or a whole key's keyring); "
                                "compare the audit log with keymgr key show")
        return failures, notes

    def verify_keys(self, name: str | None = None) -> list[VersionCheck]:
        """Check that every version of ``name`` (default: every key) is what the token made
        (:mod:`keymgr.keyring.provenance`): generated inside it, never extractable, its profile's roles,
        its recorded key check value; restored versions only that they are safe to decrypt with,
        destroyed ones that no object is left. Recorded in the audit log, failures included."""
        records = [self._keyring.get(name)] if name is not None else self._keyring.records()
        with self._audited("verify", key=name) as op:
            checks = [check_version(self._token, record, version) for record in records for version in record.versions]
            failed = [f"{c.name} v{c.version}" for c in checks if not c.ok]
            op.detail = {"versions": len(checks), "failed": failed}
        return checks

    # -- lifecycle (keymgr.lifecycle.rotation: states, transitions, crash safety) ----------------

    def rotate(self, name: str, *, activate: bool = True) -> KeyRecord:
        """New version n+1 becomes the primary; the old primary keeps decrypting (decrypt-only).
        ``activate=False`` makes it pre-active instead (:meth:`activate` later)."""
        with interrupts.commit_scope(), self._audited("rotate", key=name) as op:
            record = rotation.rotate(self._keyring, name, activate=activate)
            op.version = max(v.version for v in record.versions)
            return record

    def activate(self, name: str, version: int) -> KeyRecord:
        """Make a pre-active version the primary."""
        with self._audited("activate", key=name, version=version):
            return rotation.activate(self._keyring, name, version)

    def suspend(self, name: str, version: int) -> KeyRecord:
        """Freeze a version: no encryption, no decryption, until :meth:`resume`."""
        with self._audited("suspend", key=name, version=version):
            return rotation.suspend(self._keyring, name, version)

    def resume(self, name: str, version: int) -> KeyRecord:
        """Return a suspended version to its previous state."""
        with self._audited("resume", key=name, version=version):
            return rotation.resume(self._keyring, name, version)

    def mark_compromised(self, name: str, version: int) -> KeyRecord:
        """Mark a version compromised: it decrypts only for a manager made with ``allow_compromised``."""
        with self._audited("compromise", key=name, version=version):
            return rotation.mark_compromised(self._keyring, name, version)

    def retire(self, name: str, *, below: int, immediately: bool = False) -> KeyRecord:
        """Versions below ``below`` stop decrypting (Vault's min_decryption_version). Refused while
        another host may still encrypt under one of them (less than :data:`keymgr.lifecycle.rotation.SETTLE`
        after it stopped being the primary), unless ``immediately``."""
        with self._audited("retire", key=name, detail={"below": below, "immediately": immediately}):
            return rotation.retire(self._keyring, name, below, immediately=immediately)

    def destroy(self, name: str, version: int, *, paths: Sequence[str | os.PathLike[str]] = (),
                request: Request | None = None, approvals: Sequence[Approval] = (), confirmed: bool = False,
                force: bool = False, transcript: bool = False, immediately: bool = False) -> DestroyResult:
        """Crypto-shred one version (never the primary): its token object is destroyed and data
        only it protects is gone. Refuses while envelopes under ``paths`` still need it (unless
        ``force``), while other hosts may still encrypt under it (it stopped being the primary
        less than :data:`keymgr.lifecycle.shred.SETTLE` ago, unless ``immediately``), and needs the quorum's
        approvals (``request``, ``approvals``) where a policy covers the key, else
        ``confirmed=True``. See :mod:`keymgr.lifecycle.shred`."""
        from keymgr.lifecycle import shred  # imports the custody layer: only for this rare operation

        with interrupts.commit_scope(), self._audited("destroy", key=name, version=version,
                                                    detail={"force": force, "immediately": immediately}) as op:
            result = shred.destroy(self._keyring, name, version, paths=paths, request=request, approvals=approvals,
                                   confirmed=confirmed, force=force, transcript=transcript, immediately=immediately)
            op.detail = {"force": force, "immediately": immediately, "approvers": list(result.approvers)}
            return result

    # -- backup and restore (keymgr.custody.ceremony, audited here) -----------------------

    def backup(self, name: str, *, so_pin: Pin, request: Request | None, approvals: Sequence[Approval],
               versions: Sequence[int] | None = None,
               before_commit: Callable[[BackupResult], None] | None = None) -> BackupResult:
        """Back up key ``name`` to its M-of-N custodians, with the quorum's approvals and the
        HSM's SO PIN (:func:`keymgr.custody.ceremony.backup_keys`, which takes a keyring and
        keeps no audit log of its own: this records it, as ``keymgr backup`` does). ``before_commit``
        gets the result before the approvals are spent: write the file there, so a failed write
        spends nothing."""
        from keymgr.custody.ceremony import backup_keys

        with interrupts.commit_scope(), self._audited("backup", key=name, detail={"approvals": len(approvals)}):
            return backup_keys(self._keyring, name, so_pin=so_pin, request=request, approvals=approvals,
                               versions=versions, before_commit=before_commit)

    def check_restorable(self, backup: BackupFile) -> tuple[str, ...]:
        """Refuse (:class:`~keymgr.errors.PolicyError`) a backup that a key of this token clashes
        with by name, before any custodian is asked for a PIN; the names whose every version this
        token holds already (a :meth:`restore` checks and finishes those)."""
        from keymgr.custody.ceremony import restored_earlier

        return tuple(sorted(restored_earlier(backup, self._keyring)))

    def restore(self, backup: BackupFile, custodians: Sequence[CustodianToken]) -> RestoreResult:
        """Restore every key of ``backup`` into this token with M custodians' tokens, all or
        nothing (:func:`keymgr.custody.ceremony.restore_keys`, audited here)."""
        from keymgr.custody.ceremony import restore_keys

        with interrupts.commit_scope(), self._audited("restore", detail={"custodians": len(custodians)}) as op:
            result = restore_keys(backup, self._keyring, custodians)
            op.detail = {"custodians": len(custodians), "keys": [r.name for r in result.records][:32]}
            op.key = result.records[0].name if len(result.records) == 1 else None
            return result

    # -- rewrap (keymgr.rewrap.message: recipients only, payload untouched) --------------------

    def rewrapper(self) -> Rewrapper:
        """Rewrap messages and streams for this token's keys, with a report of what moved."""
        return Rewrapper(self._protector)

    def rewrap_files(self, paths: Iterable[str | os.PathLike[str]], *, jobs: int = 1, threads: int | None = None,
                     journal: str | os.PathLike[str] | None = None, dry_run: bool = False,
                     on_total: Callable[[int], None] | None = None,
                     on_outcome: Callable[[FileOutcome], None] | None = None) -> Summary:
        """Rewrap every envelope under ``paths`` in place, recorded as one ``rewrap-bulk`` audit
        entry with the counts (:func:`keymgr.rewrap.bulk.run`: ``jobs`` processes, ``threads``
        each, a ``journal`` to resume from; ``on_total`` / ``on_outcome`` for progress)."""
        from keymgr.rewrap.bulk import DEFAULT_THREADS, run

        with self._audited("rewrap-bulk", detail={"dry_run": dry_run}) as op:
            summary = run(self.rewrapper(), paths, jobs=jobs, threads=threads or DEFAULT_THREADS, journal=journal,
                          dry_run=dry_run, on_total=on_total, on_outcome=on_outcome)
            op.detail = {"dry_run": dry_run, **summary.counts}
            return summary

    def rewrap(self, blob: bytes) -> bytes:
        """The message with its data key under its key's current primary; the same bytes when
        it is current already. Payload, context and commitment are copied, never read."""
        with self._audited("rewrap"):
            try:
                return self.rewrapper().message(blob).data
            except errors.IntegrityError as exc:
                raise _ciphertext_failure(exc) from None

    def rewrap_stream(self, src: BinaryIO, dst: BinaryIO) -> RewrapResult:
        """:meth:`rewrap` for a stream: a new header to ``dst``, then ``src``'s segments as they are."""
        with self._audited("rewrap-stream"):
            try:
                return self.rewrapper().stream(src, dst)
            except errors.IntegrityError as exc:
                raise _ciphertext_failure(exc) from None

    def capabilities(self) -> Capabilities:
        """What the token can do (probed once per process)."""
        return probe(self._token)

    # -- envelope encryption -----------------------------------------------------

    def recipient(self, key: str) -> Recipient:
        """Key ``key`` of this token as an extra recipient for another manager's messages
        (``other.encrypt(data, key="orders", also_to=[dr_site.recipient("orders-dr")])``)."""
        self._keyring.get(key)
        return KeyRecipient(self._protector, key)

    def add_private_key(self, label: str | None = None, *, key_id: bytes | None = None,
                        token: str | Pkcs11Uri | None = None, certificate: bytes | None = None) -> Recipient:
        """Let :meth:`decrypt` use an RSA / EC key pair (on this token, or on ``token``) for
        RSA-OAEP and ECDH recipients, before the token's other key pairs; returns its public
        side, for ``also_to``. ``token`` may be a key's URI (``object=`` / ``id=`` name the
        pair when ``label`` / ``key_id`` do not). ``certificate`` (PEM or DER) lets recipients
        that name it by issuer and serial number find it, as one on the token under the
        pair's CKA_ID does. See :mod:`keymgr.recipients.token_keys`."""
        from keymgr.recipients.token_keys import open_key_pair

        private = open_key_pair(self._token, label=label, key_id=key_id, token=token, certificate=certificate)
        self._private_keys.append(private)
        return private.recipient()

    def _unwrap_uncached(self, der: bytes) -> DataKey | None:
        """The data key in one recipient (its DER) for a key of this token, or None. Token KEKs
        read the DER directly; KeyTrans / KeyAgree recipients get the asn1crypto object and go
        to the key pairs added with :meth:`add_private_key`, then to the token's own."""
        dek = self._protector.unwrap_der(der)
        if dek is not None or der[:1] not in (b"\x30", b"\xa1"):  # KeyTransRecipientInfo, KeyAgreeRecipientInfo
            return dek
        ri = load_recipient_info(der)
        for unwrapper in self._private_keys:
            dek = unwrapper.unwrap(ri)
            if dek is not None:
                return dek  # type: ignore[no-any-return]
        if self._token_pairs is None:
            from keymgr.recipients.token_keys import TokenKeyPairs

            self._token_pairs = TokenKeyPairs(self._token)
        return self._token_pairs.unwrap(ri)  # type: ignore[no-any-return]

    def _new_data_key(self, key: str, also_to: Sequence[Recipient]) -> tuple[DataKey, tuple[RecipientLike, ...]]:
        dek = DataKey(os.urandom(32))
        try:
            # inside an audited operation, which refused a closed manager: the unchecked keyring
            recipients: list[RecipientLike] = [self._protector.wrap_der(self._keyring_unchecked.get(key), dek)]
            recipients += [r.wrap(dek) for r in also_to]
        except BaseException:
            dek.wipe()
            raise
        return dek, tuple(recipients)

    def _data_key(self, key: str, context: Mapping[str, str] | None, also_to: Sequence[Recipient], size: int,
                  use: Any) -> Any:
        """Run ``use(dek, recipients)`` with a fresh or (within limits) cached data key."""
        if self._encrypt_cache is None:
            dek, recipients = self._new_data_key(key, also_to)
            try:
                return use(dek, recipients)
            finally:
                dek.wipe()
        record = self._keyring_unchecked.get(key)  # inside an audited operation (open checked there)
        # a cached data key must not outlive a suspension; its wrap checked the key object already
        self._protector.check_encrypts(record, provenance=False)
        context_key = checked_context(context)[1]  # raises ConfigurationError for an unusable context
        partition = (key, record.primary_version.key_id, context_key, tuple(map(id, also_to)) if also_to else ())
        entry = self._encrypt_cache.acquire(partition, size, lambda: self._new_data_key(key, also_to))
        try:
            return use(entry.dek, entry.recipients)
        finally:
            self._encrypt_cache.release(entry)

    def encrypt(self, plaintext: bytes, *, key: str, context: Mapping[str, str] | None = None,
                also_to: Sequence[Recipient] = (), compat_openssl: bool = False) -> bytes:
        """Encrypt ``plaintext`` into a DER CMS AuthEnvelopedData message.

        A fresh AES-256-GCM data key (or a cached one, see ``cache``) encrypts the
        data; the key's primary version wraps it inside the token. ``context`` is
        bound as authenticated attributes: decrypt needs the same context.
        ``compat_openssl=True`` writes no attributes (no context, no key
        commitment) so OpenSSL 3.0 can read the message: weaker, see docs/format.md.
        """
        with self._audited("encrypt", key=key) as op:
            try:
                data = bytes(plaintext)
                if compat_openssl and self._protector.algorithm_for(self._keyring.get(key)) != "aes256_wrap":
                    raise errors.ConfigurationError(
                        f"compat_openssl needs a key whose messages OpenSSL can unwrap (profile kw with RFC 3394 "
                        f"key wrap on this token); key {key!r} is not one")
                blob = self._data_key(key, context, also_to, len(data), lambda dek, ris: seal_message(
                    data, dek=dek, recipient_infos=ris, context=context, compat_openssl=compat_openssl))
            except errors.PolicyError:
                self._name_refused_version(op, key)
                raise
            op.version = self._keyring_unchecked.get(key).primary
            return blob  # type: ignore[no-any-return]

    def _name_refused_version(self, op: Operation, key: str) -> None:
        """A refused encryption's audit entry names the version refused (the primary then): looked
        up only on a refusal (a try costs the per-message path nothing)."""
        with contextlib.suppress(errors.KeymgrError):
            op.version = self._keyring_unchecked.get(key).primary

    def _unwrap(self, der: bytes) -> DataKey | None:
        if self._decrypt_cache is None:
            return self._unwrap_uncached(der)
        dek = self._decrypt_cache.get(der)
        if dek is None:
            dek = self._unwrap_uncached(der)
            if dek is not None:
                self._decrypt_cache.put(der, dek)
        else:
            self._audit.on_cached_unwrap(der, self._protector)  # limits and states hold for cached keys too
            self._protector.check_der(der)  # with no audit log or limiter as well
        return dek

    def decrypt(self, blob: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt a message made by :meth:`encrypt` (or by ``openssl cms -encrypt`` with a KEK of ours).

        Every failure of the ciphertext (tampered or truncated anywhere, malformed,
        wrong context, wrong key) raises the same :class:`~keymgr.errors.IntegrityError`
        with one message. The one variation: a message none of whose recipients is a
        key of this token raises :class:`~keymgr.errors.RecipientNotFoundError`, an
        ``IntegrityError`` that is also a ``KeyNotFoundError`` and says so (an edited
        key id looks exactly like a message for another token; key ids are not
        secret, and they are compared before any key is used).
        """
        with self._audited("decrypt") as op:
            try:
                return open_message(bytes(blob), unwrap_der=self._unwrap, context=context)
            except (errors.IntegrityError, errors.FormatError) as exc:
                self._audit.attribute(op, blob, self._keyring_unchecked)
                raise _ciphertext_failure(exc) from None

    def decrypt_with_context(self, blob: bytes) -> tuple[bytes, dict[str, str]]:
        """Decrypt without stating the context, and return the context found, for the caller to check."""
        with self._audited("decrypt") as op:
            try:
                return open_message(bytes(blob), unwrap_der=self._unwrap, context=None, return_context=True)
            except (errors.IntegrityError, errors.FormatError) as exc:
                self._audit.attribute(op, blob, self._keyring_unchecked)
                raise _ciphertext_failure(exc) from None

    def encrypt_stream(self, src: BinaryIO, dst: BinaryIO, *, key: str, context: Mapping[str, str] | None = None,
                       also_to: Sequence[Recipient] = ()) -> int:
        """Encrypt a binary stream of any size in constant memory; returns plaintext bytes read.

        Streams never share a cached data key (each has its own key), so the
        cache's byte limit is not spent by one large file."""
        with self._audited("encrypt-stream", key=key) as op:
            try:
                dek, recipients = self._new_data_key(key, also_to)
            except errors.PolicyError:
                self._name_refused_version(op, key)
                raise
            op.version = self._keyring_unchecked.get(key).primary
            try:
                return encrypt_stream(src, dst, dek=dek, recipient_infos=recipients, context=context)
            finally:
                dek.wipe()

    def decrypt_stream(self, src: BinaryIO, dst: BinaryIO, *, context: Mapping[str, str] | None = None) -> int:
        """Decrypt a stream; only authenticated plaintext reaches ``dst``. On failure ``dst`` may
        hold the verified segments before the bad one: write to a temporary file and discard it
        on error (the CLI does). Failures are reported as :meth:`decrypt` reports them."""
        with self._audited("decrypt-stream"):
            try:
                return decrypt_stream(src, dst, unwrap_der=self._unwrap, context=context)
            except (errors.IntegrityError, errors.FormatError) as exc:
                raise _ciphertext_failure(exc) from None

    # -- database fields (keymgr.fields: compact values, blind indexes) ---------------

    def fields(self, key: str, *, store: KeyStore, cache: CachePolicy | None = None) -> FieldCipher:
        """Encrypt database fields under ``key``: the compact field form, its data keys wrapped by
        the key's primary and kept once each in ``store`` (docs/fields.md). Data keys are shared
        by many values within ``cache``'s limits (default :class:`CachePolicy`'s); audited here."""
        from keymgr.fields.cipher import FieldCipher

        cipher = FieldCipher(key=key, store=store, protector=self._protector, rewrapper=self.rewrapper(),
                             audited=self._audited, policy=cache, on_unwrap=self._audit.on_unwrap)
        self._field_ciphers.add(cipher)
        return cipher

    def blind_index(self, name: str, *, bits: int, normalise: Normaliser | None = None,
                    transform: Normaliser | None = None, min_version: int = 1, cache: int = 10_000,
                    host_subkeys: bool = True, subkeys: SubkeyPolicy | None = None) -> BlindIndex:
        """A blind index keyed by an HMAC key generated in the token for ``name`` (made on first
        use; one per version), which never leaves it. ``bits``: how much of the HMAC is kept
        (docs/fields.md, "Choosing bits"). ``host_subkeys`` (default): the token derives one subkey
        per (version, context) and the host computes terms with it, kept within ``subkeys``'
        limits (default 300 s, 1,000 subkeys); ``host_subkeys=False``: one token HMAC per term,
        no index key material on the host, and different terms (switching modes is a rotation
        and a re-encryption). ``cache``: terms kept for repeated inputs in token-only mode (0:
        none). See :mod:`keymgr.fields.index`."""
        from keymgr.fields.index import BlindIndex

        index = BlindIndex(self._token, name=name, bits=bits, audited=self._audited, normalise=normalise,
                           transform=transform, min_version=min_version, cache=cache, host_subkeys=host_subkeys,
                           subkeys=subkeys)
        self._indexes.add(index)
        return index
