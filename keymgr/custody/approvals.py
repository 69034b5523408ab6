"""Signed approvals: M custodians authorise one exact operation.

Operations that destroy or export keys, or change who guards them, are
described first as a *request*, a small canonical JSON document::

    {"format": "keymgr-request/1", "id": <128-bit random hex>, "operation": "destroy",
     "keyring": {"token": "keymgr-A", "serial": "..."}, "key": "orders",
     "params": {"versions": [1]}, "created": ..., "expires": ..., "requested_by": "...",
     "shows": {"quorum": {...}, "keys": [{"version": 1, "id": ..., "kcv": ..., "state": ...}]}}

``shows`` (:mod:`keymgr.custody.request_shows`) is what the approvers are shown
and what is checked against the keyring when the request is used: the quorum
with each custodian's key fingerprint, and the key versions by CKA_ID and KCV.
A request is named everywhere by its **digest**, the SHA-256 of its canonical
form: ``keymgr request`` prints it, ``keymgr approve`` shows it before asking
and names it in its result, so it can be compared out of band.

Each custodian signs it with their token key (ECDSA or RSA-PSS, see ``_certs``)
into an *approval*::

    {"format": "keymgr-approval/1", "request": <SHA-256 of the canonical request>,
     "custodian": "alice", "fingerprint": <SHA-256 of alice's SPKI>, "signed": ..., "signature": <hex>}

The signature covers ``"keymgr approval v1" || 0x00 || canonical_json({request, custodian,
fingerprint, signed})``: the domain label keeps an approval from being mistaken
for any other signature the key makes (transcripts, certificates).

Before acting, :func:`check_quorum` requires: the request is for exactly this
operation, key, parameters and keyring (token label and serial); it is not
expired; and at least M *distinct* custodians of the applicable quorum policy
signed it, each signature valid under the key registered for that name. An
approval for another request, an altered one, or one by an unregistered key
is refused by name (an attempt to slip one in is worth a loud error); the
same approval presented twice counts once. Acting *consumes* the request
(its digest is recorded in the MACed register until it expires), so a
request and its approvals cannot be replayed.

Both are canonical JSON (``keymgr._canonical``): a file is read, checked field by field,
and re-encoded before it is hashed, so formatting does not matter and any
change of content does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from keymgr import errors
from keymgr._canonical import canonical_json
from keymgr._time import format_utc, parse_stamp
from keymgr.custody._json import load_document
from keymgr.custody.custodian_token import CustodianToken
from keymgr.custody.custodians import Custodian, CustodyRegister, QuorumPolicy, Register
from keymgr.custody.request_shows import check_new_quorum, check_shows, facts, parse_shows, printable, shows_lines
from keymgr.hsm.sessions import TokenSession
from keymgr.keyring.facts import KeyRecord
from keymgr.keyring.store import Keyring, validate_name

__all__ = ["Approval", "Request", "OPERATIONS", "approve", "check_quorum", "make_request",
           "request_for"]

REQUEST_FORMAT = "keymgr-request/1"
APPROVAL_FORMAT = "keymgr-approval/1"
APPROVAL_DOMAIN = b"keymgr approval v1\x00"
OPERATIONS = ("destroy", "backup", "set-policy")
DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=30)
#: clock skew tolerated between the machines of the people who sign
SKEW = timedelta(minutes=5)
MAX_FILE = 64 * 1024


def _load(data: bytes, what: str, format: str, fields: set[str]) -> dict[str, Any]:  # noqa: A002
    doc = load_document(data, what, format=format, limit=MAX_FILE)
    if set(doc) != fields:
        raise errors.FormatError(f"{what}: unexpected or missing fields")
    return doc


def _text(data: Mapping[str, Any], name: str, what: str, *, empty: bool = False) -> str:
    value = data.get(name)
    if not isinstance(value, str) or (not value and not empty) or len(value) > 1024:
        raise errors.FormatError(f"{what}: field {name!r} must be a string")
    return value


def _hex(data: Mapping[str, Any], name: str, what: str, size: int | None = None) -> str:
    value = _text(data, name, what)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise errors.FormatError(f"{what}: field {name!r} must be hex") from None
    if (size is not None and len(raw) != size) or raw.hex() != value:
        raise errors.FormatError(f"{what}: field {name!r} has the wrong length or case")
    return value


def _params(operation: str, params: Any, what: str) -> dict[str, Any]:
    """Check an operation's parameters (and return them as plain JSON data)."""
    if not isinstance(params, dict):
        raise errors.FormatError(f"{what}: params must be an object")
    if operation in ("destroy", "backup"):
        versions = params.get("versions")
        ok = versions is None or (isinstance(versions, list) and 0 < len(versions) <= 1000 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31 for v in versions))
        if not ok or set(params) - {"versions"} or (operation == "destroy" and versions is None):
            raise errors.FormatError(f"{what}: {operation} takes a list of version numbers")
        return {"versions": None if versions is None else sorted(set(versions))}
    if set(params) != {"scope", "policy"} or not isinstance(params["scope"], str):
        raise errors.FormatError(f"{what}: set-policy takes a scope and a policy")
    policy = params["policy"]
    if policy is not None:
        policy = QuorumPolicy.from_json(policy).to_json() if isinstance(policy, dict) else None
        if policy is None:
            raise errors.FormatError(f"{what}: malformed policy")
    return {"scope": params["scope"], "policy": policy}


