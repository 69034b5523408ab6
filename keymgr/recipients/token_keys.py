"""Key pairs on a token as the decrypt side of public-key recipients.

:class:`TokenPrivateKey` is one key pair: it claims the ``KeyTransRecipientInfo`` and
``KeyAgreeRecipientInfo`` entries that name it (by subject key identifier, or by issuer and
serial number through one of its certificates: :mod:`keymgr.recipients.identities`) and
recovers their data key inside the token: RSA-OAEP decryption, or ECDH there and the X9.63
KDF and AES key unwrap on the host (:mod:`keymgr.recipients._pk_algorithms` says which
algorithms, and why). :class:`TokenKeyPairs` is every usable key pair of one token, found by
what a message names: what ``keymgr decrypt`` and :meth:`keymgr.KeyManager.decrypt` use when
no key of the keyring is a recipient.

Errors, in the order a recipient is read: another key's entry is ``None`` (not ours); an
entry of ours that asks for an algorithm keymgr refuses is
:class:`~keymgr.errors.UnsupportedAlgorithmError`, one the token cannot do
:class:`~keymgr.errors.MechanismUnsupportedError` (naming what the message uses and what the
token does); a wrapped key that does not decrypt or unwrap is the one
:class:`~keymgr.errors.IntegrityError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from asn1crypto import cms
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from keymgr import errors
from keymgr._memory import zero
from keymgr.envelope._aead import DataKey
from keymgr.envelope.recipients import recipient_kind
from keymgr.hsm import Pkcs11Uri, TokenSession, asym, open_token, probe
from keymgr.hsm.certificates import find_certificates, store_certificate
from keymgr.recipients._pk_algorithms import (
    derive_kek,
    parse_originator_key,
    read_kari_algorithm,
    read_oaep_algorithm,
)
from keymgr.recipients.identities import KeyIdentity, certificate_der, certificate_of

if TYPE_CHECKING:
    from keymgr.recipients.kek import Recipient

__all__ = ["TokenKeyPairs", "TokenPrivateKey", "attach_certificate", "open_key_pair", "self_signed_certificate"]

_NOT_AUTHENTIC = "the data key is not authentic"


def _hash_name(name: str) -> str:
    """``sha256`` as people write it: ``SHA-256``."""
    return f"SHA-{name[3:]}"


class TokenPrivateKey:
    """A key pair on a token as the decrypt side of RSA-OAEP or ECDH recipients.

    ``certificates`` (PEM or DER) add to those on the token under the key pair's CKA_ID; only
    certificates for this key's public half count (:class:`~keymgr.recipients.identities.KeyIdentity`).
    """

    def __init__(self, ts: TokenSession, ref: asym.KeyPairRef, *, certificates: Sequence[bytes] = ()) -> None:
        self._ts = ts
        self._ref = ref
        self._public = asym.public_key(ts, ref)
        given = [certificate_der(c) for c in certificates]
        self._certificates = certificate_of(self._public, [*given, *find_certificates(ts, ref.key_id)])
        self._identity = KeyIdentity.of(self._public, self._certificates)

    @property
    def ref(self) -> asym.KeyPairRef:
        return self._ref

    @property
    def identity(self) -> KeyIdentity:
        return self._identity

    @property
    def certificates(self) -> tuple[bytes, ...]:
        """The key pair's certificates (DER), given or found on the token."""
        return tuple(self._certificates)

    @property
    def description(self) -> str:
        return f"{self._ref.kind} key pair {self._ref.label!r} on token {self._ts.label!r}"

    def __repr__(self) -> str:
        return f"TokenPrivateKey({self.description})"

    def recipient(self) -> Recipient:
        """The encrypt side, with the OAEP hash this token can decrypt (SHA-256 if it can)."""
        from keymgr.recipients.pubkey import EcdhRecipient, RsaOaepRecipient

        if isinstance(self._public, rsa.RSAPublicKey):
            oaep_hash = probe(self._ts).oaep_hash()
            if oaep_hash is None:
                raise errors.MechanismUnsupportedError(f"token {self._ts.label!r} cannot decrypt RSA-OAEP")
            return RsaOaepRecipient(self._public, oaep_hash=oaep_hash, name=self._ref.label)
        return EcdhRecipient(self._public, name=self._ref.label)

    def unwrap(self, ri: cms.RecipientInfo) -> DataKey | None:
        """The data key of ``ri`` if it names this key pair, else None."""
        kind = recipient_kind(ri)
        if kind == "ktri" and self._ref.is_rsa:
            return self._unwrap_ktri(ri.chosen)
        if kind == "kari" and not self._ref.is_rsa:
            return self._unwrap_kari(ri.chosen)
        return None

    def _unwrap_ktri(self, ktri: cms.KeyTransRecipientInfo) -> DataKey | None:
        try:
            rid = ktri["rid"]
            version = ktri["version"].native
            algorithm = ktri["key_encryption_algorithm"]
            encrypted = bytes(ktri["encrypted_key"].native)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise errors.FormatError("KeyTransRecipientInfo: malformed") from None
        if not self._identity.names(rid):
            return None
        if version != ("v2" if rid.name == "subject_key_identifier" else "v0"):
            raise errors.FormatError("KeyTransRecipientInfo: version must be 0 with an issuer and serial number, "
                                     "2 with a subject key identifier (RFC 5652 section 6.2.1)")
        oaep_hash, mgf_hash = read_oaep_algorithm(algorithm, f"the KeyTransRecipientInfo for {self._ref.label!r}")
        try:
            raw = asym.rsa_oaep_decrypt(self._ts, self._ref, encrypted, hash=oaep_hash, mgf_hash=mgf_hash)
        except errors.MechanismUnsupportedError as exc:
            raise self._oaep_unsupported(oaep_hash, mgf_hash, exc) from exc
        return _data_key(raw)

    def _oaep_unsupported(self, oaep_hash: str, mgf_hash: str,
                          exc: errors.MechanismUnsupportedError) -> errors.MechanismUnsupportedError:
        """The token refused the message's OAEP hash: say which hash, and which the token does."""
        can = probe(self._ts).oaep_hashes()
        uses = _hash_name(oaep_hash) + ("" if mgf_hash == oaep_hash else f" (MGF1 with {_hash_name(mgf_hash)})")
        does = ", ".join(map(_hash_name, can)) or "no hash at all"
        hint = f"; ask the sender to encrypt with --oaep-hash {can[0]} or to use the recipient file " \
               "`keymgr token pubkey --json` writes" if can else ""
        return errors.MechanismUnsupportedError(
            f"the message is encrypted to {self._ref.label!r} with RSA-OAEP using {uses}; token {self._ts.label!r} "
            f"decrypts RSA-OAEP with {does} only{hint}", code=exc.code)

    def _unwrap_kari(self, kari: cms.KeyAgreeRecipientInfo) -> DataKey | None:
        try:
            encrypted = None
            for rek in kari["recipient_encrypted_keys"]:
                if self._identity.names(rek["rid"]):
                    encrypted = bytes(rek["encrypted_key"].native)
                    break
            if encrypted is None:
                return None
            originator = kari["originator"]
            algorithm = kari["key_encryption_algorithm"]
            ukm = kari["ukm"].native
            version = kari["version"].native
        except (ValueError, TypeError, KeyError, AttributeError):
            raise errors.FormatError("KeyAgreeRecipientInfo: malformed") from None
        if version != "v3":
            raise errors.FormatError("KeyAgreeRecipientInfo: version must be 3 (RFC 5652 section 6.2.2)")
        what = f"the KeyAgreeRecipientInfo for {self._ref.label!r}"
        if originator.name != "originator_key":
            raise errors.UnsupportedAlgorithmError(
                f"{what} names its originator by certificate (static-static ECDH); keymgr reads ephemeral-static "
                "ECDH with the originator's public key in the message (RFC 5753 section 3.1)")
        kdf_hash, key_info = read_kari_algorithm(algorithm, what)
        if len(encrypted) != 40:
            raise errors.IntegrityError(_NOT_AUTHENTIC)
        point = parse_originator_key(originator.chosen, str(self._ref.curve))
        z = asym.ecdh_derive(self._ts, self._ref, point)
        try:
            kek = derive_kek(z, kdf_hash, None if ukm is None else bytes(ukm), key_info)
        finally:
            zero(z)
        try:
            raw = bytearray(aes_key_unwrap(kek, encrypted))
        except InvalidUnwrap:
            raise errors.IntegrityError(_NOT_AUTHENTIC) from None
        return _data_key(raw)


