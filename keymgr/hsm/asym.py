"""Key pairs on tokens: the asymmetric half of the token layer.

Custodian keys, PIV slot keys and TPM keys are RSA or EC key pairs whose
private half never leaves the token. This module generates them on the token
(``C_GenerateKeyPair``: sensitive, non-extractable token objects), finds them
again by label or CKA_ID, reads their public half, and performs the four
private-key operations keymgr needs:

* :func:`rsa_oaep_decrypt`: RSAES-OAEP (RFC 8017 section 7.1) with any RFC 4055
  hash the token does and MGF1, for ``KeyTransRecipientInfo`` (RFC 4055);
* :func:`ecdh_derive`: the raw ECDH shared secret Z (SP 800-56A section
  5.7.1.2, ``CKM_ECDH1_DERIVE`` with ``CKD_NULL``) for RFC 5753 key agreement;
  the X9.63 KDF runs on the host, because few tokens (no PIV card) implement
  ``CKD_SHA256_KDF`` with shared info;
* :func:`sign`: ECDSA with SHA-256 / SHA-384 (DER signature, RFC 3279) or
  RSASSA-PSS with SHA-256, MGF1-SHA-256, 32-byte salt (RFC 8017 section 8.1).

Every operation honours ``CKA_ALWAYS_AUTHENTICATE`` (PIV's signature slot,
many smart cards): the PIN is asked again through the token's PIN source or
callback (:meth:`TokenSession.context_pin`) and the context-specific
``C_Login`` happens right after the operation is initialised, as PKCS#11
v2.40 section 4.4 requires. Peer points are validated on the host before
they reach the token (invalid-curve attacks: Biehl, Meyer, Müller 2000;
Jager, Schwenk, Somorovsky 2015).

Tokens differ in the templates they accept: SoftHSM takes an explicit
"every other role off" template; tpm2-pkcs11 answers ``CKR_GENERAL_ERROR``
to explicit ``false`` roles and to ``CKA_ENCRYPT``/``CKA_VERIFY`` on the
public half, so generation falls back to a template that states only
what must hold (sensitive, non-extractable, private, the needed roles) and
then checks the result by reading the attributes back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11x
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import load_der_x509_certificate
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import encode_named_curve_parameters

from keymgr import errors
from keymgr.hsm._errors import missing_role
from keymgr.hsm.pins import Pin
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import KEYPAIR_PRIVATE, KEYPAIR_PUBLIC, ROLE_ATTRIBUTES

__all__ = [
    "KINDS",
    "KeyPairRef",
    "ecdh_derive",
    "find_keypair",
    "generate_keypair",
    "list_keypairs",
    "public_key",
    "rsa_oaep_decrypt",
    "sign",
    "visible_public_keys",
]

T = TypeVar("T")

#: keymgr's key-pair kinds: (PKCS#11 key type, RSA modulus bits or named curve).
KINDS: dict[str, tuple[KeyType, int | str]] = {
    "ec-p256": (KeyType.EC, "secp256r1"),
    "ec-p384": (KeyType.EC, "secp384r1"),
    "rsa-2048": (KeyType.RSA, 2048),
    "rsa-3072": (KeyType.RSA, 3072),
    "rsa-4096": (KeyType.RSA, 4096),
}
_CURVES: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}
_CURVE_BY_PARAMS = {encode_named_curve_parameters(name): name for name in _CURVES}
#: RFC 4055 section 2.1's hashes: (CKM_ of the hash, CKG_MGF1_ of the mask)
_OAEP = {"sha1": (Mechanism.SHA_1, MGF.SHA1), "sha224": (Mechanism.SHA224, MGF.SHA224),
         "sha256": (Mechanism.SHA256, MGF.SHA256), "sha384": (Mechanism.SHA384, MGF.SHA384),
         "sha512": (Mechanism.SHA512, MGF.SHA512)}
_ECDSA = {"secp256r1": (Mechanism.ECDSA_SHA256, hashlib.sha256), "secp384r1": (Mechanism.ECDSA_SHA384, hashlib.sha384)}
#: Token answers to a template it will not take (tpm2-pkcs11 says CKR_GENERAL_ERROR).
_TEMPLATE_REFUSED = (p11x.GeneralError, p11x.TemplateInconsistent, p11x.TemplateIncomplete,
                     p11x.AttributeTypeInvalid, p11x.AttributeValueInvalid, p11x.AttributeReadOnly,
                     p11x.FunctionFailed)
_UNSUPPORTED = (p11x.MechanismInvalid, p11x.MechanismParamInvalid, p11x.KeySizeRange, p11x.FunctionNotSupported)
_BAD_CIPHERTEXT = (p11x.EncryptedDataInvalid, p11x.EncryptedDataLenRange, p11x.DataInvalid, p11x.DataLenRange)
_NOT_AUTHENTIC = "the encrypted key is not authentic"


@dataclass(frozen=True)
class KeyPairRef:
    """A key pair on a token, by name; holds no secret and no handle."""

    token_label: str
    key_id: bytes
    label: str
    kind: str  # one of KINDS

    @property
    def is_rsa(self) -> bool:
        return self.kind.startswith("rsa-")

    @property
    def curve(self) -> str | None:
        """The named curve of an EC pair (``secp256r1`` / ``secp384r1``)."""
        return str(KINDS[self.kind][1]) if not self.is_rsa else None


def _check_kind(kind: str) -> tuple[KeyType, int | str]:
    try:
        return KINDS[kind]
    except KeyError:
        raise errors.ConfigurationError(f"unknown key-pair type {kind!r} (one of {', '.join(KINDS)})") from None


def _attrs(names: dict[str, bool]) -> dict[Attribute, Any]:
    return {Attribute[name]: value for name, value in names.items()}


def _templates(key_type: KeyType, strict: bool) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
    """(public, private) templates: every role stated (strict), or only what must hold (loose)."""
    rsa_pair = key_type == KeyType.RSA
    private = {**KEYPAIR_PRIVATE, ("DECRYPT" if rsa_pair else "DERIVE"): True}
    public = {**KEYPAIR_PUBLIC, "ENCRYPT": rsa_pair}
    if strict:
        return _attrs(public), _attrs(private)
    must = {name: value for name, value in private.items()
            if name in ("PRIVATE", "SENSITIVE", "EXTRACTABLE") or (name in ROLE_ATTRIBUTES and value)}
    loose: dict[Attribute, Any] = {Attribute[name]: DEFAULT for name in ROLE_ATTRIBUTES}
    loose.update(_attrs(must))
    return {Attribute[name]: DEFAULT for name in ROLE_ATTRIBUTES}, loose


def _matching(session: Any, object_class: ObjectClass, key_id: bytes | None, label: str | None) -> list[Any]:
    query: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if key_id is not None:
        query[Attribute.ID] = key_id
    if label:
        query[Attribute.LABEL] = label
    return list(session.get_objects(query))


def _read(obj: Any, attribute: Attribute, default: Any = None) -> Any:
    try:
        return obj[attribute]
    except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, NotImplementedError, KeyError):
        return default


def _kind_of(private: Any, public: Any | None) -> str | None:
    """keymgr's kind for a key object pair; None for a kind keymgr does not use."""
    key_type = _read(private, Attribute.KEY_TYPE)
    if key_type == KeyType.RSA:
        modulus = _read(private, Attribute.MODULUS) or (public is not None and _read(public, Attribute.MODULUS))
        bits = int.from_bytes(bytes(modulus), "big").bit_length() if modulus else 0
        kind = f"rsa-{bits}"
    elif key_type == KeyType.EC:
        params = _read(private, Attribute.EC_PARAMS) or (public is not None and _read(public, Attribute.EC_PARAMS))
        curve = _CURVE_BY_PARAMS.get(bytes(params)) if params else None
        kind = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(curve or "", "")
    else:
        return None
    return kind if kind in KINDS else None


