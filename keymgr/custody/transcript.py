"""Ceremony transcripts: what was done, by whom, signed by the tokens that took part.

Every ceremony (create, rotate, backup, restore, destroy, policy change) ends
with a transcript: a canonical JSON document (format ``keymgr-transcript/1``:
ceremony, time started and finished, keyring token, participants, steps,
key ids and key check values, outcome) carried as the ``id-data`` content of a
CMS ``SignedData`` (RFC 5652 section 5) with one ``SignerInfo`` per signing
token: the keyring's own HSM (its key pair ``keymgr/ceremony-signer``,
generated on first use, with a certificate it signs itself each time) and
every custodian whose token was present. Signed attributes: content-type,
signing-time, message-digest (RFC 5652 section 11); digest SHA-256 (SHA-384
for P-384 keys, to match ECDSA's hash, which OpenSSL takes from the
SignerInfo's digest algorithm); signatures as in ``_certs`` (ECDSA, RSA-PSS:
RFC 4056).

Each signer's certificate travels in the SignedData, so the file verifies
with nothing else::

    openssl cms -verify -inform DER -in T.p7s -noverify -out transcript.json

(``-noverify`` skips the chain: the certificates are self-signed or from the
custodian's own PKI; what binds a key to a custodian is the MACed register,
which ``keymgr transcript verify --token`` consults.)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from asn1crypto import algos, cms, x509

from keymgr import errors
from keymgr._canonical import canonical_json
from keymgr._certs import (
    certificate_public_key,
    kind_of,
    self_signed_certificate,
    signature_algorithm,
    spki_der,
    verify_signature,
)
from keymgr._time import utc_now
from keymgr.custody._json import load_document
from keymgr.hsm import asym
from keymgr.hsm.sessions import TokenSession

__all__ = ["Signer", "TranscriptRecorder", "VerifiedTranscript", "hsm_signer", "sign_transcript",
           "verify_transcript", "custodian_signer"]

FORMAT = "keymgr-transcript/1"
HSM_SIGNER_LABEL = "keymgr/ceremony-signer"
MAX_TRANSCRIPT = 4 * 1024 * 1024
MAX_SIGNERS = 64
_DIGESTS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384}


@dataclass
class TranscriptRecorder:
    """Collects a ceremony's facts as it runs; :meth:`finish` turns them into a document."""

    ceremony: str
    token_label: str
    token_serial: str
    started: str = field(default_factory=utc_now)
    participants: list[dict[str, str]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def participant(self, role: str, name: str, fingerprint: str = "") -> None:
        entry = {"role": role, "name": name, "fingerprint": fingerprint}
        if entry not in self.participants:
            self.participants.append(entry)

    def step(self, what: str, **detail: Any) -> None:
        self.steps.append({"at": utc_now(), "step": what, **detail})

    def key(self, name: str, version: int, key_id: bytes, kcv: str | None, **detail: Any) -> None:
        self.keys.append({"name": name, "version": version, "id": key_id.hex(), "kcv": kcv, **detail})

    def finish(self, outcome: str) -> dict[str, Any]:
        return {"format": FORMAT, "ceremony": self.ceremony, "started": self.started, "finished": utc_now(),
                "keyring": {"token": self.token_label, "serial": self.token_serial},
                "participants": self.participants, "steps": self.steps, "keys": self.keys,
                "details": self.details, "outcome": outcome}


#: A signing participant: its certificate (DER) and a function that signs with its token key.
@dataclass(frozen=True)
class Signer:
    name: str
    certificate: bytes = field(repr=False)
    sign: Callable[[bytes], bytes] = field(repr=False)


def hsm_signer(ts: TokenSession) -> Signer | None:
    """The keyring token's own ceremony key (EC P-256, made on first use); None if it cannot have one."""
    try:
        try:
            ref = asym.find_keypair(ts, label=HSM_SIGNER_LABEL)
        except errors.KeyNotFoundError:
            ref = asym.generate_keypair(ts, "ec-p256", label=HSM_SIGNER_LABEL)
        key = asym.public_key(ts, ref)
    except (errors.MechanismUnsupportedError, errors.PolicyError):
        return None
    name = f"keymgr HSM {ts.label} {ts.serial}".strip()

    def sign(data: bytes) -> bytes:
        return asym.sign(ts, ref, data)

    return Signer(name, self_signed_certificate(key, name, sign), sign)


def custodian_signer(name: str, certificate: bytes, sign: Callable[[bytes], bytes]) -> Signer:
    return Signer(name, certificate, sign)


def _digest_name(kind: str) -> str:
    return "sha384" if kind == "ec-p384" else "sha256"


def _signer_info(content: bytes, signer: Signer, when: datetime) -> tuple[cms.SignerInfo, str]:
    cert = x509.Certificate.load(signer.certificate)
    kind = kind_of(certificate_public_key(signer.certificate))
    digest = _digest_name(kind)
    attrs = cms.CMSAttributes([
        {"type": "content_type", "values": ["data"]},
        {"type": "signing_time", "values": [cms.Time({"utc_time": when})]},
        {"type": "message_digest", "values": [_DIGESTS[digest](content).digest()]},
    ])
    signature = signer.sign(attrs.dump())
    return cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": cert["tbs_certificate"]["issuer"], "serial_number": cert.serial_number}}),
        "digest_algorithm": {"algorithm": digest},
        "signed_attrs": attrs,
        "signature_algorithm": signature_algorithm(kind),
        "signature": signature,
    }), digest