@dataclass(frozen=True)
class Request:
    """One operation, described exactly, waiting for approvals."""

    id: str
    operation: str
    token_label: str
    token_serial: str
    key: str | None
    params: Mapping[str, Any]
    created: str
    expires: str
    requested_by: str = ""
    #: what the approvers are shown (request_shows); None in requests of an older keymgr
    shows: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"format": REQUEST_FORMAT, "id": self.id, "operation": self.operation,
               "keyring": {"token": self.token_label, "serial": self.token_serial}, "key": self.key,
               "params": dict(self.params), "created": self.created, "expires": self.expires,
               "requested_by": self.requested_by}
        if self.shows is not None:
            doc["shows"] = dict(self.shows)
        return doc

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def to_bytes(self) -> bytes:
        """The request file: canonical JSON and a newline."""
        return self.canonical() + b"\n"

    def describe(self) -> str:
        """One line: the operation, its target and expiry (the request is named by its :attr:`digest`)."""
        versions = self.params.get("versions")
        what = f" versions {', '.join(map(str, versions))}" if versions else ""
        target = f"key {self.key!r}{what}" if self.key else f"scope {self.params.get('scope')!r}"
        return f"{self.operation} {target} on token {self.token_label!r} (expires {self.expires})"

    def explain(self) -> list[str]:
        """The request in full, one fact a line, as an approver must see it before signing."""
        lines = [f"  request digest: {self.digest}", f"  operation: {self._operation_line()}"]
        lines += shows_lines(self.shows)
        lines.append(f"  on the HSM: token {self.token_label!r}, serial {printable(self.token_serial) or '-'}")
        lines.append(f"  requested by: {printable(self.requested_by) or '(not said)'}, at {self.created}; "
                     f"valid until {self.expires}")
        return lines

    def _operation_line(self) -> str:
        versions = self.params.get("versions")
        numbers = ", ".join(map(str, versions)) if versions else "every version"
        if self.operation == "destroy":
            return (f"DESTROY key {self.key!r} version(s) {numbers}: irreversible; data that only these "
                    "versions decrypt can never be read again")
        if self.operation == "backup":
            quorum = self.shows["quorum"] if self.shows is not None else None
            who = f"{quorum['threshold']} of the custodians below" if quorum else "a quorum of the custodians"
            return (f"back up key {self.key!r} ({numbers}): the versions leave the HSM wrapped, and {who} "
                    "can restore them on another HSM")
        scope = self.params.get("scope")
        where = "every key of the keyring" if scope == "*" else f"key {scope!r}"
        policy = self.params.get("policy")
        if policy is None:
            return f"REMOVE the quorum policy of {where} (no more dual control there)"
        return (f"set the quorum policy of {where} to {policy['threshold']} of {len(policy['custodians'])} "
                f"custodians: {printable(', '.join(policy['custodians']))}")

    @classmethod
    def parse(cls, data: bytes) -> Request:
        """Read a request file; :class:`~keymgr.errors.FormatError` for anything else."""
        what = "approval request"
        fields = {"format", "id", "operation", "keyring", "key", "params", "created", "expires", "requested_by"}
        doc = load_document(data, what, format=REQUEST_FORMAT, limit=MAX_FILE)
        if set(doc) not in (fields, fields | {"shows"}):
            raise errors.FormatError(f"{what}: unexpected or missing fields")
        operation = _text(doc, "operation", what)
        if operation not in OPERATIONS:
            raise errors.FormatError(f"{what}: unknown operation")
        keyring = doc["keyring"]
        if not isinstance(keyring, dict) or set(keyring) != {"token", "serial"}:
            raise errors.FormatError(f"{what}: keyring must name a token and its serial")
        key = doc["key"]
        if operation != "set-policy" or key is not None:
            try:
                key = validate_name(key) if isinstance(key, str) else None
            except errors.ConfigurationError:
                key = None
            if key is None:
                raise errors.FormatError(f"{what}: invalid key name")
        created, expires = _text(doc, "created", what), _text(doc, "expires", what)
        if parse_stamp(expires, what) <= parse_stamp(created, what):
            raise errors.FormatError(f"{what}: expires before it was created")
        return cls(id=_hex(doc, "id", what, 16), operation=operation, token_label=_text(keyring, "token", what),
                   token_serial=_text(keyring, "serial", what, empty=True), key=key,
                   params=_params(operation, doc["params"], what), created=created, expires=expires,
                   requested_by=_text(doc, "requested_by", what, empty=True),
                   shows=parse_shows(doc["shows"], what) if "shows" in doc else None)