def _ref(ts: TokenSession, session: Any, private: Any) -> KeyPairRef:
    key_id = bytes(_read(private, Attribute.ID, b"") or b"")
    label = str(_read(private, Attribute.LABEL, "") or "")
    publics = _matching(session, ObjectClass.PUBLIC_KEY, key_id, None) if key_id else []
    kind = _kind_of(private, publics[0] if publics else None)
    if kind is None:
        raise errors.MechanismUnsupportedError(
            f"key pair {label!r} on token {ts.label!r} is of a type keymgr does not use "
            f"(keymgr uses {', '.join(KINDS)})")
    return KeyPairRef(token_label=ts.label, key_id=key_id, label=label, kind=kind)


def generate_keypair(ts: TokenSession, kind: str, *, label: str, key_id: bytes | None = None) -> KeyPairRef:
    """Generate a key pair on the token: private half sensitive, non-extractable, token objects.

    Refuses (:class:`~keymgr.errors.PolicyError`) a label or id already in use,
    so a custodian's key is never shadowed by a second one of the same name.
    """
    key_type, size = _check_kind(kind)
    if not label:
        raise errors.ConfigurationError("a key pair needs a label")
    key_id = os.urandom(16) if key_id is None else bytes(key_id)

    def generate(session: Any, strict: bool) -> tuple[Any, Any]:
        public, private = _templates(key_type, strict)
        if key_type == KeyType.RSA:
            return session.generate_keypair(KeyType.RSA, int(size), store=True, label=label, id=key_id,  # type: ignore[no-any-return]
                                            public_template=public, private_template=private)
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(str(size))}, local=True)
        return params.generate_keypair(store=True, label=label, id=key_id,  # type: ignore[no-any-return]
                                       public_template=public, private_template=private)

    def call(session: Any) -> KeyPairRef:
        for clash in (_matching(session, ObjectClass.PRIVATE_KEY, None, label),
                      _matching(session, ObjectClass.PRIVATE_KEY, key_id, None)):
            if clash:
                raise errors.PolicyError(f"token {ts.label!r} already has a key pair with this label or id "
                                         f"({label!r}); choose another or use the existing one")
        try:
            pub, priv = generate(session, strict=True)
        except _TEMPLATE_REFUSED:
            try:
                pub, priv = generate(session, strict=False)
            except _TEMPLATE_REFUSED[1:] + _UNSUPPORTED as exc:  # GeneralError may be removal: run() decides
                raise errors.MechanismUnsupportedError(
                    f"token {ts.label!r} cannot generate {kind} key pairs ({type(exc).__name__}); "
                    "use a type it supports, or the token vendor's tool and `keymgr token pubkey`") from exc
        if _read(priv, Attribute.SENSITIVE) is not True or _read(priv, Attribute.EXTRACTABLE) is not False:
            pub.destroy()
            priv.destroy()
            raise errors.PolicyError(f"token {ts.label!r} made a private key that is extractable or not "
                                     "sensitive; it was destroyed")
        return KeyPairRef(token_label=ts.label, key_id=key_id, label=label, kind=kind)

    return ts.run(f"generate {kind} key pair {label!r}", call)


