"""What a request shows the custodians who approve it, so that they know what they sign.

An approval is a signature over a request (:mod:`keymgr.custody.approvals`).
"destroy key 'orders' version 1" is not enough to sign in good conscience: which
key object is that, and is my token the one the register expects? So a request
carries, under ``shows`` and inside its digest, what its writer saw in the
keyring:

* ``quorum``: the policy that must approve it (threshold, and each custodian's
  name, key fingerprint, token label and serial), so ``keymgr approve`` can
  refuse a custodian who is not part of it, or a token that does not hold
  that custodian's registered key, *before* the PIN is typed and anything is
  signed (approvers often work on their own machine, without the register);
* ``keys``: each version concerned by number, CKA_ID and key check value
  (KCV), so the approver sees exactly which key objects a destroy removes for
  good, or a backup exports;
* ``new_quorum`` (policy changes only): the quorum being set, with each
  custodian's key fingerprint as registered when the request was written. A
  policy names custodians, and a name is only a label: without their keys, a
  custodian removed and re-added with an attacker's token after the approvals
  would inherit the approved place.

Both are facts, not claims: when the request is used, :func:`check_shows`
compares them with the keyring, and a quorum or key that changed since (a
custodian replaced, a version added by a rotation) makes the request void:
the approvers did not see that. A request without ``shows`` (written before
keymgr had it) is still accepted, as before, except a policy change: one that
does not show the new custodians' keys is void (:func:`check_new_quorum`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from keymgr import errors
from keymgr.custody.custodians import QuorumPolicy, Register
from keymgr.keyring.facts import KeyRecord
from keymgr.keyring.store import validate_name

__all__ = ["facts", "parse_shows", "check_shows", "check_new_quorum", "printable", "shows_lines"]

_CUSTODIAN_FIELDS = {"name", "fingerprint", "token", "serial"}
_KEY_FIELDS = {"version", "id", "kcv", "state"}
_MAX_KEYS = 1000


def _quorum(policy: QuorumPolicy | Mapping[str, Any] | None, register: Register, *,
            new: bool = False) -> dict[str, Any] | None:
    """The quorum as shown: threshold, and each custodian with their registered key and token.
    ``policy`` may be a policy's JSON form (a policy request's ``params['policy']``). ``new``: the
    quorum a policy request sets, whose custodians must all be registered already."""
    if policy is None:
        return None
    if isinstance(policy, Mapping):
        policy = QuorumPolicy(int(policy["threshold"]), tuple(policy["custodians"]))
    members = []
    for name in policy.custodians:
        try:
            c = register.custodian(name)
        except errors.KeyNotFoundError:
            if new:
                raise errors.ConfigurationError(f"no custodian named {name!r} is registered (keymgr custodian add "
                                                f"{name} --token ...): a quorum is of registered custodians") from None
            members.append({"name": name, "fingerprint": "", "token": "", "serial": ""})  # matches no request
            continue
        members.append({"name": c.name, "fingerprint": c.fingerprint, "token": c.token_label,
                        "serial": c.token_serial})
    return {"threshold": policy.threshold, "custodians": members}


def _keys(record: KeyRecord | None, versions: Sequence[int] | None) -> list[dict[str, Any]]:
    if record is None:
        return []
    chosen = record.versions if versions is None else tuple(record.version(n) for n in sorted(set(versions)))
    return [{"version": v.version, "id": v.key_id.hex(), "kcv": v.kcv.lower() if v.kcv else None, "state": v.state}
            for v in chosen]


def facts(register: Register, policy: QuorumPolicy | None, record: KeyRecord | None,
          params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``shows`` of a new request: the approving quorum, and the versions it concerns
    (``params['versions']``; None: every version of the key, as a backup of all takes them), and
    for a policy change the new quorum with its custodians' keys."""
    shown = {"quorum": _quorum(policy, register), "keys": _keys(record, params.get("versions"))}
    if "policy" in params:
        shown["new_quorum"] = _quorum(params["policy"], register, new=True)
    return shown


