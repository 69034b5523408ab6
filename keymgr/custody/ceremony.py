"""Backup and restore ceremonies: dual-control export and unwrap of long-term keys.

Backup (:func:`backup_keys`), on the keyring's HSM:

1. the request and its approvals are checked against the quorum policy and
   consumed (:mod:`keymgr.custody.approvals`);
2. every version to back up must be backup-capable (EXTRACTABLE, only under
   a trusted key): keys made never to leave the token are refused by name;
3. a one-time 256-bit transport key is drawn (host RNG XOR token RNG), the
   versions are wrapped under it *inside the token* after the SO marks it
   trusted (:mod:`keymgr.hsm.transport`), and it is destroyed there;
4. its value is split M-of-N with Shamir (:mod:`keymgr.custody.shamir`), each
   share sealed to one custodian's token key with a commitment beside it, and
   the host copies are wiped; the file is MACed under the transport key.

Restore (:func:`restore_keys`), on the target HSM, with M custodians present:
each custodian's token opens only their own share; each share is checked
against its commitment (a bad one is named); the transport key is rebuilt
and authenticates the whole file; only then is the target touched: the
transport key becomes a private session object, the versions are unwrapped
into non-extractable, sensitive token objects with their original CKA_IDs and
labels, each is proven to hold the backed-up key, the transcript is signed, the
keyring records are written, and the transport key is destroyed. Any failure
(an interrupt included) before the records are written destroys every object
the restore created: the target is left as it was. The records' write is the
commit: from it on SIGINT / SIGTERM wait until the restore is recorded
(:mod:`keymgr.interrupts`), and a rerun finishes a restore killed after it
(docs/ceremonies.md, "Interrupted ceremonies"). Host copies of shares and of
the transport key are wiped.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from keymgr import errors, interrupts
from keymgr._memory import zero
from keymgr._time import utc_now
from keymgr.custody import shamir
from keymgr.custody._shares import deal, open_checked, quorum_shortfall, wipe_shares
from keymgr.custody.approvals import Approval, Request
from keymgr.custody.authorize import authorize, ceremony_transcript
from keymgr.custody.backup_file import BackupFile, BackupKey, ShareSlot, WrappedVersion
from keymgr.custody.custodian_token import CustodianToken
from keymgr.custody.custodians import CustodyRegister, QuorumPolicy
from keymgr.custody.transcript import Signer, TranscriptRecorder, hsm_signer, sign_transcript
from keymgr.hsm import objects, probe
from keymgr.hsm.pins import Pin
from keymgr.hsm.templates import PROFILES, Profile, profile_named
from keymgr.hsm.transport import ImportItem, export_wrapped, import_unwrapped, key_ids_present
from keymgr.keyring.store import KeyRecord, Keyring

__all__ = ["BackupResult", "RestoreResult", "backup_keys", "restore_keys", "open_custodian"]

_PROOF_INPUT = bytes(32)
_PROOF_AAD = b"keymgr backup proof v1"
#: versions in these states have a key object to back up
_BACKUP_STATES = frozenset({"active", "decrypt-only", "suspended", "compromised", "pre-active", "retired"})


@dataclass(frozen=True)
class BackupResult:
    backup: bytes = field(repr=False)
    transcript: bytes = field(repr=False)
    description: str = ""


@dataclass(frozen=True)
class RestoreResult:
    records: tuple[KeyRecord, ...]
    transcript: bytes = field(repr=False)
    description: str = ""
    #: keys an earlier, cut-short restore of this backup had committed, finished by this one
    finished: tuple[str, ...] = ()


def _profile_of(record: KeyRecord, key_id: bytes) -> Profile:
    return profile_named(next((record.profile_of(v) for v in record.versions if v.key_id == key_id), record.profile))


def _proof(ts: object, record: KeyRecord, key_id: bytes, mechanism: str) -> bytes:
    """What the version's key makes of a fixed input (see backup_file: ``proof``)."""
    if _profile_of(record, key_id).wraps:
        return objects.wrap_data_key(ts, key_id, _PROOF_INPUT, mechanism)  # type: ignore[arg-type]
    nonce = os.urandom(12)
    return nonce + objects.gcm_encrypt(ts, key_id, _PROOF_INPUT, nonce=nonce, aad=_PROOF_AAD)  # type: ignore[arg-type]