def find_keypair(ts: TokenSession, *, label: str | None = None, key_id: bytes | None = None) -> KeyPairRef:
    """The one key pair with this label and/or CKA_ID (a private key object must exist)."""
    if not label and key_id is None:
        raise errors.ConfigurationError("name a key pair by label or id")

    def call(session: Any) -> KeyPairRef:
        found = _matching(session, ObjectClass.PRIVATE_KEY, key_id, label)
        what = f"label {label!r}" if label else f"id {key_id.hex() if key_id else ''}"
        if not found:
            raise errors.KeyNotFoundError(f"no private key with {what} on token {ts.label!r} "
                                          "(is the PIN given? private keys are visible only after login)")
        if len(found) > 1:
            raise errors.PolicyError(f"{len(found)} private keys match {what} on token {ts.label!r}; "
                                     "name one by id")
        return _ref(ts, session, found[0])

    return ts.run("find key pair", call)


def list_keypairs(ts: TokenSession) -> list[KeyPairRef]:
    """Every private key on the token that keymgr can use (RSA 2048-4096, P-256, P-384)."""

    def call(session: Any) -> list[KeyPairRef]:
        refs = []
        for private in _matching(session, ObjectClass.PRIVATE_KEY, None, None):
            try:
                refs.append(_ref(ts, session, private))
            except errors.MechanismUnsupportedError:
                continue
        return refs

    return ts.run("list key pairs", call)