def _scope(operation: str, key: str | None, params: Mapping[str, Any]) -> str | None:
    """The key whose quorum policy governs the operation (None: the keyring-wide one)."""
    if operation != "set-policy":
        return key
    return None if params.get("scope") == "*" else params.get("scope")


def request_for(keyring: Keyring, operation: str, *, key: str | None, params: Mapping[str, Any],
                ttl: timedelta = DEFAULT_TTL, requested_by: str = "", now: datetime | None = None) -> Request:
    """A new request on ``keyring`` that shows its approvers the quorum that must approve it and
    the key versions it concerns (:mod:`keymgr.custody.request_shows`)."""
    register = CustodyRegister(keyring).load()
    record = keyring.get(key) if key is not None else None
    shows = facts(register, register.policy_for(_scope(operation, key, params)), record, params)
    return make_request(operation, token=keyring.token, key=key, params=params, ttl=ttl,
                        requested_by=requested_by, now=now, shows=shows)


def make_request(operation: str, *, token: TokenSession, key: str | None, params: Mapping[str, Any],
                 ttl: timedelta = DEFAULT_TTL, requested_by: str = "", now: datetime | None = None,
                 shows: Mapping[str, Any] | None = None) -> Request:
    """A new request for ``operation`` on ``token``'s keyring, valid for ``ttl``."""
    if operation not in OPERATIONS:
        raise errors.ConfigurationError(f"unknown operation {operation!r} (one of {', '.join(OPERATIONS)})")
    if not timedelta(minutes=1) <= ttl <= MAX_TTL:
        raise errors.ConfigurationError("a request is valid for between one minute and 30 days")
    start = (now or datetime.now(UTC)).replace(microsecond=0)
    request = Request(id=os.urandom(16).hex(), operation=operation, token_label=token.label,
                      token_serial=token.serial, key=key, params=dict(params), created=format_utc(start),
                      expires=format_utc(start + ttl), requested_by=requested_by, shows=shows)
    try:
        return Request.parse(request.to_bytes())  # the same checks as a file read back
    except errors.FormatError as exc:
        raise errors.ConfigurationError(str(exc)) from None


@dataclass(frozen=True)
class Approval:
    """One custodian's signature over one request."""

    request_digest: str
    custodian: str
    fingerprint: str
    signed: str
    signature: bytes = field(repr=False)

    def signed_bytes(self) -> bytes:
        return APPROVAL_DOMAIN + canonical_json({"request": self.request_digest, "custodian": self.custodian,
                                                  "fingerprint": self.fingerprint, "signed": self.signed})

    def to_bytes(self) -> bytes:
        return canonical_json({"format": APPROVAL_FORMAT, "request": self.request_digest,
                               "custodian": self.custodian, "fingerprint": self.fingerprint, "signed": self.signed,
                               "signature": self.signature.hex()}) + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> Approval:
        what = "approval"
        doc = _load(data, what, APPROVAL_FORMAT, {"format", "request", "custodian", "fingerprint", "signed",
                                                  "signature"})
        signed = _text(doc, "signed", what)
        parse_stamp(signed, what)
        signature = bytes.fromhex(_hex(doc, "signature", what))
        if not 8 <= len(signature) <= 1024:
            raise errors.FormatError(f"{what}: impossible signature length")
        try:
            custodian = validate_name(_text(doc, "custodian", what))
        except errors.ConfigurationError:
            raise errors.FormatError(f"{what}: invalid custodian name") from None
        return cls(request_digest=_hex(doc, "request", what, 32), custodian=custodian,
                   fingerprint=_hex(doc, "fingerprint", what, 32), signed=signed, signature=signature)


