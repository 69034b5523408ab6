"""Keyring facts: the write-once statements whose union is a token's keyring.

Several hosts share one token (a network HSM, an HSM cluster), and PKCS#11 has
no compare-and-swap, no unique constraint and no transaction (STACK-FACTS 16).
So nothing shared is read, modified and written back (DESIGN.md, "Many hosts
on one token"). Every change to a named key is a new, immutable *fact*, and
every reader folds the set of facts it has seen into the same
:class:`~keymgr.keyring.store.KeyRecord` with :func:`fold`, whatever order they
arrived in and whoever wrote them:

==========  ====================================================================
kind        what it says
==========  ====================================================================
key         the key exists, with its profile, policy and creation time
version     a key object (CKA_ID ``kid``) is version ``num`` of the key; with
            ``epoch`` it is also made the primary (a rotation)
pending     a key object is about to be generated for a version (written first,
            so that an object left by a crash can be recognised and swept)
primary     version ``kid`` becomes the primary at ``epoch`` (activate)
state       version ``kid`` was suspended, resumed, compromised or destroyed
retire      versions before ``kid`` stop decrypting
policy      the key's policy changes (latest by logical clock ``lc``)
uses        writer ``w`` has reserved ``total`` encryptions under ``kid`` so far
==========  ====================================================================

The merge rules, each chosen so that racing hosts agree without clocks:

* **Version numbers** are the versions' order by (claimed number, CKA_ID): two
  rotations that race both claim n+1, and both versions stay; every reader
  numbers them the same way.
* **The primary** is the claim with the highest (epoch, number) among versions
  not destroyed: of two racing rotations the same one wins on every host.
* **Absorbing states**: destroyed, then compromised, win over anything; a racing
  ``resume`` loses to a ``compromise``. Suspend and resume are ordered by a
  logical clock (one more than any the writer saw), then by fact id.
* **Uses** are a grow-only counter: per writer the highest running total, summed
  over writers. Merging a snapshot with the facts it came from changes nothing, so
  concurrent compactions never inflate the count, and it never falls below the truth.
* Wall-clock times (``at``) are shown to people and never decide anything.

A *snapshot* is just a set of facts (:mod:`keymgr.keyring.store` writes one per key
to keep the token's object count small); folding is a union, so snapshots
merge with each other and with loose facts exactly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from keymgr import errors
from keymgr.hsm.templates import Profile, profile_named

__all__ = ["Fact", "KeyPolicy", "KeyRecord", "KeyVersion", "KINDS", "STATE_EVENTS", "fold", "new_fact_id"]

KINDS = frozenset({"key", "version", "pending", "primary", "state", "retire", "policy", "uses"})
#: What a ``state`` fact may record.
STATE_EVENTS = frozenset({"suspended", "resumed", "compromised", "destroyed"})


@dataclass(frozen=True)
class KeyPolicy:
    """Per-key lifecycle policy (NIST SP 800-57 cryptoperiod; SP 800-38D use bound)."""

    rotate_after_days: int | None = None
    max_messages: int | None = None
    auto_rotate: bool = False
    #: versions are created backup-capable (EXTRACTABLE only under a trusted transport key;
    #: keymgr.custody.ceremony); fixed at creation: EXTRACTABLE cannot be turned on later
    backup: bool = False


@dataclass(frozen=True)
class KeyVersion:
    """One version of a named key: a KEK object in the token."""

    version: int
    key_id: bytes
    state: str
    created: str
    history: tuple[tuple[str, str], ...] = ()
    kcv: str | None = None
    #: encryptions reserved under this version so far, by every host (keymgr.lifecycle.usage)
    uses: int = 0
    #: unwrapped from a backup, not generated in this token: decrypts, never encrypts
    restored: bool = False
    #: the profile this version's object was made for ("" in a record read from an older backup:
    #: the key's). Two hosts creating one name with different profiles at once leave versions of
    #: both; each keeps decrypting what it wrapped, and only the key's profile encrypts.
    profile: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "id": self.key_id.hex(), "state": self.state, "created": self.created,
                "history": [list(h) for h in self.history], "kcv": self.kcv, "uses": self.uses,
                "restored": self.restored, "profile": self.profile}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyVersion:
        return cls(version=int(data["version"]), key_id=bytes.fromhex(data["id"]), state=str(data["state"]),
                   created=str(data["created"]), history=tuple((str(a), str(b)) for a, b in data.get("history", [])),
                   kcv=data.get("kcv"), uses=int(data.get("uses", 0)), restored=bool(data.get("restored", False)),
                   profile=str(data.get("profile", "")))


FORMAT = 1


@dataclass(frozen=True)
class KeyRecord:
    """A named key as every host sees it: the fold of its facts (never written back as such)."""

    name: str
    profile: str
    primary: int
    versions: tuple[KeyVersion, ...]
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    #: how many facts this view was folded from (grows with every change; for display and tests)
    generation: int = 1
    created: str = ""
    #: versions below this no longer decrypt (Vault's min_decryption_version; keymgr.lifecycle.rotation.retire)
    min_decryption_version: int = 1

    def version(self, number: int) -> KeyVersion:
        for v in self.versions:
            if v.version == number:
                return v
        raise errors.KeyNotFoundError(f"key {self.name!r} has no version {number}")

    @functools.cached_property
    def primary_version(self) -> KeyVersion:
        """The primary's version (looked up once per record: records are immutable, and every
        message asks for it several times)."""
        return self.versions[self.primary - 1]

    def profile_of(self, version: KeyVersion) -> str:
        """The profile ``version``'s key object was made for."""
        return version.profile or self.profile

    @functools.cached_property
    def primary_profile(self) -> Profile:
        """The profile of the primary version's key object (the key's, with no versions): how
        messages are wrapped and what bounds a version's use; looked up once per record, as
        every message asks."""
        return profile_named(self.profile_of(self.primary_version) if self.versions else self.profile)

    @functools.cached_property
    def use_limit(self) -> int | None:
        """Encryptions one version of this key may make: the policy's ``max_messages`` and the
        primary profile's bound (the gcm profile's 2^32), whichever is lower; None when nothing
        limits them (:mod:`keymgr.lifecycle.usage`). Once per record, as every message asks."""
        limits = [self.policy.max_messages] if self.policy.max_messages else []
        bound = self.primary_profile.use_bound
        if bound is not None:
            limits.append(bound)
        return min(limits) if limits else None

    def label_of(self, number: int) -> str:
        return f"{self.name}/v{number}"

    def to_json(self) -> dict[str, Any]:
        """The record as a backup file carries it (keymgr.custody.backup_file)."""
        return {"format": FORMAT, "name": self.name, "profile": self.profile, "primary": self.primary,
                "generation": self.generation, "created": self.created, "policy": asdict(self.policy),
                "versions": [v.to_json() for v in self.versions], "min_decryption_version": self.min_decryption_version}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyRecord:
        if data.get("format") != FORMAT:
            raise errors.FormatError("unsupported keyring record format")
        return cls(name=str(data["name"]), profile=str(data["profile"]), primary=int(data["primary"]),
                   versions=tuple(KeyVersion.from_json(v) for v in data["versions"]),
                   policy=KeyPolicy(**data.get("policy", {})), generation=int(data.get("generation", 1)),
                   created=str(data.get("created", "")),
                   min_decryption_version=int(data.get("min_decryption_version", 1)))


