"""Trust only what the token made: a key version's object must prove where it came from.

Anyone with the user PIN can compute a MAC with the metadata MAC key (C_Sign
is its normal use), so a keyring fact cannot prove that a key is safe. A PIN
holder could import an AES key whose value they know (C_CreateObject), forge a
fact that makes it the primary, and read every message encrypted afterwards,
offline. What they cannot forge are the attributes only the token sets
(PKCS#11 v2.40 4.4 and 4.9; STACK-FACTS 18, checked on SoftHSM 2.6.1):

* ``CKA_LOCAL`` true: generated inside the token (false for an imported or unwrapped key);
* ``CKA_ALWAYS_SENSITIVE`` true: never had a readable value;
* ``CKA_NEVER_EXTRACTABLE`` true: could never be wrapped out. A backup-capable key
  (:func:`keymgr.hsm.templates.backup_capable`) is extractable by design, so it must
  instead be ``WRAP_WITH_TRUSTED`` (only a security officer's trusted key wraps it);

and what keymgr set at generation and PKCS#11 does not let anyone loosen:
``MODIFIABLE`` and ``COPYABLE`` false, ``SENSITIVE`` true, AES with a 32-byte
value, exactly the roles of the key's profile (a KEK with DERIVE or ECB
encryption leaks: STACK-FACTS 10), and the key check value the facts recorded.

A version that fails may not encrypt: :meth:`keymgr.keyring.store.Keyring.check_encrypts`
raises a :class:`~keymgr.errors.PolicyError` naming the version and the attribute.
Restored versions (unwrapped from a backup, so not LOCAL) decrypt but never
encrypt. Decryption does not depend on provenance: a planted key only ever
protects data its planter can read anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from keymgr import errors
from keymgr.hsm import objects
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import ROLE_ATTRIBUTES, profile_named
from keymgr.keyring.facts import KeyRecord, KeyVersion

__all__ = ["VersionCheck", "check_version", "encrypt_refusal", "untrusted_keys"]


@dataclass(frozen=True)
class VersionCheck:
    """What :func:`check_version` found about one version: ``failures`` empty means sound."""

    name: str
    version: int
    key_id: bytes
    restored: bool
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        if self.failures:
            return "FAILED: " + "; ".join(self.failures)
        return "ok (restored: decrypts only)" if self.restored else "ok"


def _template_roles(profile: str) -> dict[str, bool]:
    try:
        template = profile_named(profile).template
    except errors.ConfigurationError:
        return {}
    return {name: bool(template.attributes.get(name)) for name in ROLE_ATTRIBUTES}


def _failures(ts: TokenSession, record: KeyRecord, version: KeyVersion, *, for_encryption: bool) -> list[str]:
    try:
        attrs = objects.key_attributes(ts, version.key_id).attributes
    except errors.KeyNotFoundError:
        return ["its key object is not on the token (destroyed by hand or by another host's sweep, or its "
                "facts are forged)"]
    except errors.PolicyError as exc:  # several objects share the CKA_ID: one of them was planted
        return [str(exc)]
    found: list[str] = []

    def want(name: str, value: object, why: str) -> None:
        if name not in attrs:
            found.append(f"the token does not report CKA_{name}")
        elif attrs[name] != value:
            found.append(f"CKA_{name} is {attrs[name]} ({why})")

    backup = version_is_backup_capable(record)
    if for_encryption:
        want("LOCAL", True, "not generated in this token")
        want("ALWAYS_SENSITIVE", True, "its value was readable once")
        if backup:
            want("WRAP_WITH_TRUSTED", True, "extractable without a trusted wrapping key")
        else:
            want("NEVER_EXTRACTABLE", True, "it could have been wrapped out")
    want("SENSITIVE", True, "its value is readable")
    if not backup:
        want("EXTRACTABLE", False, "it can be wrapped out")
    want("MODIFIABLE", False, "its attributes can be changed")
    if "COPYABLE" in attrs:  # PKCS#11 v2.40 attribute; older tokens do not know it
        want("COPYABLE", False, "it can be copied with weaker attributes")
    want("KEY_TYPE", "AES", "not an AES key")
    want("VALUE_LEN", 32, "not AES-256")
    profile = record.profile_of(version)
    for role, wanted in _template_roles(profile).items():
        if attrs.get(role, False) != wanted:
            found.append(f"CKA_{role} is {attrs.get(role, False)} (the {profile} profile "
                         f"{'needs' if wanted else 'forbids'} it)")
    actual = objects.check_value(ts, version.key_id)
    if version.kcv is not None and actual is not None and actual != version.kcv:
        found.append(f"its key check value is {actual}, not the recorded {version.kcv}")
    elif version.kcv is None and actual is not None:
        found.append("no key check value was recorded for it")
    return found


def version_is_backup_capable(record: KeyRecord) -> bool:
    return record.policy.backup


def encrypt_refusal(ts: TokenSession, record: KeyRecord, version: KeyVersion) -> str | None:
    """Why ``version`` may not encrypt, as one sentence, or None when its object proves itself."""
    where = f"key {record.name!r} version {version.version} (id {version.key_id.hex()})"
    if version.restored:
        return (f"{where} was restored from a backup, not generated in this token: it decrypts but never "
                f"encrypts; rotate the key to give it a version generated here (keymgr key rotate {record.name})")
    failures = _failures(ts, record, version, for_encryption=True)
    if not failures:
        return None
    return (f"{where} may not encrypt: {'; '.join(failures)}. Run keymgr key verify, then rotate "
            f"(docs/security.md, 'What a PIN holder can do to the keyring')")


def check_version(ts: TokenSession, record: KeyRecord, version: KeyVersion) -> VersionCheck:
    """Every check of a version, for ``keymgr key verify`` and ``key show``: a destroyed version
    must have no object left; a restored one must be safe to decrypt with; any other must also
    prove it was generated here."""
    if version.state == "destroyed":
        failures = [f"destroyed, but its key object is still on the token, so the data under it is still "
                    f"recoverable. If the audit log holds no destroy of this version, the fact is forged "
                    f"(docs/security.md): keep the object and restore the key from a backup. Otherwise a "
                    f"destroy stopped after its commit: finish it with keymgr key destroy {record.name} "
                    f"--version {version.version}, which checks again what a destroy checks"] \
            if objects.key_exists(ts, version.key_id) else []
    else:
        failures = _failures(ts, record, version, for_encryption=not version.restored)
    return VersionCheck(record.name, version.version, version.key_id, version.restored, tuple(failures))



def untrusted_keys(ts: TokenSession, labels: list[str]) -> list[str]:
    """One line per key under one of keymgr's singleton ``labels`` (the keyring's and the audit
    log's MAC keys) that keymgr ignores because the token did not make it or it could be read:
    a known-value key planted there would let its planter MAC records offline."""
    return [f"key {label!r} (id {key_id.hex()}) is ignored: {'; '.join(failed)} (not made by this token, or "
            "readable: planted?)" for label in labels for key_id, failed in objects.untrusted_singletons(ts, label)]