def _public_from_objects(session: Any, ref: KeyPairRef) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    for public in _matching(session, ObjectClass.PUBLIC_KEY, ref.key_id, None):
        if ref.is_rsa:
            n, e = _read(public, Attribute.MODULUS), _read(public, Attribute.PUBLIC_EXPONENT)
            if n and e:
                return _rsa_public(n, e)
        else:
            point = _read(public, Attribute.EC_POINT)
            if point:
                return _ec_public(ref, bytes(point))
    for cert in _matching(session, ObjectClass.CERTIFICATE, ref.key_id, None):
        value = _read(cert, Attribute.VALUE)
        if value:
            key = load_der_x509_certificate(bytes(value)).public_key()
            if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
                return key
    if ref.is_rsa:  # RSA private keys carry their public numbers (PKCS#11 v2.40 section 2.1.3)
        for private in _matching(session, ObjectClass.PRIVATE_KEY, ref.key_id, ref.label or None):
            n, e = _read(private, Attribute.MODULUS), _read(private, Attribute.PUBLIC_EXPONENT)
            if n and e:
                return _rsa_public(n, e)
    raise errors.KeyNotFoundError(
        f"no public key or certificate for key pair {ref.label!r} on token {ref.token_label!r}")


def _rsa_public(modulus: bytes, exponent: bytes) -> rsa.RSAPublicKey:
    numbers = rsa.RSAPublicNumbers(int.from_bytes(bytes(exponent), "big"), int.from_bytes(bytes(modulus), "big"))
    return numbers.public_key()


def _ec_public(ref: KeyPairRef, point: bytes) -> ec.EllipticCurvePublicKey:
    return _ec_point_key(str(ref.curve), point)


def _ec_point_key(curve: str, point: bytes) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT is a DER OCTET STRING on most tokens, the bare point on a few."""
    if point[:1] == b"\x04" and len(point) > 2 and point[1] < 0x80 and len(point) == point[1] + 2:
        point = point[2:]
    elif point[:2] == b"\x04\x81" and len(point) == point[2] + 3:
        point = point[3:]
    return load_ec_point(curve, point)


def _public_object_key(obj: Any) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None:
    """The key of a CKO_PUBLIC_KEY object, or None for a kind keymgr does not use."""
    key_type = _read(obj, Attribute.KEY_TYPE)
    if key_type == KeyType.RSA:
        n, e = _read(obj, Attribute.MODULUS), _read(obj, Attribute.PUBLIC_EXPONENT)
        return _rsa_public(n, e) if n and e else None
    params, point = _read(obj, Attribute.EC_PARAMS), _read(obj, Attribute.EC_POINT)
    curve = _CURVE_BY_PARAMS.get(bytes(params)) if key_type == KeyType.EC and params else None
    if curve is None or not point:
        return None
    try:
        return _ec_point_key(curve, bytes(point))
    except errors.FormatError:
        return None


def visible_public_keys(ts: TokenSession) -> list[rsa.RSAPublicKey | ec.EllipticCurvePublicKey]:
    """The public keys a token shows without login (public-key objects and certificates): how
    a custodian's token is recognised before anyone types its PIN. A token may show none (a
    card that keeps even public objects private): then only a login can tell."""

    def call(session: Any) -> list[rsa.RSAPublicKey | ec.EllipticCurvePublicKey]:
        keys = [k for k in map(_public_object_key, _matching(session, ObjectClass.PUBLIC_KEY, None, None)) if k]
        for cert in _matching(session, ObjectClass.CERTIFICATE, None, None):
            value = _read(cert, Attribute.VALUE)
            try:
                key = load_der_x509_certificate(bytes(value)).public_key() if value else None
            except (ValueError, UnsupportedAlgorithm):
                continue
            if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
                keys.append(key)
        return keys

    return ts.run("list public keys", call)


def load_ec_point(curve: str, point: bytes) -> ec.EllipticCurvePublicKey:
    """An uncompressed X9.62 point on ``curve``, checked to lie on it; FormatError otherwise."""
    size = (_CURVES[curve].key_size + 7) // 8
    if len(point) != 2 * size + 1 or point[0] != 4:
        raise errors.FormatError(f"not an uncompressed {curve} point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[curve], bytes(point))
    except (ValueError, UnsupportedAlgorithm):
        raise errors.FormatError(f"not a valid {curve} point") from None


def public_key(ts: TokenSession, ref: KeyPairRef) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The public half, as a ``cryptography`` key (public object, else certificate)."""
    return ts.run("read public key", lambda session: _public_from_objects(session, ref))