def new_fact_id() -> str:
    """128 random bits: two hosts never write facts with the same id."""
    return os.urandom(16).hex()


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ValueError(what)
    bytes.fromhex(value)
    return value.lower()


def _count(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(what)
    return value


_POLICY_FIELDS = {"rotate_after_days": (int, type(None)), "max_messages": (int, type(None)),
                  "auto_rotate": (bool,), "backup": (bool,)}


#: Largest cryptoperiod a policy takes (a century; a larger one overflows date arithmetic).
MAX_ROTATE_AFTER_DAYS = 36_500
#: Largest per-version use limit a policy takes.
MAX_MESSAGES_LIMIT = 2**62


def check_policy(policy: KeyPolicy) -> KeyPolicy:
    """``policy`` as a writer may store it, or a :class:`ConfigurationError` naming the field: the
    exact types a reader accepts (a reader refuses a fact of any other shape, and with it the
    whole keyring: a ``backup="no"`` once made every key of the token unusable), and sane
    ranges (0 messages is not "unlimited": None is)."""
    for name, kinds in _POLICY_FIELDS.items():
        value = getattr(policy, name)
        if type(value) not in kinds:
            allowed = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise errors.ConfigurationError(f"policy {name} must be {allowed}, not {type(value).__name__}")
    days, limit = policy.rotate_after_days, policy.max_messages
    if days is not None and not 1 <= days <= MAX_ROTATE_AFTER_DAYS:
        raise errors.ConfigurationError(f"rotate_after_days must be 1 to {MAX_ROTATE_AFTER_DAYS}, not {days}")
    if limit is not None and not 1 <= limit <= MAX_MESSAGES_LIMIT:
        raise errors.ConfigurationError(f"max_messages must be 1 to 2**62 (None: no limit), not {limit}")
    return policy


def _policy(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) - set(_POLICY_FIELDS):
        raise ValueError("policy")
    for name, value in data.items():
        if type(value) not in _POLICY_FIELDS[name]:
            raise ValueError(f"policy {name}")
    return dict(data)


@dataclass(frozen=True)
class Fact:
    """One write-once statement about key ``name``. ``body`` holds the kind's fields (checked on
    load: a fact that does not parse is no fact, and its MAC was checked before anyway)."""

    kind: str
    name: str
    fact_id: str
    at: str
    body: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {**self.body, "k": self.kind, "n": self.name, "id": self.fact_id, "at": self.at}

    @property
    def kid(self) -> str:
        return str(self.body.get("kid", ""))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fact:
        """Parse and check one fact; :class:`ValueError` if anything is off."""
        if not isinstance(data, dict):
            raise ValueError("fact")
        kind, name, fact_id, at = data.get("k"), data.get("n"), data.get("id"), data.get("at")
        if kind not in KINDS or not isinstance(name, str) or not isinstance(at, str):
            raise ValueError("fact header")
        body = {k: v for k, v in data.items() if k not in ("k", "n", "id", "at")}
        checked: dict[str, Any] = {}
        if kind == "key":
            if not isinstance(body.get("profile"), str):
                raise ValueError("profile")
            checked = {"profile": body["profile"], "policy": _policy(body.get("policy", {}))}
        elif kind == "policy":
            checked = {"policy": _policy(body.get("policy")), "lc": _count(body.get("lc"), "lc")}
        elif kind == "retire":
            checked = {"kid": _hex(body.get("kid"), "kid")}
        elif kind == "uses":
            checked = {"kid": _hex(body.get("kid"), "kid"), "w": _hex(body.get("w"), "writer"),
                       "total": _count(body.get("total"), "total")}
        else:
            checked = {"kid": _hex(body.get("kid"), "kid")}
            if kind in ("version", "pending"):
                checked["num"] = _count(body.get("num"), "num", 1)
            if kind == "version":
                kcv, epoch, restored = body.get("kcv"), body.get("epoch"), body.get("restored", False)
                if "prof" in body:
                    if not isinstance(body["prof"], str) or not 0 < len(body["prof"]) <= 16:
                        raise ValueError("prof")
                    checked["prof"] = body["prof"]
                if kcv is not None:
                    kcv = _hex(kcv, "kcv")
                if epoch is not None:
                    epoch = _count(epoch, "epoch")
                if type(restored) is not bool:
                    raise ValueError("restored")
                checked.update(kcv=kcv, epoch=epoch, restored=restored)
            elif kind == "primary":
                checked["epoch"] = _count(body.get("epoch"), "epoch")
            elif kind == "state":
                if body.get("to") not in STATE_EVENTS:
                    raise ValueError("state")
                checked.update(to=body["to"], lc=_count(body.get("lc"), "lc"))
        if "lc" in body and "lc" not in checked:
            checked["lc"] = _count(body["lc"], "lc")
        if set(body) - set(checked) - {"kcv", "epoch", "restored", "policy", "prof"}:
            raise ValueError("unknown fields")
        return cls(kind, name, _hex(fact_id, "id"), at, checked)


def fold(name: str, facts: Iterable[Fact]) -> KeyRecord | None:
    """The key ``name`` as its facts describe it, or None if no ``key`` fact is among them.
    Deterministic: the same set of facts gives the same record on every host."""
    keys: list[Fact] = []
    versions: dict[str, Fact] = {}
    claims: dict[str, int] = {}
    events: dict[str, list[Fact]] = {}
    policies: list[Fact] = []
    retired: list[str] = []
    uses: dict[str, dict[str, int]] = {}
    facts_list = list(facts)
    count = len(facts_list)
    for fact in facts_list:
        kind, kid = fact.kind, fact.kid
        if kind == "key":
            keys.append(fact)
        elif kind == "version":
            if kid not in versions or fact.fact_id < versions[kid].fact_id:
                versions[kid] = fact
            if fact.body.get("epoch") is not None:
                claims[kid] = max(claims.get(kid, -1), fact.body["epoch"])
        elif kind == "primary":
            claims[kid] = max(claims.get(kid, -1), fact.body["epoch"])
        elif kind == "state":
            events.setdefault(kid, []).append(fact)
        elif kind == "policy":
            policies.append(fact)
        elif kind == "retire":
            retired.append(kid)
        elif kind == "uses":
            per_writer = uses.setdefault(kid, {})
            writer = fact.body["w"]
            per_writer[writer] = max(per_writer.get(writer, 0), fact.body["total"])
    if not keys or not versions:
        return None
    head = min(keys, key=lambda f: f.fact_id)
    order = sorted(versions.values(), key=lambda f: (f.body["num"], f.kid))
    number = {f.kid: i + 1 for i, f in enumerate(order)}
    profile = {f.kid: f.body.get("prof") or head.body["profile"] for f in order}
    destroyed = {kid for kid, evs in events.items() if any(e.body["to"] == "destroyed" for e in evs)}
    # a version made for another profile (a create that raced this key's first one) never leads
    eligible = {kid for kid in number if profile[kid] == head.body["profile"]} or set(number)
    candidates = [(epoch, number[kid]) for kid, epoch in claims.items()
                  if kid in eligible and kid not in destroyed]
    if candidates:
        primary = max(candidates)[1]
    else:
        alive = [number[f.kid] for f in order if f.kid not in destroyed and f.kid in eligible]
        primary = max(alive) if alive else len(order)
    timeline = sorted((f for f in facts_list if f.kind in ("version", "primary", "state")),
                      key=lambda f: (f.body.get("lc", 0), f.fact_id))
    folded = []
    for f in order:
        kid, num = f.kid, number[f.kid]
        evs = sorted(events.get(kid, []), key=lambda e: (e.body["lc"], e.fact_id))
        folded.append(KeyVersion(
            version=num, key_id=bytes.fromhex(kid), state=_state(evs, num == primary, kid in claims),
            created=f.at, history=_history(kid, timeline, number), kcv=f.body.get("kcv"),
            uses=sum(uses.get(kid, {}).values()), restored=bool(f.body.get("restored")), profile=profile[kid]))
    policy = head.body["policy"]
    if policies:
        policy = max(policies, key=lambda f: (f.body["lc"], f.fact_id)).body["policy"]
    # ``backup`` makes new versions extractable (under a trusted key), so only every key fact saying
    # so turns it on: no later policy fact, and no second key fact of any id, can (a PIN holder may
    # write both); the worst a forged one can do is turn it off
    policy = {**policy, "backup": all(bool(k.body["policy"].get("backup", False)) for k in keys)}
    minimum = max((number[kid] for kid in retired if kid in number), default=1)
    return KeyRecord(name=name, profile=head.body["profile"], primary=primary, versions=tuple(folded),
                     policy=KeyPolicy(**policy), generation=count, created=head.at, min_decryption_version=minimum)


def _state(events: list[Fact], is_primary: bool, activated: bool) -> str:
    outcomes = {e.body["to"] for e in events}
    if "destroyed" in outcomes:
        return "destroyed"
    if "compromised" in outcomes:
        return "compromised"
    pauses = [e for e in events if e.body["to"] in ("suspended", "resumed")]
    if pauses and pauses[-1].body["to"] == "suspended":
        return "suspended"
    if is_primary:
        return "active"
    return "decrypt-only" if activated else "pre-active"


def _history(kid: str, timeline: list[Fact], number: Mapping[str, int]) -> tuple[tuple[str, str], ...]:
    """What people read in ``key show``: the states the version went through, replayed in the
    key's logical-clock order (``lc``), each with its writer's wall-clock time."""
    claims: dict[str, int] = {}
    events: list[Fact] = []
    destroyed: set[str] = set()
    steps: list[tuple[str, str]] = []
    born = False
    for fact in timeline:
        if fact.kind == "state" and fact.body["to"] == "destroyed":
            destroyed.add(fact.kid)
        if fact.kind in ("version", "primary") and fact.body.get("epoch") is not None and fact.kid in number:
            claims[fact.kid] = max(claims.get(fact.kid, -1), fact.body["epoch"])
        if fact.kind == "state" and fact.kid == kid:
            events.append(fact)
        if fact.kind == "version" and fact.kid == kid:
            born = True
            if fact.body.get("restored"):
                steps.append(("restored", fact.at))
        if not born:
            continue
        live = [(epoch, number[k]) for k, epoch in claims.items() if k not in destroyed]
        primary = max(live)[1] if live else None
        state = _state(events, primary == number[kid], kid in claims)
        if not steps or steps[-1][0] != state:
            steps.append((state, fact.at))
    return tuple(steps)