def approve(request: Request, custodian: CustodianToken, *, now: datetime | None = None) -> Approval:
    """Sign ``request`` with the custodian's token key (the custodian's PIN was given when it was opened)."""
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    if moment >= parse_stamp(request.expires, "request"):
        raise errors.PolicyError(f"the request expired at {request.expires}; ask for a new one")
    unsigned = Approval(request.digest, custodian.custodian.name, custodian.custodian.fingerprint,
                        format_utc(moment), b"")
    return Approval(unsigned.request_digest, unsigned.custodian, unsigned.fingerprint, unsigned.signed,
                    custodian.sign(unsigned.signed_bytes()))


def _check_one(approval: Approval, request: Request, register: Register, allowed: Sequence[str]) -> Custodian:
    who = f"the approval by {approval.custodian!r}"
    if approval.request_digest != request.digest:
        raise errors.PolicyError(f"{who} is for another request (or the request was altered)")
    try:
        custodian = register.custodian(approval.custodian)
    except errors.KeyNotFoundError:
        raise errors.PolicyError(f"{who}: no such custodian is registered") from None
    if approval.custodian not in allowed:
        raise errors.PolicyError(f"{who}: that custodian is not part of this quorum ({', '.join(allowed)})")
    if approval.fingerprint != custodian.fingerprint or not custodian.verify(approval.signature,
                                                                               approval.signed_bytes()):
        raise errors.PolicyError(f"{who}: the signature does not verify with the registered key "
                                 "(altered, or signed by another key)")
    signed = parse_stamp(approval.signed, "approval")
    if not parse_stamp(request.created, "request") - SKEW <= signed <= parse_stamp(request.expires, "request"):
        raise errors.PolicyError(f"{who} was signed outside the request's validity")
    return custodian


def check_quorum(request: Request, approvals: Sequence[Approval], register: Register, *, operation: str,
                 token: TokenSession, key: str | None, params: Mapping[str, Any],
                 now: datetime | None = None, record: KeyRecord | None = None) -> tuple[str, ...]:
    """The distinct custodians whose valid approvals authorise exactly this operation.

    Returns ``()`` when no quorum policy applies (no dual control configured).
    Raises :class:`~keymgr.errors.PolicyError` naming what is wrong otherwise. ``record``: the
    key as it is now, checked against the versions the request showed its approvers.
    """
    policy = register.policy_for(_scope(operation, key, params))
    if policy is None:
        return ()
    expected = Request(request.id, operation, token.label, token.serial, key,
                       _params(operation, dict(params), "request"), request.created, request.expires,
                       request.requested_by, request.shows)
    if expected.canonical() != request.canonical():
        raise errors.PolicyError(f"the approved request is for {request.describe()}, not for this {operation}")
    if request.shows is not None:
        check_shows(request.shows, register, policy, record, params)
    if operation == "set-policy":
        check_new_quorum(request.shows, register, params)
    if any(digest == request.digest for digest, _ in register.consumed):
        raise errors.PolicyError("this request was already carried out once; approvals cannot be replayed")
    moment = now or datetime.now(UTC)
    if moment > parse_stamp(request.expires, "request"):
        raise errors.PolicyError(f"the approved request expired at {request.expires}")
    if moment < parse_stamp(request.created, "request") - SKEW:
        raise errors.PolicyError("the approved request was created in the future; check the clocks")
    names = []
    for approval in approvals:
        custodian = _check_one(approval, request, register, policy.custodians)
        if custodian.name not in names:
            names.append(custodian.name)
    if len(names) < policy.threshold:
        have = f"{len(names)} ({', '.join(names)})" if names else "none"
        raise errors.PolicyError(f"{operation} needs approvals by {policy.threshold} of {policy.n} custodians "
                                 f"({', '.join(policy.custodians)}); valid distinct approvals: {have}")
    return tuple(names)