def _text(value: Any, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or len(value) > 1024:
        raise errors.FormatError(f"{what} must be a string")
    return value


def _hex(value: Any, what: str, size: int | None = None) -> str:
    text = _text(value, what)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise errors.FormatError(f"{what} must be hex") from None
    if raw.hex() != text or (size is not None and len(raw) != size) or len(raw) > 64:
        raise errors.FormatError(f"{what} has the wrong length or case")
    return text


def _parse_quorum(data: Any, what: str) -> dict[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) != {"threshold", "custodians"} or not isinstance(
            data["custodians"], list) or not 0 < len(data["custodians"]) <= 255:
        raise errors.FormatError(f"{what}: malformed quorum")
    threshold = data["threshold"]
    if type(threshold) is not int or not 1 <= threshold <= len(data["custodians"]):
        raise errors.FormatError(f"{what}: malformed quorum threshold")
    members = []
    for c in data["custodians"]:
        if not isinstance(c, dict) or set(c) != _CUSTODIAN_FIELDS:
            raise errors.FormatError(f"{what}: malformed quorum custodian")
        try:
            name = validate_name(_text(c["name"], what))
        except errors.ConfigurationError:
            raise errors.FormatError(f"{what}: invalid custodian name") from None
        members.append({"name": name, "fingerprint": _hex(c["fingerprint"], f"{what}: fingerprint", 32),
                        "token": _text(c["token"], what, empty=True), "serial": _text(c["serial"], what, empty=True)})
    return {"threshold": threshold, "custodians": members}


def _parse_key(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != _KEY_FIELDS:
        raise errors.FormatError(f"{what}: malformed key version")
    version = data["version"]
    if type(version) is not int or not 0 < version < 2**31:
        raise errors.FormatError(f"{what}: malformed key version number")
    kcv = None if data["kcv"] is None else _hex(data["kcv"], f"{what}: kcv")
    return {"version": version, "id": _hex(data["id"], f"{what}: id"), "kcv": kcv,
            "state": _text(data["state"], f"{what}: state")}


def parse_shows(data: Any, what: str) -> dict[str, Any]:
    """Check a request's ``shows`` field and return it as plain JSON data."""
    if not isinstance(data, dict) or set(data) - {"new_quorum"} != {"quorum", "keys"} \
            or not isinstance(data["keys"], list) or len(data["keys"]) > _MAX_KEYS:
        raise errors.FormatError(f"{what}: malformed 'shows'")
    shown = {"quorum": _parse_quorum(data["quorum"], what), "keys": [_parse_key(k, what) for k in data["keys"]]}
    if "new_quorum" in data:
        shown["new_quorum"] = _parse_quorum(data["new_quorum"], what)
    return shown


def check_shows(shows: Mapping[str, Any], register: Register, policy: QuorumPolicy | None,
                record: KeyRecord | None, params: Mapping[str, Any]) -> None:
    """Refuse a request whose quorum or key versions are no longer those of the keyring."""
    if shows["quorum"] != _quorum(policy, register):
        raise errors.PolicyError("the quorum or its custodians changed since the request was written (the "
                                 "approvers saw another one); write a new request and have it approved")
    if record is None:
        return
    try:
        now = _keys(record, params.get("versions"))
    except errors.KeyNotFoundError:
        now = []
    seen = [(k["version"], k["id"], k["kcv"]) for k in shows["keys"]]
    if seen != [(k["version"], k["id"], k["kcv"]) for k in now]:
        raise errors.PolicyError(f"key {record.name!r} changed since the request was written (its versions, "
                                 "CKA_IDs or check values are not those the approvers saw); write a new request")


def check_new_quorum(shows: Mapping[str, Any] | None, register: Register, params: Mapping[str, Any]) -> None:
    """Refuse a policy change whose new custodians' keys are not those its approvers saw (one
    removed and re-added on another token since), or were never shown to them."""
    new = params.get("policy")
    if new is None:
        return
    shown = None if shows is None else shows.get("new_quorum")
    if shown is None:
        raise errors.PolicyError("this policy request does not show the new custodians' keys (written by an older "
                                 "keymgr), so its approvals cannot bind them; write a new request and have it approved")
    try:
        now = _quorum(new, register)
    except errors.KeymgrError:
        now = None
    if shown != now:
        raise errors.PolicyError("a custodian of the new quorum changed since the request was written (another key "
                                 "or token under the same name): the approvers did not approve that one; write a "
                                 "new request and have it approved")


def printable(text: str) -> str:
    """Free text from a request (who asked, a serial) made safe to show: control characters (a
    terminal escape sequence could hide or rewrite the lines above it) are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shows_lines(shows: Mapping[str, Any] | None) -> list[str]:
    """The key versions and the approving quorum, one line each, for the approver's terminal."""
    if shows is None:
        return ["  (this request names neither key objects nor custodians' keys: written by an older keymgr)"]
    lines = [f"  version {k['version']}: CKA_ID {k['id']}, KCV {k['kcv'] or '-'} ({printable(k['state'])})"
             for k in shows["keys"]]
    quorum = shows["quorum"]
    if quorum is not None:
        lines.append(f"  to be approved by {quorum['threshold']} of {len(quorum['custodians'])} custodians:")
        lines += [f"    {c['name']}: key {c['fingerprint']} on token {c['token']!r}" for c in quorum["custodians"]]
    new = shows.get("new_quorum")
    if new is not None:
        lines.append(f"  the NEW quorum: {new['threshold']} of {len(new['custodians'])} custodians, each by their key:")
        lines += [f"    {printable(c['name'])}: key {c['fingerprint'] or '(not registered)'} on token "
                  f"{printable(c['token'])!r}" for c in new["custodians"]]
    return lines
