"""How CMS recipients name a key pair, and how keymgr recognises its own.

A ``KeyTransRecipientInfo`` names its key by ``rid`` (RFC 5652 section 6.2.1), a
``KeyAgreeRecipientInfo`` each of its keys by ``rid`` in ``recipientEncryptedKeys``
(section 6.2.2); both are a CHOICE of

* a **subject key identifier** (``rid [0]``, ``rKeyId``): what keymgr writes for a bare public
  key. It matches the key's RFC 5280 section 4.2.1.2 method-1 identifier (SHA-1 of the
  subjectPublicKey bits) and the ``subjectKeyIdentifier`` extension of any certificate the
  key pair has, whatever method its issuer used;
* an **issuer and serial number**: what ``openssl cms -encrypt -recip cert.pem`` and Bouncy
  Castle write by default, and keymgr for a certificate recipient. It matches through a
  certificate of the key pair (on the token under the same CKA_ID, or given to keymgr).
  Issuer names are compared as RFC 5280 section 7.1 says (asn1crypto's ``Name`` equality),
  serials as integers.

A certificate counts only if its public key is the key pair's: a stray certificate under
the same CKA_ID cannot make keymgr claim recipients that are not its key's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from asn1crypto import cms, x509
from cryptography import x509 as cx509

from keymgr import errors
from keymgr.recipients._pk_algorithms import PublicKey, subject_key_identifier

__all__ = ["KeyIdentity", "certificate_der", "certificate_of", "find_certificate", "issuer_and_serial"]


def certificate_der(data: bytes) -> bytes:
    """A certificate given as PEM or DER, as DER; ConfigurationError if it is neither."""
    der = find_certificate(data)
    if der is None:
        raise errors.ConfigurationError("not a PEM or DER X.509 certificate")
    return der


def find_certificate(data: bytes) -> bytes | None:
    """The DER of the certificate in ``data`` (a PEM that holds one, possibly among other blocks
    and text, or DER), or None: a public key or anything else."""
    from cryptography.hazmat.primitives.serialization import Encoding

    raw = bytes(data)
    try:
        if b"-----BEGIN CERTIFICATE-----" in raw:
            return cx509.load_pem_x509_certificate(raw[raw.index(b"-----BEGIN CERTIFICATE-----"):]) \
                .public_bytes(Encoding.DER)
        if b"-----BEGIN" not in raw:
            return cx509.load_der_x509_certificate(raw).public_bytes(Encoding.DER)
    except ValueError:
        return None
    return None


def issuer_and_serial(certificate_der: bytes) -> tuple[x509.Name, int]:
    """(issuer, serial number) of a DER certificate; FormatError if it is none."""
    try:
        tbs = x509.Certificate.load(bytes(certificate_der), strict=True)["tbs_certificate"]
        return tbs["issuer"], int(tbs["serial_number"].native)
    except (ValueError, TypeError, KeyError):
        raise errors.FormatError("not a DER X.509 certificate") from None


def certificate_of(public: PublicKey, candidates: Iterable[bytes]) -> list[bytes]:
    """Those of ``candidates`` (DER certificates) whose subject key is ``public``."""
    found = []
    for der in candidates:
        try:
            if cx509.load_der_x509_certificate(bytes(der)).public_key() == public:
                found.append(bytes(der))
        except (ValueError, TypeError):
            continue
    return found


@dataclass(frozen=True)
class KeyIdentity:
    """Every identifier a recipient may name one key pair by."""

    skis: frozenset[bytes]
    issuers_and_serials: tuple[tuple[x509.Name, int], ...] = ()

    @classmethod
    def of(cls, public: PublicKey, certificates: Iterable[bytes] = ()) -> KeyIdentity:
        """The identity of ``public`` and of those ``certificates`` that are for it."""
        skis = {subject_key_identifier(public)}
        pairs = []
        for der in certificate_of(public, certificates):
            cert = x509.Certificate.load(der)
            if cert.key_identifier:
                skis.add(bytes(cert.key_identifier))
            pairs.append(issuer_and_serial(der))
        return cls(frozenset(skis), tuple(pairs))

    def _has_issuer_serial(self, issuer: x509.Name, serial: int) -> bool:
        return any(serial == mine and issuer == mine_issuer for mine_issuer, mine in self.issuers_and_serials)

    def names(self, rid: cms.RecipientIdentifier | cms.KeyAgreementRecipientIdentifier) -> bool:
        """Whether a KeyTrans ``rid`` or a KeyAgree ``rid`` names this key pair."""
        try:
            if rid.name == "subject_key_identifier":
                return bytes(rid.chosen.native) in self.skis
            if rid.name == "r_key_id":
                return bytes(rid.chosen["subject_key_identifier"].native) in self.skis
            if rid.name == "issuer_and_serial_number":
                return self._has_issuer_serial(rid.chosen["issuer"], int(rid.chosen["serial_number"].native))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise errors.FormatError("RecipientInfo: malformed recipient identifier") from None
        return False
