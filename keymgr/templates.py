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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "KeyTemplate",
    "KEK_WRAP",
    "KEK_GCM",
    "MAC_KEY",
    "TRANSPORT_KEY",
    "EPHEMERAL_DATA_KEY",
    "TEMPLATES",
    "ROLE_ATTRIBUTES",
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

#: HMAC-SHA256 key that authenticates keymgr's metadata and audit entries.
MAC_KEY = KeyTemplate("mac", "GENERIC_SECRET", 256, {**_PROTECTED, **_roles("SIGN", "VERIFY")})

#: One-time transport key for backups: wraps long-term keys, never decrypts data.
TRANSPORT_KEY = KeyTemplate(
    "transport", "AES", 256, {**_PROTECTED, "TOKEN": False, **_roles("WRAP", "UNWRAP")}
)

#: A data key briefly made a session object so that C_WrapKey can wrap it (STACK-FACTS.md 5).
#: It is the one template that is extractable: its value is generated on the host anyway.
EPHEMERAL_DATA_KEY = KeyTemplate(
    "ephemeral-data-key",
    "AES",
    256,
    {"TOKEN": False, "PRIVATE": True, "SENSITIVE": False, "EXTRACTABLE": True, **_roles()},
)

TEMPLATES: Mapping[str, KeyTemplate] = MappingProxyType(
    {t.purpose: t for t in (KEK_WRAP, KEK_GCM, MAC_KEY, TRANSPORT_KEY, EPHEMERAL_DATA_KEY)}
)