def _proof_holds(ts: object, record: KeyRecord, key_id: bytes, proof: bytes, mechanism: str) -> bool:
    try:
        if _profile_of(record, key_id).wraps:
            return hmac.compare_digest(objects.wrap_data_key(ts, key_id, _PROOF_INPUT, mechanism), proof)  # type: ignore[arg-type]
        opened = objects.gcm_decrypt(ts, key_id, proof[12:], nonce=proof[:12], aad=_PROOF_AAD)  # type: ignore[arg-type]
        return hmac.compare_digest(bytes(opened), _PROOF_INPUT)
    except (errors.IntegrityError, errors.TokenError):
        return False


def _selected(record: KeyRecord, versions: Sequence[int] | None) -> KeyRecord:
    if versions is None:
        chosen = tuple(v for v in record.versions if v.state in _BACKUP_STATES)
    else:
        chosen = tuple(record.version(n) for n in sorted(set(versions)))
    if not chosen:
        raise errors.PolicyError(f"key {record.name!r} has no version that can be backed up")
    for v in chosen:
        if v.state not in _BACKUP_STATES:
            raise errors.PolicyError(f"key {record.name!r} version {v.version} is {v.state}: nothing to back up")
    numbers = [v.version for v in chosen]
    primary = record.primary if record.primary in numbers else max(numbers)
    return replace(record, versions=chosen, primary=primary)


def _transport_key(ts: object) -> bytearray:
    """256 bits from the host RNG XOR the token's RNG: either alone suffices."""
    token_random = objects.random_bytes(ts, 32)  # type: ignore[arg-type]
    return bytearray(a ^ b for a, b in zip(os.urandom(32), token_random, strict=True))


def backup_keys(keyring: Keyring, name: str, *, so_pin: Pin, request: Request | None,
                approvals: Sequence[Approval], versions: Sequence[int] | None = None,
                quorum: QuorumPolicy | None = None,
                before_commit: Callable[[BackupResult], None] | None = None) -> BackupResult:
    """Back up ``name``'s versions for the key's quorum (or ``quorum``); returns the file and transcript.
    Records no audit entry: :meth:`keymgr.KeyManager.backup` calls this and records it.

    The one change a backup makes to the token is spending the request's approvals; that is its
    commit, done last, once the file and transcript are made, with signals held from there until
    the outermost commit scope ends (:mod:`keymgr.interrupts`): an interrupt before it spends nothing.
    ``before_commit`` gets the result before the approvals are spent (``keymgr backup`` writes the
    file and transcript there): if it raises, nothing is spent and the custodians need not meet again."""
    with interrupts.commit_scope():
        return _backup(keyring, name, so_pin=so_pin, request=request, approvals=approvals, versions=versions,
                       quorum=quorum, before_commit=before_commit)


