"""Processes opening a fresh token at the same moment make one metadata MAC key and one audit key.

PKCS#11 cannot create an object only if it is missing, so each such key is created under
this machine's lock and looked for again under it (keymgr.hsm.locks). Without that, four
processes starting together on a fresh SoftHSM token left three keys under one CKA_ID in one
trial of four, and every later use of that token failed ("3 key objects share id").

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

from tests.conftest import _softhsm_module

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 5
TRIALS = 3

_OPEN_AT_ONCE = r"""
import sys, time
import keymgr
uri, at, name, log = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
while time.time() < at:
    time.sleep(0.0005)
try:
    with keymgr.KeyManager(uri, audit=log) as km:
        km.create_key(name)
        assert km.decrypt(km.encrypt(b"x", key=name)) == b"x"
    print("ok")
except keymgr.KeymgrError as exc:
    print(type(exc).__name__, exc)
"""

_COUNT = r"""
import json, sys
from pkcs11 import Attribute, ObjectClass
from keymgr.hsm import open_token
from keymgr.keyring import META_MAC_ID
from keymgr.audit._token import AUDIT_KEY_ID

def count(session):
    return [len(list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id})))
            for key_id in (META_MAC_ID, AUDIT_KEY_ID)]

print(json.dumps(open_token(sys.argv[1]).run("count keys", count)))
"""


def _fresh_token(folder: Path) -> tuple[str, dict[str, str]]:
    (folder / "tokens").mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "PYTHONPATH": str(REPO)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "fresh", "--so-pin", "fresh-so",
                    "--pin", "fresh-pin"], check=True, capture_output=True, env=env)
    return f"pkcs11:token=fresh?module-path={_softhsm_module()}&pin-value=fresh-pin", env


def test_processes_opening_a_fresh_token_together_make_one_of_each_key(tmp_path: Path) -> None:
    for trial in range(TRIALS):
        folder = tmp_path / f"trial-{trial}"
        uri, env = _fresh_token(folder)
        at = time.time() + 1.5  # every child imported keymgr and waits: they open the token together
        children = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, uri, str(at), f"key-{n}",
                                      str(folder / f"audit-{n}.log")], env=env, stdout=subprocess.PIPE, text=True)
                    for n in range(PROCESSES)]
        outcomes = [child.communicate(timeout=120)[0].strip() for child in children]
        assert outcomes == ["ok"] * PROCESSES, (trial, outcomes)
        counted = subprocess.run([sys.executable, "-c", _COUNT, uri], env=env, capture_output=True, text=True,
                                 check=True, timeout=60)
        assert json.loads(counted.stdout) == [1, 1], trial  # one metadata MAC key, one audit key