def _private(session: Any, ts: TokenSession, ref: KeyPairRef) -> tuple[Any, bool]:
    """The private key handle (cached per session) and whether it needs a context-specific login."""
    cached = ts.cache.get(("keypair", ref.key_id, ref.label))
    if cached is not None:
        return cached  # type: ignore[return-value]
    found = _matching(session, ObjectClass.PRIVATE_KEY, ref.key_id, ref.label or None)
    if not found:
        raise errors.KeyNotFoundError(f"key pair {ref.label!r} is not on token {ts.label!r}")
    if len(found) > 1:
        raise errors.PolicyError(f"{len(found)} private keys match key pair {ref.label!r} on token {ts.label!r}")
    entry = (found[0], bool(_read(found[0], Attribute.ALWAYS_AUTHENTICATE, False)))
    ts.cache[("keypair", ref.key_id, ref.label)] = entry
    return entry


def _with_private(ts: TokenSession, ref: KeyPairRef, operation: str,
                  use: Callable[[Any, Any, str | None], T]) -> T:
    """Run ``use(session, key, context_pin)``: the PIN is asked (outside the module lock, a
    prompt may take a while) only for CKA_ALWAYS_AUTHENTICATE keys."""
    needs_pin = ts.run(operation, lambda session: _private(session, ts, ref)[1])
    pin: Pin | None = ts.context_pin() if needs_pin else None
    secret = None if not needs_pin else ("" if pin is None else pin.reveal())  # "" = PIN pad

    def call(session: Any) -> T:
        key, _ = _private(session, ts, ref)
        try:
            try:
                return use(session, key, secret)
            except (p11x.KeyHandleInvalid, p11x.ObjectHandleInvalid):
                ts.cache.pop(("keypair", ref.key_id, ref.label), None)
                key, _ = _private(session, ts, ref)
                return use(session, key, secret)
        except AttributeError as exc:  # e.g. a PIV signing-only slot key asked to decrypt
            role = missing_role(exc, key)
            if role is None:
                raise
            raise errors.PolicyError(f"{operation} on token {ts.label!r}: key pair {ref.label!r} has no {role} "
                                     "role") from None

    try:
        return ts.run(operation, call)
    finally:
        if pin is not None:
            pin.wipe()


