"""Key templates: purpose is policy.

Every key keymgr creates has exactly one purpose, and its PKCS#11 attributes
say so. Templates are data, declared once here and read by the token layer
(which turns attribute names into ``CKA_*`` constants) and by the tests that
read the attributes back from the token and by the API-attack suite.

Why these attributes (DESIGN.md, "Key templates"; Clulow 2003; Delaune,
Kremer & Steel 2008; Bortolozzo et al. "Attacking and fixing PKCS#11", 2010):

* ``SENSITIVE`` true and ``EXTRACTABLE`` false: the value cannot be read or
  wrapped out. Both are one-way ("sticky") in PKCS#11, and ``MODIFIABLE``
  false refuses any C_SetAttributeValue on top; ``COPYABLE`` false refuses
  C_CopyObject, the classic way to obtain a copy with weaker attributes.
* One role per key: a KEK that wraps never decrypts (defeats Clulow's
  wrap-then-decrypt); a KEK that decrypts never unwraps (defeats
  encrypt-then-unwrap); no key has ``DERIVE`` (SoftHSM derives a readable key
  from a KEK with AES_ECB_ENCRYPT_DATA: STACK-FACTS.md 10).
* ``WRAP_WITH_TRUSTED`` true: should a token ever let the key be wrapped, only a
  trusted (SO-marked) transport key may do it.
* ``PRIVATE`` true: nothing about the key is visible without logging in.

A key's *profile* (:class:`Profile`: ``kw`` or ``gcm``) is data too: its KEK template,
whether it wraps or encrypts data keys, the CMS algorithms it reads, and the bound on
its uses. Code asks the profile (``profile.wraps``), never compares its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from keymgr import errors

__all__ = [
    "KeyTemplate",
    "Profile",
    "PROFILES",
    "DEFAULT_PROFILE",
    "GCM_RANDOM_NONCE_LIMIT",
    "profile_named",
    "KW_PROFILE",
    "GCM_PROFILE",
    "KEK_WRAP",
    "KEK_GCM",
    "MAC_KEY",
    "INDEX_KEY",
    "TRANSPORT_KEY",
    "TRANSPORT_EXPORT",
    "TRANSPORT_IMPORT",
    "EPHEMERAL_DATA_KEY",
    "backup_capable",
    "TEMPLATES",
    "ROLE_ATTRIBUTES",
    "KEYPAIR_PRIVATE",
    "KEYPAIR_PUBLIC",
]

#: Attributes that grant a capability; a purpose turns on some and every other one is off.
ROLE_ATTRIBUTES = ("ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN", "VERIFY", "DERIVE")

_PROTECTED = {
    "TOKEN": True,
    "PRIVATE": True,
    "SENSITIVE": True,
    "EXTRACTABLE": False,
    "MODIFIABLE": False,
    "COPYABLE": False,
    "WRAP_WITH_TRUSTED": True,
}


def _roles(*enabled: str) -> dict[str, bool]:
    return {name: name in enabled for name in ROLE_ATTRIBUTES}


@dataclass(frozen=True)
class KeyTemplate:
    """What a key of one purpose looks like inside the token."""

    purpose: str
    key_type: str  # "AES" or "GENERIC_SECRET"
    bits: int
    attributes: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(name for name in ROLE_ATTRIBUTES if self.attributes.get(name))


#: Data-key KEK for the ``kw`` profile: wraps and unwraps data keys (RFC 3394 / 5649), nothing else.
KEK_WRAP = KeyTemplate("kek-wrap", "AES", 256, {**_PROTECTED, **_roles("WRAP", "UNWRAP")})

#: Data-key KEK for the ``gcm`` profile: encrypts and decrypts 32-byte data keys with
#: AES-GCM in the token (one C_Encrypt per message); cannot wrap or unwrap objects.
KEK_GCM = KeyTemplate("kek-gcm", "AES", 256, {**_PROTECTED, **_roles("ENCRYPT", "DECRYPT")})

#: NIST SP 800-38D 8.3: at most 2^32 GCM invocations with random 96-bit IVs under one key.
GCM_RANDOM_NONCE_LIMIT = 1 << 32


@dataclass(frozen=True)
class Profile:
    """How a data-key KEK protects data keys (a key's *profile*, chosen at creation; docs/format.md).

    The keyring stores only :attr:`name`; everything that differs between profiles is read
    from here, never decided by comparing names."""

    #: the name kept in the keyring's facts and shown to people
    name: str
    #: the KEK's attributes in the token
    template: KeyTemplate
    #: True: the data key is wrapped by C_WrapKey (AES-KW, RFC 3394, or AES-KWP, RFC 5649, as the
    #: token offers); False: it is encrypted by one C_Encrypt with AES-256-GCM under the KEK
    wraps: bool
    #: the CMS key-encryption algorithms (``recipients.KekAlgorithm``) a KEK of this profile
    #: writes and reads; a recipient with any other is not its own
    kek_algorithms: frozenset[str]
    #: encryptions one KEK version may make whatever the key's policy says (None: no bound)
    use_bound: int | None


#: Data-key KEKs that wrap: the standard form OpenSSL and every CMS reader understand.
KW_PROFILE = Profile("kw", KEK_WRAP, wraps=True, kek_algorithms=frozenset({"aes256_wrap", "aes256_wrap_pad"}),
                     use_bound=None)
#: Data-key KEKs that encrypt with AES-GCM under random nonces: one token call per message, no
#: key objects, and at most :data:`GCM_RANDOM_NONCE_LIMIT` messages per version.
GCM_PROFILE = Profile("gcm", KEK_GCM, wraps=False, kek_algorithms=frozenset({"aes256_gcm"}),
                      use_bound=GCM_RANDOM_NONCE_LIMIT)

PROFILES: Mapping[str, Profile] = MappingProxyType({p.name: p for p in (KW_PROFILE, GCM_PROFILE)})
#: The profile of keys created without one: standard RFC 3394 key wrap, which OpenSSL and every
#: CMS reader understand, needs no nonce and works on FIPS-mode HSMs that refuse caller-chosen
#: GCM IVs; measured against ``gcm`` in docs/performance.md ("Default profile").
DEFAULT_PROFILE = KW_PROFILE.name


def profile_named(name: str) -> Profile:
    """The profile called ``name``; ConfigurationError for one this keymgr does not know."""
    found = PROFILES.get(name)
    if found is None:
        raise errors.ConfigurationError(f"unknown key profile {name!r} (choose from {', '.join(PROFILES)})")
    return found


#: HMAC-SHA256 key that authenticates keymgr's metadata and audit entries.
MAC_KEY = KeyTemplate("mac", "GENERIC_SECRET", 256, {**_PROTECTED, **_roles("SIGN", "VERIFY")})

#: HMAC-SHA256 key of one blind index version (keymgr.fields.index): computes search terms
#: inside the token; like MAC_KEY it only signs and verifies, and never leaves the token.
INDEX_KEY = KeyTemplate("blind-index", "GENERIC_SECRET", 256, {**_PROTECTED, **_roles("SIGN", "VERIFY")})

#: One-time transport key for backups: wraps long-term keys, never decrypts data.
TRANSPORT_KEY = KeyTemplate(
    "transport", "AES", 256, {**_PROTECTED, "TOKEN": False, **_roles("WRAP", "UNWRAP")}
)

#: The transport key on the exporting token: wraps only, and is CKA_TRUSTED, the one attribute
#: that lets it wrap keys marked WRAP_WITH_TRUSTED. Only the security officer may set TRUSTED
#: (PKCS#11 v2.40 section 4.9; SoftHSM 2.6.1 refuses it to the user with CKR_ATTRIBUTE_READ_ONLY),
#: and an SO session cannot make private objects, so this key is public: it lives for one backup
#: in one session and is destroyed with it (docs/ceremonies.md, "Why the SO PIN").
TRANSPORT_EXPORT = KeyTemplate(
    "transport-export", "AES", 256,
    {**_PROTECTED, "TOKEN": False, "PRIVATE": False, "TRUSTED": True, **_roles("WRAP")},
)

#: The transport key on the restoring token: unwraps only, a private session object.
TRANSPORT_IMPORT = KeyTemplate("transport-import", "AES", 256, {**_PROTECTED, "TOKEN": False, **_roles("UNWRAP")})


def backup_capable(template: KeyTemplate) -> KeyTemplate:
    """``template`` for a key that may be backed up: EXTRACTABLE, yet still SENSITIVE and
    WRAP_WITH_TRUSTED, so only a trusted transport key (:data:`TRANSPORT_EXPORT`, which
    needs the SO) can wrap it out, and never in the clear. Keys made from the plain
    template can never leave the token (EXTRACTABLE false is sticky)."""
    return KeyTemplate(f"{template.purpose}+backup", template.key_type, template.bits,
                       {**template.attributes, "EXTRACTABLE": True})


#: A data key briefly made a session object so that C_WrapKey can wrap it (STACK-FACTS.md 5).
#: It is the one template that is extractable: its value is generated on the host anyway.
EPHEMERAL_DATA_KEY = KeyTemplate(
    "ephemeral-data-key",
    "AES",
    256,
    {"TOKEN": False, "PRIVATE": True, "SENSITIVE": False, "EXTRACTABLE": True, **_roles()},
)

TEMPLATES: Mapping[str, KeyTemplate] = MappingProxyType(
    {t.purpose: t for t in (KEK_WRAP, KEK_GCM, MAC_KEY, INDEX_KEY, TRANSPORT_KEY, TRANSPORT_EXPORT, TRANSPORT_IMPORT,
                            EPHEMERAL_DATA_KEY)}
)

#: Key pairs (custodian keys, recipients' keys; RSA or EC, generated on the owner's token):
#: the private half signs approvals and recovers data keys, never unwraps into the token.
#: keymgr.hsm.asym turns on the one recovery role by key type: DECRYPT (RSA-OAEP) for RSA
#: with ENCRYPT on the public half, DERIVE (ECDH) for EC.
KEYPAIR_PRIVATE: Mapping[str, bool] = MappingProxyType(
    {**_PROTECTED, "WRAP_WITH_TRUSTED": False, "SIGN": True, "DECRYPT": False, "DERIVE": False, "UNWRAP": False}
)
KEYPAIR_PUBLIC: Mapping[str, bool] = MappingProxyType(
    {"TOKEN": True, "PRIVATE": False, "VERIFY": True, "ENCRYPT": False, "WRAP": False}
)