def open_key_pair(default: TokenSession, *, label: str | None = None, key_id: bytes | None = None,
                  token: str | Pkcs11Uri | None = None, certificate: bytes | None = None) -> TokenPrivateKey:
    """The key pair named by ``label`` / ``key_id`` on ``default``, or on ``token`` (a URI whose
    ``object=`` / ``id=`` name the pair unless ``label`` / ``key_id`` do), with ``certificate``
    (PEM or DER) as one more of its certificates."""
    ts = default
    if token is not None:
        uri = Pkcs11Uri.parse(token) if isinstance(token, str) else token
        label, key_id = label or uri.object, uri.id if key_id is None else key_id
        ts = open_token(uri.token_only().with_(pin_value=uri.pin_value, pin_source=uri.pin_source))
    certificates = [] if certificate is None else [certificate]
    return TokenPrivateKey(ts, asym.find_keypair(ts, label=label, key_id=key_id), certificates=certificates)


def attach_certificate(ts: TokenSession, ref: asym.KeyPairRef, certificate: bytes) -> bytes:
    """Store ``certificate`` (PEM or DER) on the token beside the key pair (same CKA_ID), after
    checking it is for the pair's public key; returns its DER. Recipients that name the pair by
    the certificate's issuer and serial number are then found (``keymgr decrypt``)."""
    der = certificate_der(certificate)
    if not certificate_of(asym.public_key(ts, ref), [der]):
        raise errors.ConfigurationError(f"the certificate is not for key pair {ref.label!r}'s public key")
    store_certificate(ts, ref.key_id, der, label=ref.label)
    return der


