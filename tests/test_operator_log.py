"""Operator logging (keymgr.oplog): the events of a real flow reach the ``keymgr`` logger, and
no record holds a PIN, key bytes, plaintext or a MAC value.

The flow runs in a fresh process on a token of its own (tests/fleet.py's ``fresh_token``), so
that its PIN can be a distinctive string and the process starts logged out (the first login is
an event too); the records come back as JSON, formatted as an operator would see them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

from tests.conftest import TokenUnderTest
from tests.fleet import REPO, fleet_workspace, fresh_token

PIN = "pin-Q7zX4w9Kr2"
PLAINTEXT_MARK = "plaintext-Zq7VwX3kP5"

_FLOW = r"""
import json, logging, os, sys, time
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)
root = logging.getLogger("keymgr")
root.addHandler(Keep(logging.DEBUG))
root.setLevel(logging.DEBUG)

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
import keymgr
from keymgr.envelope.cache import CachePolicy
from keymgr.hsm import objects
from keymgr.keyring.store import APPLICATION, FACT_PREFIX, META_MAC_LABEL
from tests._internals import keyring_of, token_of
from tests._known_keys import imported_key

uri, audit_path, plaintext_mark = sys.argv[1:]
plaintext = (plaintext_mark + " ").encode() * 16
secrets = {"keys": [], "macs": []}
events = {}

km = keymgr.KeyManager(uri, cache=CachePolicy(max_messages=2), audit=audit_path)
other = keymgr.KeyManager(uri, audit=False)           # another host's manager, in this process
km.create_key("orders")
for _ in range(3):                                    # the third message evicts the cached data key
    km.encrypt(plaintext, key="orders", context={"tenant": "acme"})
    secrets["keys"] += [e.dek.reveal().hex() for e in km._encrypt_cache._entries.values()]

keyring_of(other).compact_at, keyring_of(other).grace = 2, 0.0   # compact and sweep at once
other.list_keys()
other.rotate("orders")
newer = other.encrypt(plaintext, key="orders")
assert km.decrypt(newer) == plaintext                 # an id km has not seen: read again (found there)
token_of(km).reread()                                     # what a miss after that re-read does: re-initialise

other.rotate("orders")
km.refresh_interval = 0.05                    # the background refresh picks up the rotation
time.sleep(0.1)
km.list_keys()
keyring_of(km)._refresher.join(10)
assert km.describe_key("orders").primary == 3, km.describe_key("orders").primary
time.sleep(0.1)                                       # nothing written since: one register read
km.list_keys()
keyring_of(km)._refresher.join(10)

token_of(km).run("close the session underneath", lambda s: s.close())   # as a token reset would
assert km.describe_key("orders").primary == 3
keyring_of(km).reload()

planted = os.urandom(32)                              # a KEK of a value known outside the token
secrets["keys"].append(planted.hex())
imported_key(other, "planted", planted)
try:
    km.encrypt(plaintext, key="planted")
    events["planted_refused"] = False
except keymgr.PolicyError:
    events["planted_refused"] = True

forged = FACT_PREFIX + "orders/" + "0" * 32           # a fact MACed by no key of the token
objects.write_data_object(token_of(km), application=APPLICATION, label=forged,
                          value=json.dumps({"fact": {"k": "state"}, "mac": "00" * 32}).encode())
try:
    keyring_of(km).reload()
    events["forged_refused"] = False
except keymgr.IntegrityError:
    events["forged_refused"] = True
objects.destroy_data_object(token_of(km), application=APPLICATION, label=forged)

mac_value = os.urandom(32)                            # a MAC key planted under the keyring's label
secrets["keys"].append(mac_value.hex())
token_of(km).run("plant a MAC key", lambda s: s.create_object({
    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET, Attribute.TOKEN: True,
    Attribute.PRIVATE: True, Attribute.LABEL: META_MAC_LABEL, Attribute.ID: b"\x00\x01",
    Attribute.VALUE: mac_value, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False, Attribute.SIGN: True, Attribute.VERIFY: True}))
third = keymgr.KeyManager(uri, audit=False)
third.create_key("third")                             # its keyring looks for its MAC key

for _, value in objects.read_data_objects(token_of(km), application=APPLICATION):
    secrets["macs"].append(json.loads(value)["mac"])

os.remove(audit_path)                                 # the log is gone: the audit fails closed
try:
    km.rotate("orders")
    events["audit_refused"] = False
except keymgr.KeymgrError:
    events["audit_refused"] = True