def sign_transcript(document: Mapping[str, Any], signers: Sequence[Signer]) -> bytes:
    """The transcript as DER CMS SignedData, one SignerInfo per signer."""
    if not signers:
        raise errors.ConfigurationError("a transcript needs at least one signer")
    content = canonical_json(dict(document))
    when = datetime.now(UTC).replace(microsecond=0)
    infos, digests = [], []
    for signer in signers:
        info, digest = _signer_info(content, signer, when)
        infos.append(info)
        if digest not in digests:
            digests.append(digest)
    certificates = []
    for signer in signers:
        if signer.certificate not in certificates:
            certificates.append(signer.certificate)
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [{"algorithm": d} for d in digests],
        "encap_content_info": {"content_type": "data", "content": content},
        "certificates": [x509.Certificate.load(c) for c in certificates],
        "signer_infos": infos,
    })
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())


@dataclass(frozen=True)
class VerifiedTranscript:
    """A transcript whose every signature verified: its content and who signed it."""

    document: Mapping[str, Any]
    #: (certificate subject common name, SHA-256 fingerprint of the signer's SPKI)
    signers: tuple[tuple[str, str], ...]


def _attr(attrs: Any, name: str) -> Any:
    values = [a["values"] for a in attrs if a["type"].native == name]
    if len(values) != 1 or len(values[0]) != 1:
        raise errors.IntegrityError(f"transcript signature: exactly one {name} attribute expected")
    return values[0][0]


def _verify_signer(info: Any, content: bytes, certs: Mapping[tuple[bytes, int], Any]) -> tuple[str, str]:
    sid = info["sid"]
    if sid.name != "issuer_and_serial_number":
        raise errors.FormatError("transcript: signers must be named by issuer and serial number")
    cert = certs.get((sid.chosen["issuer"].dump(), sid.chosen["serial_number"].native))
    if cert is None:
        raise errors.IntegrityError("transcript: a signer's certificate is missing")
    cert_der = cert.dump()
    key = certificate_public_key(cert_der)
    kind = kind_of(key)
    digest = info["digest_algorithm"]["algorithm"].native
    if digest != _digest_name(kind) or \
            info["signature_algorithm"].dump() != algos.SignedDigestAlgorithm(signature_algorithm(kind)).dump():
        raise errors.IntegrityError("transcript: unexpected signature algorithm")
    attrs = info["signed_attrs"]
    if not len(attrs):
        raise errors.IntegrityError("transcript: signed attributes are required")
    if _attr(attrs, "content_type").native != "data":
        raise errors.IntegrityError("transcript: content-type attribute mismatch")
    if not hmac.compare_digest(_attr(attrs, "message_digest").native, _DIGESTS[digest](content).digest()):
        raise errors.IntegrityError("transcript: the content does not match its signed digest (edited?)")
    signed = b"\x31" + attrs.dump()[1:]  # RFC 5652 5.4: the DER of the SET OF, not the [0] tag
    if not verify_signature(key, info["signature"].native, signed):
        raise errors.IntegrityError("transcript: a signature does not verify")
    subject = cert.subject.native.get("common_name", "") if isinstance(cert.subject.native, dict) else ""
    return str(subject), hashlib.sha256(spki_der(key)).hexdigest()


def verify_transcript(data: bytes) -> VerifiedTranscript:
    """Check every signature of a transcript file; FormatError / IntegrityError otherwise."""
    blob = bytes(data)
    if len(blob) > MAX_TRANSCRIPT:
        raise errors.FormatError("transcript: file too large")
    try:
        info = cms.ContentInfo.load(blob, strict=True)
        if info["content_type"].native != "signed_data":
            raise errors.FormatError("transcript: not a CMS SignedData")
        signed = info["content"]
        encap = signed["encap_content_info"]
        if encap["content_type"].native != "data" or encap["content"].native is None:
            raise errors.FormatError("transcript: no embedded id-data content")
        content = encap["content"].native
        certs = {(c.chosen["tbs_certificate"]["issuer"].dump(), c.chosen.serial_number): c.chosen
                 for c in signed["certificates"] if c.name == "certificate"}
        signer_infos = list(signed["signer_infos"])
        if not 1 <= len(signer_infos) <= MAX_SIGNERS:
            raise errors.FormatError("transcript: expected 1 to 64 signers")
        signers = tuple(_verify_signer(si, content, certs) for si in signer_infos)
    except errors.KeymgrError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, UnicodeError):
        raise errors.FormatError("transcript: not a well-formed CMS SignedData") from None
    return VerifiedTranscript(load_document(content, "transcript content", format=FORMAT, limit=MAX_TRANSCRIPT),
                              signers)