def self_signed_certificate(ts: TokenSession, ref: asym.KeyPairRef, *, common_name: str | None = None) -> bytes:
    """Make a self-signed certificate for the key pair, signed by the token (ECDSA or RSA-PSS:
    :mod:`keymgr._certs`), and store it beside the pair; returns its DER. It asserts
    nothing but possession of the key: what it gives is a name other CMS tools encrypt to
    (``openssl cms -encrypt -recip cert.pem`` names the recipient by issuer and serial)."""
    from keymgr._certs import self_signed_certificate as make

    der = make(asym.public_key(ts, ref), common_name or ref.label, lambda data: asym.sign(ts, ref, data))
    store_certificate(ts, ref.key_id, der, label=ref.label)
    return der


def _data_key(raw: bytearray) -> DataKey:
    try:
        if len(raw) != 32:
            raise errors.IntegrityError(_NOT_AUTHENTIC)
        return DataKey(raw)
    finally:
        zero(raw)


class TokenKeyPairs:
    """Every key pair keymgr can use on one token, as unwrappers of the recipients that name them.

    Listed on the first KeyTrans or KeyAgree recipient (a PKCS#11 find plus the public half
    and certificates of each pair: a few ms on SoftHSM, nothing for messages to token KEKs),
    and listed again when a recipient names none of them, at most once a second, so a key
    pair made after the first look is found without a scan per foreign recipient.
    """

    def __init__(self, ts: TokenSession, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ts = ts
        self._clock = clock
        self._keys: list[TokenPrivateKey] | None = None
        self._listed_at = 0.0

    def __repr__(self) -> str:
        return f"TokenKeyPairs(token={self._ts.label!r})"

    def keys(self) -> list[TokenPrivateKey]:
        if self._keys is None:
            self._list()
        return list(self._keys or ())

    def _list(self) -> None:
        found = []
        for ref in asym.list_keypairs(self._ts):
            try:
                found.append(TokenPrivateKey(self._ts, ref))
            except (errors.KeyNotFoundError, errors.FormatError):
                continue  # no readable public half: no recipient can name it
        self._keys, self._listed_at = found, self._clock()

    def unwrap(self, ri: cms.RecipientInfo) -> DataKey | None:
        """The data key of ``ri`` (a KeyTrans / KeyAgree recipient) for a key pair of this token."""
        if recipient_kind(ri) not in ("ktri", "kari"):
            return None
        for attempt in (1, 2):
            for key in self.keys():
                dek = key.unwrap(ri)
                if dek is not None:
                    return dek
            if attempt == 2 or self._clock() - self._listed_at < 1.0:
                break
            self._list()
        return None