def _backup(keyring: Keyring, name: str, *, so_pin: Pin, request: Request | None, approvals: Sequence[Approval],
            versions: Sequence[int] | None, quorum: QuorumPolicy | None,
            before_commit: Callable[[BackupResult], None] | None = None) -> BackupResult:
    ts = keyring.token
    register = CustodyRegister(keyring).load()
    policy = quorum or register.policy_for(name)
    if policy is None:
        raise errors.PolicyError(f"no quorum policy covers key {name!r}: register custodians and set a policy "
                                 "(keymgr custodian policy) before a backup")
    custodians = tuple(register.custodian(n) for n in policy.custodians)
    record = _selected(keyring.get(name), versions)
    for v in record.versions:
        attrs = objects.key_attributes(ts, v.key_id).attributes
        if attrs.get("EXTRACTABLE") is not True or attrs.get("SENSITIVE") is not True:
            raise errors.PolicyError(f"key {name!r} version {v.version} was made never to leave token {ts.label!r} "
                                     "(not backup-capable); only keys created with --backup can be backed up")
    params = {"versions": None if versions is None else sorted(set(versions))}
    auth = authorize(keyring, "backup", key=name, params=params, request=request, approvals=approvals,
                     consume=False)
    if auth is None:  # a policy given as ``quorum`` but none registered for the key: still needs approval
        raise errors.PolicyError(f"key {name!r} has no quorum policy of its own to approve a backup; set one")
    recorder = TranscriptRecorder("backup", ts.label, ts.serial)
    auth.record(recorder)
    recorder.details["quorum"] = policy.to_json()
    recorder.step("request approved", approvers=list(auth.approvers))
    mechanism = probe(ts).preferred_wrap_mechanism()
    if mechanism is None:
        raise errors.MechanismUnsupportedError(f"token {ts.label!r} can do neither AES-KW nor AES-KWP")
    transport = _transport_key(ts)
    try:
        wrapped = export_wrapped(ts, [v.key_id for v in record.versions], transport, so_pin=so_pin,
                                 mechanism=mechanism)
        recorder.step("versions wrapped under a trusted one-time transport key in the token",
                      versions=[v.version for v in record.versions], mechanism=mechanism)
        key = BackupKey(record, tuple(WrappedVersion(v.version, w, _proof(ts, record, v.key_id, mechanism))
                                      for v, w in zip(record.versions, wrapped, strict=True)))
        for v in record.versions:
            recorder.key(name, v.version, v.key_id, v.kcv, state=v.state)
        backup = BackupFile(id=os.urandom(16), created=utc_now(), source_token=ts.label, source_serial=ts.serial,
                            mechanism=mechanism, quorum=policy, keys=(key,), shares=(),
                            approvals=({"request": auth.request_digest, "approvers": list(auth.approvers)},))
        dealt = deal(transport, policy.threshold, custodians, backup.share_context)
        backup = replace(backup, shares=tuple(ShareSlot(d.custodian, d.index, d.commitment, d.sealed) for d in dealt))
        backup = replace(backup, mac=backup.compute_mac(transport))
        recorder.step("transport key split and sealed to custodians", quorum=policy.describe())
    finally:
        zero(transport)
    recorder.details["backup"] = backup.id.hex()
    transcript = ceremony_transcript(keyring, recorder, "success")
    result = BackupResult(backup.to_bytes(), transcript, backup.describe())
    if before_commit is not None:
        before_commit(result)  # the file is written before anything is spent
    interrupts.hold_signals()  # the commit: spend the approvals (after the SO step: a mistyped SO PIN spends none)
    auth.consume(keyring)
    return result


def _sign(recorder: TranscriptRecorder, outcome: str, signers: Sequence[Signer | None]) -> bytes:
    present = [s for s in signers if s is not None]
    return sign_transcript(recorder.finish(outcome), present) if present else b""


def open_custodian(backup: BackupFile, name: str, uri: str, *, pin_callback: object = None) -> CustodianToken:
    """Open custodian ``name``'s token for this backup (name checked first, then the token, then the PIN)."""
    slot = backup.slot(name)
    return CustodianToken.open(slot.custodian, uri, pin_callback=pin_callback)  # type: ignore[arg-type]


def _shares(backup: BackupFile, tokens: Sequence[CustodianToken]) -> list[shamir.Share]:
    """Each present custodian's share, opened by their token and checked against its commitment."""
    shares: list[shamir.Share] = []
    try:
        for token in tokens:
            slot = backup.slot(token.custodian.name)
            if slot.custodian.fingerprint != token.custodian.fingerprint:
                raise errors.PolicyError(f"the token given for custodian {slot.custodian.name!r} does not hold "
                                         "the key this backup was sealed to")
            shares.append(open_checked(token, slot, backup.share_context(slot), kept_in="the backup"))
    except BaseException:
        wipe_shares(shares)
        raise
    return shares


