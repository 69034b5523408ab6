"""What a token can really do, found by doing it.

Mechanism flags cannot be trusted (SoftHSM returns garbage flags for the AES
modes: STACK-FACTS.md 8) and a listed mechanism may still refuse the
parameters keymgr needs (SoftHSM lists RSA-OAEP but refuses SHA-256:
STACK-FACTS.md 7). So each capability is probed by performing the operation
on throwaway session objects (or, where a token refuses session objects,
token objects labelled ``keymgr-probe`` that are destroyed at once), and the
answer is cached per token for the life of the process. Upper layers choose
a recipient scheme from :class:`Capabilities`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.constants import DEFAULT
from pkcs11.mechanisms import GCMParams

from keymgr.hsm.sessions import TokenSession

__all__ = ["Capabilities", "probe", "SCHEMES", "ALL_CAPABILITIES"]

ALL_CAPABILITIES = (
    "aes-keygen", "aes-gcm", "aes-kw", "aes-kwp", "aes-kwp-3.0", "hmac-sha256",
    "rsa-keygen", "rsa-oaep-sha1", "rsa-oaep-sha224", "rsa-oaep-sha256", "rsa-oaep-sha384", "rsa-oaep-sha512",
    "rsa-pss-sign",
    "ec-keygen", "ecdh-p256", "ecdh-p384", "ecdsa-sign", "data-objects",
)

#: keymgr's recipient schemes and the capabilities each needs (any one set suffices).
SCHEMES: dict[str, tuple[tuple[str, ...], ...]] = {
    "kek-kw": (("aes-keygen", "aes-kw"), ("aes-keygen", "aes-kwp"), ("aes-keygen", "aes-kwp-3.0")),
    "kek-gcm": (("aes-keygen", "aes-gcm"),),
    "rsa-oaep": (("rsa-oaep-sha256",), ("rsa-oaep-sha1",), ("rsa-oaep-sha384",), ("rsa-oaep-sha512",),
                 ("rsa-oaep-sha224",)),
    "ecdh": (("ecdh-p256",), ("ecdh-p384",)),
    "keyring-metadata": (("hmac-sha256", "data-objects"),),
}


@dataclass(frozen=True)
class Capabilities:
    """The probed capabilities of one token."""

    token_label: str
    supported: frozenset[str] = field(default_factory=frozenset)

    def has(self, capability: str) -> bool:
        return capability in self.supported

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(
            name for name, alternatives in SCHEMES.items()
            if any(all(self.has(c) for c in needed) for needed in alternatives)
        )

    def preferred_wrap_mechanism(self) -> str | None:
        """aes-kw first: a 32-byte data key needs no padding and OpenSSL reads only RFC 3394."""
        for name in ("aes-kw", "aes-kwp", "aes-kwp-3.0"):
            if self.has(name):
                return name
        return None

    def oaep_hash(self) -> str | None:
        """The hash to encrypt to this token's RSA keys with: SHA-256 where it can, else SHA-1
        (SoftHSM 2.6.1), else the first other it can."""
        for name in ("sha256", "sha1", "sha384", "sha512", "sha224"):
            if self.has(f"rsa-oaep-{name}"):
                return name
        return None

    def oaep_hashes(self) -> tuple[str, ...]:
        """Every RFC 4055 hash this token decrypts RSA-OAEP with (MGF1 with the same hash)."""
        return tuple(name for name in ("sha1", "sha224", "sha256", "sha384", "sha512") if self.has(f"rsa-oaep-{name}"))


_cache: dict[tuple[str, str, str, bool], Capabilities] = {}
_cache_lock = threading.Lock()


def probe(ts: TokenSession, *, refresh: bool = False) -> Capabilities:
    """Probe (once per process and login state) what the token can do.

    Without a login, key pairs are probed as public session objects where the
    token allows them (SoftHSM); tokens that make key pairs only as token objects
    (the TPM) need a login to show their RSA / EC capabilities.
    """
    key = (ts.module.path, ts.serial, ts.label, ts.logged_in)
    with _cache_lock:
        if not refresh and key in _cache:
            return _cache[key]
    supported = set(ts.run("probe capabilities", _probe_all))
    caps = Capabilities(ts.label, frozenset(supported))
    with _cache_lock:
        _cache[key] = caps
    return caps


#: Probe objects are public (CKA_PRIVATE false), so a probe without a login can make them:
#: SoftHSM refuses to create a private object, even a session one, before C_Login.
_SESSION_SECRET = {Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.SENSITIVE: True,
                   Attribute.EXTRACTABLE: False}


def _aes(session: Any, **roles: bool) -> Any:
    template = dict(_SESSION_SECRET)
    template.update({Attribute[name.upper()]: value for name, value in roles.items()})
    return session.generate_key(KeyType.AES, 256, store=False, template=template)


def _probe_aes_gcm(session: Any) -> bool:
    key = _aes(session, encrypt=True, decrypt=True)
    try:
        params = GCMParams(os.urandom(12), b"probe", 128)
        ct = key.encrypt(b"\x00" * 32, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        return bytes(key.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=params)) == b"\x00" * 32
    finally:
        key.destroy()


def _probe_wrap(mechanism: int) -> Callable[[Any], bool]:
    def run(session: Any) -> bool:
        kek = _aes(session, wrap=True, unwrap=True)
        dek = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                     Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.VALUE: os.urandom(32),
                                     Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
        try:
            wrapped = kek.wrap_key(dek, mechanism=Mechanism(mechanism))
            back = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism(mechanism),
                                  store=False, template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
                                                         Attribute.PRIVATE: False})
            same = back[Attribute.VALUE] == dek[Attribute.VALUE]
            back.destroy()
            return bool(same)
        finally:
            dek.destroy()
            kek.destroy()
    return run


def _probe_hmac(session: Any) -> bool:
    key = session.generate_key(KeyType.GENERIC_SECRET, 256, store=False,
                               template={**_SESSION_SECRET, Attribute.SIGN: True, Attribute.VERIFY: True})
    try:
        mac = key.sign(b"probe", mechanism=Mechanism.SHA256_HMAC)
        return len(mac) == 32 and bool(key.verify(b"probe", mac, mechanism=Mechanism.SHA256_HMAC))
    finally:
        key.destroy()


_PROBE_LABEL = "keymgr-probe"


def _destroy(*objects: Any) -> None:
    """Destroy every object given, even when destroying one of them fails."""
    for obj in objects:
        with contextlib.suppress(p11x.PKCS11Error):
            obj.destroy()


def _sweep_probe_objects(session: Any) -> None:
    """Remove token key pairs a probe left behind (a process killed mid-probe)."""
    for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        _destroy(*session.get_objects({Attribute.CLASS: object_class, Attribute.TOKEN: True,
                                       Attribute.LABEL: _PROBE_LABEL}))


def _keypair(session: Any, key_type: KeyType, param: Any) -> tuple[Any, Any]:
    """A throwaway key pair: a session pair (public objects, so no login is needed), or
    token objects labelled ``keymgr-probe`` where sessions are refused (TPM), destroyed
    by the caller (and swept at the next probe should the process die first)."""
    session_template = {Attribute.PRIVATE: False}
    try:
        if key_type == KeyType.RSA:
            return session.generate_keypair(KeyType.RSA, 2048, store=False,  # type: ignore[no-any-return]
                                            private_template=session_template)
        return session.create_domain_parameters(  # type: ignore[no-any-return]
            KeyType.EC, {Attribute.EC_PARAMS: param}, local=True).generate_keypair(
            store=False, private_template=session_template)
    except p11x.PKCS11Error:
        template = {Attribute.DERIVE: DEFAULT, Attribute.WRAP: DEFAULT, Attribute.UNWRAP: DEFAULT,
                    Attribute.ENCRYPT: DEFAULT, Attribute.DECRYPT: DEFAULT, Attribute.SIGN: DEFAULT,
                    Attribute.VERIFY: DEFAULT}
        label = _PROBE_LABEL
        if key_type == KeyType.RSA:
            return session.generate_keypair(KeyType.RSA, 2048, store=True, label=label,  # type: ignore[no-any-return]
                                            public_template=template, private_template=template)
        return session.create_domain_parameters(  # type: ignore[no-any-return]
            KeyType.EC, {Attribute.EC_PARAMS: param}, local=True).generate_keypair(
            store=True, label=label, public_template=template, private_template=template)


def _probe_rsa(session: Any, results: set[str]) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    pub, priv = _keypair(session, KeyType.RSA, None)
    results.add("rsa-keygen")
    try:
        numbers = rsa.RSAPublicNumbers(int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                                       int.from_bytes(pub[Attribute.MODULUS], "big"))
        host_pub = numbers.public_key()
        for name, host_hash, mech, mgf in (("sha1", hashes.SHA1(), Mechanism.SHA_1, MGF.SHA1),  # noqa: S303 - OAEP-SHA1 probe
                                           ("sha224", hashes.SHA224(), Mechanism.SHA224, MGF.SHA224),
                                           ("sha256", hashes.SHA256(), Mechanism.SHA256, MGF.SHA256),
                                           ("sha384", hashes.SHA384(), Mechanism.SHA384, MGF.SHA384),
                                           ("sha512", hashes.SHA512(), Mechanism.SHA512, MGF.SHA512)):
            ct = host_pub.encrypt(b"probe", padding.OAEP(padding.MGF1(host_hash), host_hash, None))
            try:
                if bytes(priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP,
                                      mechanism_param=(mech, mgf, None))) == b"probe":
                    results.add(f"rsa-oaep-{name}")
            except p11x.PKCS11Error:
                pass
        try:
            priv.sign(b"probe", mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                      mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))
            results.add("rsa-pss-sign")
        except p11x.PKCS11Error:
            pass
    finally:
        _destroy(priv, pub)


def _probe_ec(session: Any, results: set[str]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11.util.ec import encode_named_curve_parameters

    for curve, name in ((ec.SECP256R1(), "p256"), (ec.SECP384R1(), "p384")):
        try:
            pub, priv = _keypair(session, KeyType.EC, encode_named_curve_parameters(curve.name))
        except p11x.PKCS11Error:
            continue
        results.add("ec-keygen")
        try:
            if name == "p256":
                # ECDSA-SHA256 in the token, or (SoftHSM 2.6.1) CKM_ECDSA over a host digest
                for mechanism, message in ((Mechanism.ECDSA_SHA256, b"probe"), (Mechanism.ECDSA, bytes(32))):
                    try:
                        if len(priv.sign(message, mechanism=mechanism)) == 64:
                            results.add("ecdsa-sign")
                            break
                    except p11x.PKCS11Error:
                        pass
            peer = ec.generate_private_key(curve).public_key()
            from cryptography.hazmat.primitives import serialization
            point = peer.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            try:
                derived = priv.derive_key(KeyType.GENERIC_SECRET, 256, mechanism=Mechanism.ECDH1_DERIVE,
                                          mechanism_param=(pkcs11.KDF.NULL, None, point), store=False,
                                          template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
                                                    Attribute.PRIVATE: False})
                derived.destroy()
                results.add(f"ecdh-{name}")
            except p11x.PKCS11Error:
                pass
        finally:
            _destroy(priv, pub)


def _probe_data_objects(session: Any) -> bool:
    obj = session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: False,
                                 Attribute.LABEL: "keymgr-probe", Attribute.VALUE: b"probe"})
    obj.destroy()
    return True


def _attempt(results: set[str], name: str, check: Callable[[Any], bool], session: Any) -> None:
    try:
        if check(session):
            results.add(name)
    except (p11x.PKCS11Error, AttributeError, TypeError, ValueError):
        pass


def _probe_all(session: Any) -> set[str]:
    results: set[str] = set()
    _attempt(results, "aes-keygen", lambda s: _aes(s, encrypt=True).destroy() is None, session)
    _attempt(results, "aes-gcm", _probe_aes_gcm, session)
    for name in ("aes-kw", "aes-kwp", "aes-kwp-3.0"):
        from keymgr.hsm.objects import WRAP_MECHANISMS
        _attempt(results, name, _probe_wrap(WRAP_MECHANISMS[name]), session)
    _attempt(results, "hmac-sha256", _probe_hmac, session)
    _attempt(results, "data-objects", _probe_data_objects, session)
    with contextlib.suppress(p11x.PKCS11Error):
        _sweep_probe_objects(session)
    for prober in (_probe_rsa, _probe_ec):
        with contextlib.suppress(p11x.PKCS11Error, AttributeError, TypeError, ValueError):
            prober(session, results)
    return results