def rsa_oaep_decrypt(ts: TokenSession, ref: KeyPairRef, ciphertext: bytes, *, hash: str,  # noqa: A002
                     mgf_hash: str | None = None) -> bytearray:
    """RSAES-OAEP decrypt inside the token: ``hash`` one of sha1, sha224, sha256, sha384, sha512,
    MGF1 with ``mgf_hash`` (default: the same hash), empty label.

    Every rejection of the ciphertext is one :class:`~keymgr.errors.IntegrityError`
    (no padding oracle in the message: Manger, CRYPTO 2001). A hash the token does not do is
    its :class:`~keymgr.errors.MechanismUnsupportedError`.
    """
    if not ref.is_rsa:
        raise errors.ConfigurationError(f"key pair {ref.label!r} is {ref.kind}, not RSA")
    try:
        mech_hash, mgf = _OAEP[hash][0], _OAEP[mgf_hash or hash][1]
    except KeyError:
        raise errors.ConfigurationError(f"OAEP hash must be one of {', '.join(_OAEP)}") from None
    if len(ciphertext) != int(ref.kind.split("-")[1]) // 8:
        raise errors.IntegrityError(_NOT_AUTHENTIC)

    def use(session: Any, key: Any, pin: str | None) -> bytearray:
        try:
            return bytearray(key.decrypt(bytes(ciphertext), mechanism=Mechanism.RSA_PKCS_OAEP,
                                         mechanism_param=(mech_hash, mgf, None), pin=pin))
        except _BAD_CIPHERTEXT:
            raise errors.IntegrityError(_NOT_AUTHENTIC) from None
        except p11x.GeneralError:
            if ts.answers():  # SoftHSM 2.6.1 and tpm2-pkcs11 reject a bad OAEP block so
                raise errors.IntegrityError(_NOT_AUTHENTIC) from None
            raise  # the token went away: TokenSession.run reports the removal

    return _with_private(ts, ref, "RSA-OAEP decrypt", use)


def ecdh_derive(ts: TokenSession, ref: KeyPairRef, peer_point: bytes) -> bytearray:
    """The raw ECDH shared secret Z with ``peer_point`` (X9.62 uncompressed), computed in the token.

    The point is checked to lie on the key's curve first (FormatError if not).
    Z is read out of a short-lived session object that is destroyed at once.
    """
    curve = ref.curve
    if curve is None:
        raise errors.ConfigurationError(f"key pair {ref.label!r} is {ref.kind}, not EC")
    load_ec_point(curve, peer_point)
    bits = (_CURVES[curve].key_size + 7) // 8 * 8

    def use(session: Any, key: Any, pin: str | None) -> bytearray:
        if pin is not None:
            session.reaffirm_credentials(pin)
        secret = key.derive_key(KeyType.GENERIC_SECRET, bits, mechanism=Mechanism.ECDH1_DERIVE,
                                mechanism_param=(pkcs11.KDF.NULL, None, bytes(peer_point)), store=False,
                                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
                                          Attribute.TOKEN: False})
        try:
            return bytearray(secret[Attribute.VALUE])
        finally:
            secret.destroy()

    return _with_private(ts, ref, "ECDH derive", use)


def sign(ts: TokenSession, ref: KeyPairRef, data: bytes) -> bytes:
    """ECDSA (SHA-256 on P-256, SHA-384 on P-384; DER ``Ecdsa-Sig-Value``) or RSASSA-PSS-SHA256
    (MGF1-SHA256, salt 32). Hashing falls back to the host where the token signs only digests."""
    message = bytes(data)

    def use(session: Any, key: Any, pin: str | None) -> bytes:
        if ref.is_rsa:
            params = (Mechanism.SHA256, MGF.SHA256, 32)
            try:
                return bytes(key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS, mechanism_param=params,
                                      pin=pin))
            except p11x.MechanismInvalid:
                digest = hashlib.sha256(message).digest()
                return bytes(key.sign(digest, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=params, pin=pin))
        mechanism, hasher = _ECDSA[str(ref.curve)]
        try:
            raw = bytes(key.sign(message, mechanism=mechanism, pin=pin))
        except p11x.MechanismInvalid:
            raw = bytes(key.sign(hasher(message).digest(), mechanism=Mechanism.ECDSA, pin=pin))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    return _with_private(ts, ref, "sign", use)