def restore_keys(backup: BackupFile, target: Keyring, tokens: Sequence[CustodianToken]) -> RestoreResult:
    """Restore every key of ``backup`` into ``target`` with the custodians' ``tokens``; all or nothing.
    Records no audit entry: :meth:`keymgr.KeyManager.restore` calls this and records it.

    Interrupts (docs/ceremonies.md, "Interrupted restores"): everything up to the commit (the
    keyring snapshot that makes a restored key visible, one object per key) is undone on any
    exception, a SIGINT or SIGTERM included; from the commit on, signals are held
    (:func:`keymgr.interrupts.hold_signals`) until the outermost commit scope ends, so that the
    custodians' register, the caller's audit entry and transcript file are written whole. A key
    that an earlier run of this very backup committed (and was then killed) is not refused by
    name but finished: checked again, its custodians adopted, a transcript signed."""
    with interrupts.commit_scope():
        return _restore(backup, target, tokens)


def _restore(backup: BackupFile, target: Keyring, tokens: Sequence[CustodianToken]) -> RestoreResult:
    ts = target.token
    recorder = TranscriptRecorder("restore", ts.label, ts.serial)
    recorder.details.update({"backup": backup.id.hex(), "source": {"token": backup.source_token,
                                                                    "serial": backup.source_serial}})
    names = _participants(backup, tokens, recorder)
    distinct = list({t.custodian.name: t for t in tokens}.values())
    earlier = restored_earlier(backup, target)
    todo = [key for key in backup.keys if key.record.name not in earlier]
    items = [ImportItem(v.key_id, key.record.label_of(v.version), profile_named(key.record.profile_of(v)).template,
                         w.wrapped)
             for key in todo for v, w in zip(key.record.versions, _ordered(key), strict=True)]
    transport = bytearray()
    unwrapping = False
    shares = _shares(backup, distinct)
    try:
        try:
            transport = bytearray(shamir.combine(shares, backup.quorum.threshold))
            recorder.step("shares opened by the custodians' tokens, checked, and combined", custodians=names)
            if not backup.verify_mac(transport):
                raise errors.IntegrityError("the backup file is not authentic: it was altered after it was made "
                                            "(or a share and its commitment were both replaced)")
            recorder.step("backup file authenticated under the rebuilt transport key")
            if items:
                _clear_leftovers(target, items)
                unwrapping = True  # from here on, objects under the items' ids are this restore's
                import_unwrapped(ts, transport, items, mechanism=backup.mechanism)
        finally:
            zero(transport)
            wipe_shares(shares)
        if items:
            recorder.step("versions unwrapped into the token as non-extractable objects; transport key destroyed")
        if earlier:
            recorder.step("keyring records found holding every version of these keys, restored earlier (from "
                      "this backup, a run cut short after its commit, or another backup of the same key); "
                      "checked and finished", keys=sorted(earlier))
        _check_proofs(backup, target, recorder)
        adoptable = CustodyRegister(target).adoptable(tuple(s.custodian for s in backup.shares))
        if todo:
            recorder.step("keyring records written")
        recorder.step("custodians and quorum registered on the target" if adoptable else
                      "custodian names clash with the target's register: register them by hand")
        signers: list[Signer | None] = [hsm_signer(ts)]
        signers += [Signer(t.custodian.name, t.custodian.certificate_der, t.sign) for t in distinct]
        transcript = _sign(recorder, "success", signers)
        interrupts.hold_signals()  # the commit: from here on the restore is finished, not undone
        records = {key.record.name: target.restore(key.record) for key in todo}
    except BaseException:
        if unwrapping:
            _discard_uncommitted(target, todo)
        raise
    _adopt_custodians(backup, target)
    records.update({name: target.get(name) for name in earlier})
    return RestoreResult(tuple(records[key.record.name] for key in backup.keys), transcript, backup.describe(),
                         finished=tuple(sorted(earlier)))


def _participants(backup: BackupFile, tokens: Sequence[CustodianToken], recorder: TranscriptRecorder) -> list[str]:
    """The custodians taking part, each one of the backup's, at least M of them."""
    names: list[str] = []
    for token in tokens:
        backup.slot(token.custodian.name)
        if token.custodian.name not in names:
            names.append(token.custodian.name)
        recorder.participant("custodian", token.custodian.name, token.custodian.fingerprint)
    if len(names) < backup.quorum.threshold:
        raise errors.PolicyError(quorum_shortfall("this backup", backup.quorum.threshold, backup.quorum.custodians,
                                                  names) + ". Nothing was restored")
    return names


