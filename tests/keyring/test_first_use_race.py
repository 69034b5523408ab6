"""Processes opening a fresh token at the same moment all work, whatever MAC keys that makes.

PKCS#11 cannot create an object only if it is missing, and hosts sharing a network HSM cannot
share a lock, so two processes opening a fresh token together may each make the token's
metadata MAC key or audit key (keymgr.hsm.objects.ensure_singleton_key): such keys are found by
their label, each has its own CKA_ID ``<prefix>/<8 random bytes>``, writers MAC with the lowest
and readers accept any. Before that design, keys shared one fixed CKA_ID, and four processes
starting together left three keys under it in one trial of four: every later use of that token
failed ("3 key objects share id").

So any number of such keys is acceptable, from one to one per process, as long as every process
succeeded, no two keys share a CKA_ID, every key computes an HMAC (none is a key another process
found before its value was written), and everything written stays readable by a process that
opens the token afterwards: each key, each message, each audit log with its MACs. A second round
on the same, no longer fresh, token makes no more keys.

The token here is made for the test in its own SoftHSM configuration, and only child processes
open it (SoftHSM reads its token directory once per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _softhsm_module

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 5
TRIALS = 3

_OPEN_AT_ONCE = r"""
import json, sys, time
import keymgr
uri, at, name, log = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
while time.time() < at:
    time.sleep(0.0005)
try:
    with keymgr.KeyManager(uri, audit=log) as km:
        km.create_key(name)
        blob = km.encrypt(name.encode(), key=name)
        assert km.decrypt(blob) == name.encode()
    print(json.dumps({"ok": True, "blob": blob.hex()}))
except keymgr.KeymgrError as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
"""

_CHECK = r"""
import json, sys
import keymgr
from keymgr.audit import verify_log
from keymgr.audit._token import AUDIT_KEY_ID, AUDIT_KEY_LABEL
from keymgr.hsm import objects
from keymgr.keyring.store import META_MAC_ID, META_MAC_LABEL
from tests._internals import token_of

uri, args = sys.argv[1], json.loads(sys.argv[2])
out = {}
with keymgr.KeyManager(uri, audit=False) as km:
    ts = token_of(km)
    listed = objects.list_secret_keys(ts)
    for label, prefix in ((META_MAC_LABEL, META_MAC_ID), (AUDIT_KEY_LABEL, AUDIT_KEY_ID)):
        ids = [key_id for found, key_id in listed if found == label]
        unusable = []
        for key_id in ids:
            try:
                objects.hmac_sha256(ts, key_id, b"probe")
            except keymgr.KeymgrError as exc:
                unusable.append(f"{key_id.hex()}: {type(exc).__name__}: {exc}")
        shaped = [k for k in ids if k.startswith(prefix + b"/") and len(k) == len(prefix) + 9]
        out[label] = {"ids": sorted(key_id.hex() for key_id in ids), "unusable": unusable,
                      "misnamed": [k.hex() for k in ids if k not in shaped]}
    out["keys"] = sorted(record.name for record in km.list_keys())
    out["plain"] = [km.decrypt(bytes.fromhex(blob)).decode() for blob in args["blobs"]]
    reports = [verify_log(path, token=ts) for path in args["logs"]]
    out["logs"] = [[r.ok, r.entries, r.macs_checked, str(r.broken)] for r in reports]
print(json.dumps(out))
"""


def _fresh_token(folder: Path) -> tuple[str, dict[str, str]]:
    (folder / "tokens").mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "PYTHONPATH": str(REPO)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "fresh", "--so-pin", "fresh-so",
                    "--pin", "fresh-pin"], check=True, capture_output=True, env=env)
    return f"pkcs11:token=fresh?module-path={_softhsm_module()}&pin-value=fresh-pin", env


def _open_at_once(uri: str, env: dict[str, str], folder: Path, names: list[str]) -> list[dict[str, object]]:
    at = time.time() + 1.5  # every child imported keymgr and waits: they open the token together
    children = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, uri, str(at), name,
                                  str(folder / f"audit-{name}.log")], env=env, stdout=subprocess.PIPE, text=True)
                for name in names]
    return [json.loads(child.communicate(timeout=120)[0]) for child in children]


def _check(uri: str, env: dict[str, str], blobs: list[str], logs: list[str]) -> dict[str, object]:
    checked = subprocess.run([sys.executable, "-c", _CHECK, uri, json.dumps({"blobs": blobs, "logs": logs})],
                             env=env, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    result: dict[str, object] = json.loads(checked.stdout)
    return result


@pytest.mark.slow
def test_processes_opening_a_fresh_token_together_all_work(tmp_path: Path) -> None:
    for trial in range(TRIALS):
        folder = tmp_path / f"trial-{trial}"
        uri, env = _fresh_token(folder)
        names: list[str] = []
        blobs: list[str] = []
        singletons: dict[str, list[str]] = {}
        for round_ in range(2):  # a fresh token, then the same token again
            batch = [f"key-{round_}-{n}" for n in range(PROCESSES)]
            outcomes = _open_at_once(uri, env, folder, batch)
            assert all(o["ok"] for o in outcomes), (trial, round_, [o for o in outcomes if not o["ok"]])
            names += batch
            blobs += [str(o["blob"]) for o in outcomes]
            logs = [str(folder / f"audit-{name}.log") for name in names]
            found = _check(uri, env, blobs, logs)
            for label in ("keymgr/meta-mac", "keymgr/audit-mac"):
                keys = found[label]
                assert isinstance(keys, dict)
                ids = keys["ids"]
                assert 1 <= len(ids) <= PROCESSES, (trial, label, ids)
                assert len(set(ids)) == len(ids), (trial, label, ids)  # no two keys share a CKA_ID
                assert keys["misnamed"] == [] and keys["unusable"] == [], (trial, label, keys)
                if round_ == 0:
                    singletons[label] = ids
                else:
                    assert ids == singletons[label], (trial, label, "a token that had keys got more")
            assert found["keys"] == sorted(names), trial
            assert found["plain"] == names, trial  # each message decrypts, read by a process that made none
            for path, (ok, entries, maced, broken) in zip(logs, found["logs"], strict=True):  # type: ignore[call-overload]
                assert ok and entries > 0 and maced, (trial, path, broken)
            print(f"\ntrial {trial} round {round_}: keys per label {[len(ids) for ids in singletons.values()]}")
