"""A custodian's own token: registering its key pair, and using it in a ceremony.

:func:`enroll_custodian` reads the public key (and the certificate, where the
token holds one) of a custodian's key pair and makes the token prove it holds
the private half by signing (a self-signed certificate, or a challenge).
:class:`CustodianToken` is that token opened for a ceremony: it checks that the
token holds the key registered under the custodian's name before anything is
signed or decrypted with it; :func:`check_shown_key` does so before the PIN is even
asked, wherever the token shows its public keys without login (a mistaken token
is then named before anyone types a PIN into it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os

from keymgr import errors
from keymgr._certs import (
    PublicKey,
    certificate_public_key,
    kind_of,
    self_signed_certificate,
    spki_der,
    verify_signature,
)
from keymgr._time import utc_now
from keymgr.custody.custodians import Custodian
from keymgr.hsm import asym, probe
from keymgr.hsm.certificates import find_certificates
from keymgr.hsm.pins import PinCallback
from keymgr.hsm.sessions import TokenSession, open_token
from keymgr.keyring.store import validate_name

__all__ = ["CustodianToken", "enroll_custodian", "pick_keypair", "check_shown_key", "DEFAULT_KEY_LABEL"]

DEFAULT_KEY_LABEL = "keymgr-custodian"


def pick_keypair(ts: TokenSession, key_label: str | None) -> asym.KeyPairRef:
    """The custodian key pair on a token: by label, else ``keymgr-custodian``, else the only one."""
    if key_label is not None:
        return asym.find_keypair(ts, label=key_label)
    pairs = asym.list_keypairs(ts)
    named = [p for p in pairs if p.label == DEFAULT_KEY_LABEL]
    if len(named) == 1 or len(pairs) == 1:
        return named[0] if named else pairs[0]
    raise errors.ConfigurationError(
        f"token {ts.label!r} holds {len(pairs)} usable key pairs; name one with --key-label "
        f"(labels: {', '.join(sorted(p.label for p in pairs)) or 'none'})")


def _fingerprint(key: PublicKey) -> str:
    return hashlib.sha256(spki_der(key)).hexdigest()


def _not_holding(ts: TokenSession, name: str) -> errors.PolicyError:
    return errors.PolicyError(f"token {ts.label!r} does not hold the registered key of custodian {name!r}")


def check_shown_key(ts: TokenSession, name: str, fingerprint: str) -> bool:
    """Before login: refuse (:class:`~keymgr.errors.PolicyError`) a token that shows public keys,
    none of them custodian ``name``'s (``fingerprint``: SHA-256 of the SubjectPublicKeyInfo).
    True when the key was seen; False when the token shows no public key (only a login tells)."""
    keys = asym.visible_public_keys(ts)
    if not keys:
        return False
    if not any(_fingerprint(key) == fingerprint for key in keys):
        raise _not_holding(ts, name)
    return True


def enroll_custodian(name: str, ts: TokenSession, *, key_label: str | None = None,
                     now: str | None = None) -> Custodian:
    """Read a custodian's public key (and certificate) from their token and prove possession.

    The key pair is found by ``key_label`` (default ``keymgr-custodian``, or the
    token's only key pair). A certificate on the token is kept if its key matches;
    otherwise the token signs a self-signed one. Either way the token signs, so a
    token that lacks the private half is refused.
    """
    validate_name(name)
    ref = pick_keypair(ts, key_label)
    key = asym.public_key(ts, ref)
    kind = kind_of(key)
    spki = spki_der(key)
    certificate, self_signed = b"", True
    for candidate in find_certificates(ts, ref.key_id):
        try:
            if spki_der(certificate_public_key(candidate)) == spki:
                certificate, self_signed = candidate, False
                break
        except errors.FormatError:
            continue
    if self_signed:
        certificate = self_signed_certificate(key, name, lambda data: asym.sign(ts, ref, data))
    else:
        challenge = b"keymgr custodian proof of possession v1\x00" + os.urandom(32)
        if not verify_signature(key, asym.sign(ts, ref, challenge), challenge):
            raise errors.PolicyError(f"token {ts.label!r} does not hold the private half of key {ref.label!r}")
    oaep_hash = (probe(ts).oaep_hash() or "") if ref.is_rsa else ""
    if ref.is_rsa and not oaep_hash:
        raise errors.MechanismUnsupportedError(f"token {ts.label!r} cannot decrypt RSA-OAEP: it cannot hold "
                                               "a custodian's shares")
    return Custodian(name=name, kind=kind, public_key_der=spki, certificate_der=certificate,
                     token_label=ts.label, token_serial=ts.serial, key_label=ref.label, key_id=ref.key_id,
                     added=now or utc_now(), self_signed=self_signed, oaep_hash=oaep_hash)


class CustodianToken:
    """A custodian's token, opened and checked to hold that custodian's registered key."""

    def __init__(self, custodian: Custodian, ts: TokenSession, ref: asym.KeyPairRef) -> None:
        self.custodian = custodian
        self.ts = ts
        self.ref = ref

    def __repr__(self) -> str:
        return f"CustodianToken({self.custodian.name!r}, token={self.ts.label!r})"

    @classmethod
    def open(cls, custodian: Custodian, uri: str, *, pin_callback: PinCallback | None = None) -> CustodianToken:
        """Log in to ``uri`` (PIN from the URI's pin-source or the callback) and find the key."""
        ts = open_token(uri, pin_callback=pin_callback)
        try:
            return cls.on(custodian, ts)
        except BaseException:
            ts.close()
            raise

    @classmethod
    def on(cls, custodian: Custodian, ts: TokenSession) -> CustodianToken:
        candidates = []
        if custodian.key_id:
            with contextlib.suppress(errors.KeyNotFoundError):
                candidates.append(asym.find_keypair(ts, key_id=custodian.key_id))
        candidates += asym.list_keypairs(ts)
        for ref in candidates:
            if ref.kind == custodian.kind and spki_der(asym.public_key(ts, ref)) == custodian.public_key_der:
                return cls(custodian, ts, ref)
        raise _not_holding(ts, custodian.name)

    @classmethod
    def local(cls, name: str, ts: TokenSession, *, key_label: str | None = None) -> CustodianToken:
        """A custodian's token as they approve a request, without the register at hand: the key is
        whatever their token holds; the verifier checks it against the register later."""
        ref = pick_keypair(ts, key_label)
        key = asym.public_key(ts, ref)
        spki = spki_der(key)
        return cls(Custodian(name=validate_name(name), kind=kind_of(key), public_key_der=spki, certificate_der=b"",
                             token_label=ts.label, token_serial=ts.serial, key_label=ref.label, key_id=ref.key_id),
                   ts, ref)

    @classmethod
    def by_fingerprint(cls, name: str, ts: TokenSession, fingerprint: str, *,
                       key_label: str | None = None) -> CustodianToken:
        """A custodian's token as they approve a request that names their registered key by
        ``fingerprint``: the key pair with that public key, or a refusal before anything is signed."""
        pairs = [asym.find_keypair(ts, label=key_label)] if key_label is not None else asym.list_keypairs(ts)
        for ref in pairs:
            key = asym.public_key(ts, ref)
            if _fingerprint(key) == fingerprint:
                return cls(Custodian(name=validate_name(name), kind=kind_of(key), public_key_der=spki_der(key),
                                     certificate_der=b"", token_label=ts.label, token_serial=ts.serial,
                                     key_label=ref.label, key_id=ref.key_id), ts, ref)
        raise _not_holding(ts, name)

    def sign(self, data: bytes) -> bytes:
        return asym.sign(self.ts, self.ref, data)

    def close(self) -> None:
        """Log the custodian's token out."""
        self.ts.close()
