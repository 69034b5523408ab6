"""``keymgr rewrap`` over 1,000 envelopes, SIGKILLed at random moments, then resumed to completion.

The promise (keymgr.rewrap.bulk, keymgr.rewrap.journal): a kill at any point loses
nothing. The run is a real ``python -m keymgr rewrap`` process group (the parent
and, with ``--jobs 2``, its forked workers) killed with SIGKILL; most kills come
when the journal has grown by a random number of lines since the run started
(so they land at random points inside the per-file protocol: writing the
temporary file, between ``begin`` and the rename, between the rename and
``done``), the others at a random time after start (during start-up and the
walk). After the last kill one uninterrupted run finishes the job; then every
envelope must decrypt to its original plaintext under the new primary, the
directory must hold exactly the files it started with (nothing truncated, no
temporary file left to be mistaken for an envelope), the journal must be
consistent, and the final summary must account for all 1,000 files as
rewrapped (none counted twice, none lost).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import keymgr
from keymgr.envelope.inspect import inspect_file
from keymgr.rewrap.journal import check_journal, read_entries
from tests._crash_token import crash_token
from tests.conftest import TokenUnderTest

REPO = Path(__file__).resolve().parents[2]
ENVELOPES = 1000
STREAM_EVERY = 5  # 200 streams, 800 messages
PLAIN_FILES = 10
KILLS = 24
CTX = {"suite": "crash"}

pytestmark = pytest.mark.slow


def _populate(km: keymgr.KeyManager, root: Path, key: str, rng: random.Random) -> dict[Path, bytes]:
    plain: dict[Path, bytes] = {}
    for i in range(ENVELOPES):
        folder = root / f"{i % 7}" / f"{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randrange(0, 3000))
        if i % STREAM_EVERY == 0:
            out = io.BytesIO()
            km.encrypt_stream(io.BytesIO(data), out, key=key, context=CTX)
            path, blob = folder / f"s{i}.kms", out.getvalue()
        else:
            path, blob = folder / f"m{i}.cms", km.encrypt(data, key=key, context=CTX)
        path.write_bytes(blob)
        plain[path] = data
    for i in range(PLAIN_FILES):
        (root / f"{i % 7}" / f"notes{i}.txt").write_bytes(rng.randbytes(100))
    return plain


def _command(token: TokenUnderTest, root: Path, journal: Path, jobs: int) -> list[str]:
    return [sys.executable, "-m", "keymgr", "--token", token.uri(), "rewrap", str(root), "--journal", str(journal),
            "--jobs", str(jobs), "--json", "--no-progress"]


def _size(journal: Path) -> int:
    try:
        return journal.stat().st_size
    except FileNotFoundError:
        return 0


def _run_and_kill(cmd: list[str], env: dict[str, str], journal: Path, rng: random.Random) -> bool:
    """Start a run and SIGKILL its process group at a random moment; False if it finished first.

    A quarter of the kills come at a random time after start; the rest once the journal grew
    by a random number of bytes (a journal line is ~170 bytes: 1 to ~40 lines), polled by
    stat so the watcher takes little CPU from the run."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    by_time = rng.random() < 0.25
    deadline = time.monotonic() + rng.uniform(0.05, 0.6)
    target = _size(journal) + rng.randrange(1, 7000)
    while proc.poll() is None:
        if (time.monotonic() >= deadline) if by_time else (_size(journal) >= target):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    _, err = proc.communicate()
    assert proc.returncode in (0, 1), err.decode(errors="replace")
    return False


def test_sigkill_at_random_moments_then_resume(key_name: str, tmp_path: Path) -> None:
    # SIGKILLs can land while a worker logs in, and C_Login rewrites SoftHSM's token file in place:
    # a kill then can leave the token unreadable (STACK-FACTS 23); tests/_crash_token.py mends it.
    crash = crash_token()
    softhsm = crash.token
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    root, journal = tmp_path / "data", tmp_path / "rewrap.journal"
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.create_key(key_name)
        plain = _populate(km, root, key_name, rng)
        km.rotate(key_name)
        primary = km.describe_key(key_name).primary_version.key_id
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    others = {p: p.read_bytes() for p in root.rglob("notes*.txt")}
    env = {**os.environ, **softhsm.env, "PYTHONPATH": str(REPO)}

    kills = attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < KILLS * 3, "the run kept finishing before it could be killed"
        kills += _run_and_kill(_command(softhsm, root, journal, jobs=rng.choice((1, 2))), env, journal, rng)
        crash.mend()
    done_before_final = sum(e.state == "done" for e in read_entries(journal))
    assert 0 < done_before_final < ENVELOPES, "the kills should have interrupted a run in progress"

    final = subprocess.run(_command(softhsm, root, journal, jobs=2), env=env, cwd=REPO, capture_output=True,
                           timeout=120)
    assert final.returncode == 0, final.stderr.decode(errors="replace")
    summary = json.loads(final.stdout)
    assert (summary["rewrapped"], summary["current"], summary["skipped"], summary["failed"]) == \
        (ENVELOPES, 0, PLAIN_FILES, 0)
    assert summary["resumed"] >= done_before_final

    after = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert after == before  # nothing truncated away, nothing duplicated, no temporary file left
    assert {p: p.read_bytes() for p in others} == others
    assert check_journal(journal) == []
    with keymgr.KeyManager(softhsm.uri()) as km:
        km.retire(key_name, below=2, immediately=True)  # only the new primary decrypts from here on
        for path, data in plain.items():
            info = inspect_file(path)
            assert info is not None and info.kek_ids == (primary,), path
            blob = path.read_bytes()
            if info.kind == "message":
                assert km.decrypt(blob, context=CTX) == data, path
            else:
                out = io.BytesIO()
                km.decrypt_stream(io.BytesIO(blob), out, context=CTX)
                assert out.getvalue() == data, path