fmt = logging.Formatter("%(levelname)s %(name)s %(threadName)s %(message)s")
out = [{"level": r.levelname, "name": r.name, "text": fmt.format(r), "args": repr(r.args)} for r in records]
print(json.dumps({"records": out, "secrets": secrets, "events": events}))
"""


def _run_flow() -> dict[str, object]:
    with fleet_workspace() as ws:
        token = fresh_token(ws, "oplog", user_pin=PIN)
        proc = subprocess.run([sys.executable, "-c", _FLOW, token.uri, str(ws / "audit.log"), PLAINTEXT_MARK],
                              capture_output=True, text=True, timeout=180,
                              env={**os.environ, **token.env, "KEYMGR_ALLOW_PIN_VALUE": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _has(records: list[dict[str, str]], level: str, logger: str, *words: str) -> bool:
    return any(r["level"] == level and r["name"] == logger and all(w in r["text"] for w in words) for r in records)


def test_a_real_flow_logs_its_events_and_no_secret() -> None:
    result = _run_flow()
    records: list[dict[str, str]] = result["records"]  # type: ignore[assignment]
    assert result["events"] == {"planted_refused": True, "forged_refused": True, "audit_refused": True}

    expected_debug = [
        ("keymgr.hsm", "session opened"), ("keymgr.hsm", "logged in"),
        ("keymgr.cache", "data key evicted (a limit reached) after 2 messages"),
        ("keymgr.keyring", "not known here: reading the keyring again"),
        ("keymgr.hsm", "re-reading the token"), ("keymgr.hsm", "re-initialised (C_Finalize + C_Initialize)"),
        ("keymgr.hsm", "logging in again with the PIN that worked before"),
        ("keymgr.hsm", "session reopened (module re-initialised)"),
        ("keymgr.keyring", "compacted", "into one snapshot"), ("keymgr.keyring", "swept", "covered by snapshots"),
        ("keymgr.keyring", "keyring refresh: changes register moved, full scan"),
        ("keymgr.keyring", "keyring refresh: changes register unchanged, no scan"),
        ("keymgr.keyring", "keyring scan:", "keys changed: ['orders']"),
        ("keymgr.hsm", "session lost during read data objects", "reopening it and retrying once"),
        ("keymgr.hsm", "session reopened"),
    ]
    missing = [words for logger, *words in expected_debug if not _has(records, "DEBUG", logger, *words)]
    assert not missing, missing
    # the refresh ran in its own thread
    assert any("keymgr-keyring-refresh" in r["text"] and "full scan" in r["text"] for r in records)

    expected_warnings = [
        ("keymgr.keyring", "key 'planted' version 1", "may not encrypt", "CKA_LOCAL is False"),
        ("keymgr.keyring", "is not authentic", "refused"),
        ("keymgr.hsm", "keymgr/meta-mac", "(id 0001) is ignored", "planted?"),
        ("keymgr.audit", "cannot be written, operations refuse until it can (fail closed)"),
    ]
    missing = [words for logger, *words in expected_warnings if not _has(records, "WARNING", logger, *words)]
    assert not missing, missing
    # a forged object found again (each refresh) is warned about once, then at DEBUG
    assert sum(r["level"] == "WARNING" and "is not authentic" in r["text"] for r in records) == 1

    secrets: dict[str, list[str]] = result["secrets"]  # type: ignore[assignment]
    assert len(secrets["keys"]) >= 4 and len(secrets["macs"]) >= 3  # the scan below looks for something
    forbidden = [PIN, PLAINTEXT_MARK, PLAINTEXT_MARK.encode().hex()]
    for hexed in secrets["keys"] + secrets["macs"]:
        raw = bytes.fromhex(hexed)
        forbidden += [hexed, hexed.upper(), base64.b64encode(raw).decode(), repr(raw)[2:-1]]
    leaks = [(r["text"], s) for r in records for s in forbidden if s in r["text"] or s in r["args"]]
    assert not leaks, leaks[:3]


def test_the_cli_prints_records_on_stderr_only_when_keymgr_log_says_so(softhsm: TokenUnderTest) -> None:
    def run(level: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "KEYMGR_LOG"}
        if level is not None:
            env["KEYMGR_LOG"] = level
        proc = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm.uri(), "key", "list"],
                              capture_output=True, text=True, env={**env, **softhsm.env}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    debug = run("debug")
    assert f"keymgr: DEBUG keymgr.hsm: token {softhsm.label!r}: logged in" in debug.splitlines()
    assert "keymgr: DEBUG keymgr.keyring: " in debug
    assert "DEBUG" not in run(None) and "DEBUG" not in run("warning")
    assert run("loud").splitlines()[0] == ("keymgr: KEYMGR_LOG='loud' is no log level (debug, info, warning, "
                                           "error); ignored")


def test_a_cached_encrypt_and_decrypt_make_no_call_into_logging(softhsm: TokenUnderTest, key_name: str) -> None:
    """The per-message path logs nothing, so logging that is off costs it nothing (the timing is
    in docs/performance.md, "Operator logging"); counted, not timed."""
    import logging
    import threading

    import keymgr

    with keymgr.KeyManager(softhsm.uri(), cache=True) as km:
        km.create_key(key_name)
        km.refresh_interval = 3600.0  # no refresh due during the count
        blob = km.encrypt(b"warm up", key=key_name)
        km.decrypt(blob)
        calls: list[str] = []
        logging_file = logging.__file__

        def count(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "call" and frame.f_code.co_filename == logging_file:
                calls.append(frame.f_code.co_name)

        old = threading.getprofile()
        sys.setprofile(count)
        try:
            for _ in range(200):
                km.decrypt(km.encrypt(b"x" * 1024, key=key_name, context={"tenant": "acme"}),
                           context={"tenant": "acme"})
        finally:
            sys.setprofile(old)
    assert calls == []
    # and the counter sees a call into logging when there is one
    logger = logging.getLogger("keymgr.cache")
    sys.setprofile(count)
    try:
        logger.isEnabledFor(logging.DEBUG)
    finally:
        sys.setprofile(old)
    assert calls == ["isEnabledFor"]