def restored_earlier(backup: BackupFile, target: Keyring) -> set[str]:
    """Names of the backup's keys whose every version the target holds already, restored (same
    CKA_ID and check value): a restore of this backup killed after its commit, or one of another
    backup of the same key. Another key of the same name is a :class:`PolicyError`, raised here so
    that a caller can check before the custodians are asked for anything."""
    target.reload()
    held = {r.name: r for r in target.records()}
    earlier = set()
    for key in backup.keys:
        if key.record.profile not in PROFILES:
            raise errors.FormatError(f"backup file: unknown profile of key {key.record.name!r}")
        have = held.get(key.record.name)
        if have is None:
            continue
        theirs = {(v.key_id, v.kcv) for v in have.versions if v.restored}
        if not {(v.key_id, v.kcv) for v in key.record.versions} <= theirs:
            raise errors.PolicyError(f"token {target.token.label!r} already has a key named {key.record.name!r}; "
                                     "nothing was restored")
        earlier.add(key.record.name)
    return earlier


def _clear_leftovers(target: Keyring, items: Sequence[ImportItem]) -> None:
    """Destroy key objects that a restore of this backup killed before its commit left behind
    (SIGKILL: no rollback ran): same CKA_ID and label as an item, and no fact names the id. Called
    once the backup is authenticated, so the ids are the source's own. Anything else under those
    ids is refused by CKA_ID, and stays."""
    ts = target.token
    wanted = {item.key_id: item.label for item in items}
    found = [key_id for label, key_id in objects.list_secret_keys(ts) if wanted.get(key_id) == label]
    if found:
        target.reload()
        for key_id in found:
            try:
                target.find_by_id(key_id)
            except errors.KeyNotFoundError:
                objects.destroy_key(ts, key_id)
    clash = key_ids_present(ts, list(wanted))
    if clash:
        raise errors.PolicyError(f"token {ts.label!r} already holds objects with CKA_ID "
                                 f"{', '.join(k.hex() for k in clash)}; nothing was restored")


def _discard_uncommitted(target: Keyring, todo: Sequence[BackupKey]) -> None:
    """The rollback: destroy every object this restore may have unwrapped, unless its key's commit
    was written after all (an error that lost the token's answer). Signals are held meanwhile; an
    object a failure here leaves behind is cleared by the next restore (:func:`_clear_leftovers`)."""
    with interrupts.deferred_signals():
        try:
            target.reload()
            committed = {r.name for r in target.records()}
            for key in todo:
                if key.record.name not in committed:
                    for v in key.record.versions:
                        objects.destroy_key(target.token, v.key_id)
        except errors.KeymgrError:
            pass


def _ordered(key: BackupKey) -> list[WrappedVersion]:
    by_number = {w.version: w for w in key.versions}
    return [by_number[v.version] for v in key.record.versions]


def _check_proofs(backup: BackupFile, target: Keyring, recorder: TranscriptRecorder) -> None:
    """Each restored object holds the backed-up key (its proof opens), or the restore stops."""
    ts = target.token
    for key in backup.keys:
        for v, w in zip(key.record.versions, _ordered(key), strict=True):
            if not _proof_holds(ts, key.record, v.key_id, w.proof, backup.mechanism):
                raise errors.IntegrityError(f"restored key {key.record.name!r} version {v.version} does not "
                                            "hold the backed-up key; nothing was restored")
            recorder.key(key.record.name, v.version, v.key_id, v.kcv, proof="verified")


def _adopt_custodians(backup: BackupFile, target: Keyring) -> None:
    """Register the backup's custodians and quorum on the target, so its keys stay under dual control
    (nothing, when :meth:`CustodyRegister.adoptable` said no: the transcript says so)."""
    CustodyRegister(target).adopt(tuple(s.custodian for s in backup.shares),
                                  {key.record.name: backup.quorum for key in backup.keys})
