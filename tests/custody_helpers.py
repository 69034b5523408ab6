"""Shared pieces of the custody tests: three custodians on their own SoftHSM tokens, two HSMs.

``custodian-1`` .. ``custodian-3`` stand for three people's USB keys; ``keymgr-A``
and ``keymgr-B`` for two HSMs. The tokens are shared with the rest of the run, so
every key pair, custodian name and key name here is unique to this run, and
quorum policies are set per key, never keyring-wide (that would put other
tests' destroys behind approvals).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pkcs11

from keymgr.custody.approvals import Approval, Request, approve, request_for
from keymgr.custody.custodian_token import CustodianToken, enroll_custodian
from keymgr.custody.custodians import Custodian, CustodyRegister, QuorumPolicy
from keymgr.hsm import asym, open_token
from keymgr.manager import KeyManager
from tests._internals import keyring_of, token_of
from tests.conftest import SO_PIN, TokenUnderTest, softhsm_token

RUN = uuid.uuid4().hex[:8]
KINDS = {1: "ec-p256", 2: "rsa-2048", 3: "ec-p384"}


@dataclass(frozen=True)
class Party:
    """One custodian of the tests: name, token, key label."""

    number: int
    name: str
    token: TokenUnderTest
    key_label: str

    def uri(self, *, pin: bool = True) -> str:
        return self.token.uri(pin=pin)

    def open(self, custodian: Custodian) -> CustodianToken:
        return CustodianToken.open(custodian, self.uri())


_parties: dict[int, Party] = {}


def party(number: int) -> Party:
    """Custodian ``number`` (1-3): a key pair on token custodian-N, made once per run."""
    if number not in _parties:
        token = softhsm_token(f"custodian-{number}")
        label = f"custody-{RUN}"
        ts = open_token(token.uri())
        asym.generate_keypair(ts, KINDS[number], label=label)
        _parties[number] = Party(number, f"c{number}-{RUN}", token, label)
    return _parties[number]


_registered: set[str] = set()


def hsm(label: str = "keymgr-A") -> KeyManager:
    return KeyManager(softhsm_token(label).uri())


def registered(km: KeyManager, *numbers: int) -> list[Custodian]:
    """Custodians ``numbers`` registered (once per run and HSM) in ``km``'s register."""
    store = CustodyRegister(keyring_of(km))
    out = []
    for n in numbers:
        p = party(n)
        key = f"{token_of(km).label}/{p.name}"
        if key not in _registered:
            ts = open_token(p.uri())
            store.add(enroll_custodian(p.name, ts, key_label=p.key_label))
            _registered.add(key)
        out.append(store.load().custodian(p.name))
    return out


def guarded_key(km: KeyManager, name: str, threshold: int = 2, numbers: tuple[int, ...] = (1, 2, 3), *,
                backup: bool = True) -> None:
    """Key ``name`` (backup-capable) with its own M-of-N policy over custodians ``numbers``."""
    custodians = registered(km, *numbers)
    km.create_key(name, backup=backup)
    CustodyRegister(keyring_of(km)).set_policy(QuorumPolicy(threshold, tuple(c.name for c in custodians)), key=name)


def approvals(km: KeyManager, request: Request, *numbers: int) -> list[Approval]:
    """Approvals of ``request`` by custodians ``numbers``, as files would carry them."""
    store = CustodyRegister(keyring_of(km)).load()
    out = []
    for n in numbers:
        p = party(n)
        token = p.open(store.custodian(p.name))
        out.append(Approval.parse(approve(request, token).to_bytes()))
    return out


def request(km: KeyManager, operation: str, key: str, **params: object) -> Request:
    """A request as ``keymgr request`` writes it (showing the quorum and key versions), read back."""
    made = request_for(keyring_of(km), operation, key=key, params=params)
    return Request.parse(made.to_bytes())


def backup_file(path: Path, key: str, approvers: tuple[int, ...] = (1, 2)) -> Path:
    """A backup of a new 2-of-3 guarded key ``key`` on keymgr-A, written to ``path``."""
    from keymgr.custody.ceremony import backup_keys
    from keymgr.hsm.pins import Pin

    a = hsm("keymgr-A")
    guarded_key(a, key)
    req = request(a, "backup", key, versions=None)
    path.write_bytes(backup_keys(keyring_of(a), key, so_pin=Pin(so_pin()), request=req,
                                 approvals=approvals(a, req, *approvers)).backup)
    return path


def object_handles(label: str) -> set[tuple[int, bytes, str]]:
    """(class, CKA_ID, label) of every object on a token, read with python-pkcs11 directly."""
    ts = open_token(softhsm_token(label).uri())
    out = set()

    def read(session: pkcs11.Session) -> None:
        for obj in list(session.get_objects()):  # the search ends before anything can raise
            try:
                key_id = bytes(obj[pkcs11.Attribute.ID])
            except pkcs11.exceptions.PKCS11Error:
                key_id = b""
            out.add((int(obj[pkcs11.Attribute.CLASS]), key_id, str(obj[pkcs11.Attribute.LABEL])))

    ts.run("list objects (test)", read)
    return out


def so_pin() -> str:
    return SO_PIN
