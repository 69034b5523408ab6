"""SIGINT / SIGTERM at every step of ``keymgr restore``, ``key rotate`` and ``key destroy``: whole or nothing.

Each command runs in a child (tests/_interrupt_driver.py: forked from a server that imported
keymgr once) that counts the token calls of its main thread and sends itself the signal the
moment a chosen call returned (the token did the work, the answer is not yet used). Three
uninterrupted runs list the calls (the first also makes what a token gets on first use); then,
for each chosen call, a fresh run is interrupted there and the token is read back:

* **completed**: the change is there with everything that belongs to it (for a restore: the
  key's record and objects, the custodians' quorum on the target, the signed transcript file,
  one ``ok`` audit entry), its outcome printed, and the child ended by the signal saying that
  the change was completed first;
* **rolled back**: nothing new (no key object under the backup's ids, no fact, no change to the
  custodian register, no transcript file, no ``ok`` entry);

never anything between, and in call order: rolled back up to the commit, completed from it on.
The audit log verifies (MACs in the token) after every point, and a rerun of the same command
succeeds. Ctrl-C never shows a traceback or click's ``Aborted!``: one line, death by the signal.

Which calls: a call is named by its kind (the token's role and the operation, names blanked)
and its occurrence; every kind is interrupted at its first call, and every call from three
before the commit write to three after it (:func:`_points`); ``KEYMGR_INTERRUPT_ALL=1`` takes
every call (docs/ceremonies.md has the counts). Every fourth point sends SIGTERM instead of
SIGINT. Two SIGKILL cases (no rollback can run) check that a rerun clears or finishes what a
kill left. The ceremonies run on this test's own tokens (interrupt-A, interrupt-B).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keymgr.audit import verify_log
from keymgr.custody.backup_file import BackupFile
from keymgr.custody.ceremony import backup_keys
from keymgr.custody.custodians import CustodyRegister
from keymgr.custody.transcript import verify_transcript
from keymgr.hsm import objects
from keymgr.hsm.pins import Pin
from keymgr.manager import KeyManager
from tests._internals import keyring_of, token_of
from tests.conftest import softhsm_token
from tests.custody_helpers import approvals, guarded_key, hsm, party, registered, request, so_pin

REPO = Path(__file__).resolve().parents[2]
ALL = os.environ.get("KEYMGR_INTERRUPT_ALL") == "1"
ROLLED_BACK, COMPLETED = "rolled back", "completed"
#: the restores' target, and the token of the rotations and destroys (this test's own: tests/conftest.py)
TARGET, KEYS = "interrupt-B", "interrupt-A"


Step = tuple[str, int]  # (kind of token call, its occurrence): tests/_interrupt_driver.py


class _Server:
    """The fork server of tests/_interrupt_driver.py: one ``keymgr`` process per run, forked after imports."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests._interrupt_driver", "--serve"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        out, err = cwd / f"out-{uuid.uuid4().hex[:6]}", cwd / f"err-{uuid.uuid4().hex[:6]}"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"args": args, "env": env, "cwd": str(cwd), "out": str(out),
                                          "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        status = json.loads(self.proc.stdout.readline())["status"]
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_server: list[_Server] = []


@pytest.fixture(scope="module", autouse=True)
def _fork_server() -> Iterator[None]:
    _server.append(_Server())
    yield
    _server.pop().close()


def _keymgr(args: list[str], cwd: Path, log: Path, *, at: str = "",
            steps: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"KEYMGR_AUDIT_LOG": str(log), "KEYMGR_TEST_SIGNAL_AT": at, "KEYMGR_TEST_STEPS": str(steps or "")}
    return _server[0].run(args, cwd, env)


def _steps(path: Path) -> list[Step]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [(kind, int(n)) for kind, n in (line.split("\t") for line in lines)]


def _trace(args: list[str], cwd: Path, log: Path) -> list[Step]:
    path = cwd / f"steps-{uuid.uuid4().hex[:6]}"
    done = _keymgr(args, cwd, log, steps=path)
    assert done.returncode == 0, done.stderr
    return _steps(path)


def _interrupted(args: list[str], cwd: Path, log: Path, at: Step, signame: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` with the signal right after call ``at``, and check that the call was made."""
    path = cwd / f"steps-{uuid.uuid4().hex[:6]}"
    done = _keymgr(args, cwd, log, at=f"{at[0]}\t{at[1]}\t{signame}", steps=path)
    assert at in _steps(path), f"the run made no call {at}"
    return done


def _points(before: list[Step], steps: list[Step], commit: int) -> list[Step]:
    """Where to interrupt, in call order: the first call of each kind, and every call from three
    before the ``commit`` call (1-based) to three after it (KEYMGR_INTERRUPT_ALL=1: every call).
    A kind whose number of calls differs between two runs (a MAC check per fact read: the token
    gains facts from run to run) is interrupted at its first call only."""
    counts, earlier = Counter(k for k, _ in steps), Counter(k for k, _ in before)
    chosen = []
    for number, (kind, occurrence) in enumerate(steps, 1):
        stable = counts[kind] == earlier[kind]
        if occurrence == 1 or (stable and (ALL or abs(number - commit) <= 3)):
            chosen.append((kind, occurrence))
    return chosen


def _signal_for(index: int) -> tuple[str, int]:
    return ("TERM", signal.SIGTERM) if index % 4 == 3 else ("INT", signal.SIGINT)


def _died_of(done: subprocess.CompletedProcess[str], signum: int, what: str) -> bool:
    """The child ended by the signal with one line and no traceback; True if it said the change was completed."""
    assert done.returncode == -signum, f"{what}: status {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr and "Aborted!" not in done.stderr, f"{what}:\n{done.stderr}"
    last = done.stderr.strip().splitlines()[-1]
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert last.startswith(f"keymgr: {word}"), f"{what}: {last!r}"
    assert sum(line.startswith("keymgr: ") for line in done.stderr.splitlines()) == 1, done.stderr
    return "completed" in last


def _entries(log: Path, op: str) -> list[dict[str, object]]:
    return [e for e in map(json.loads, log.read_text().splitlines()) if e["op"] == op] if log.exists() else []


def _log_verifies(log: Path, km: KeyManager) -> None:
    report = verify_log(log, token=token_of(km))
    assert report.ok, f"audit log broken at {report.broken}"


def _facts_of(km: KeyManager, name: str) -> set[str]:
    return {label for label, _ in objects.read_data_objects(token_of(km), application="keymgr") if f"/{name}/" in label}


# -- restore ------------------------------------------------------------------------------------


@dataclass
class Restore:
    """One fresh key on A, its 2-of-3 backup in a file, and the restore command into B."""

    name: str
    path: Path
    backup: BackupFile

    @classmethod
    def make(cls, a: KeyManager, where: Path) -> Restore:
        name = f"ir-{uuid.uuid4().hex[:8]}"
        guarded_key(a, name)
        req = request(a, "backup", name, versions=None)
        result = backup_keys(keyring_of(a), name, so_pin=Pin(so_pin()), request=req, approvals=approvals(a, req, 1, 2))
        path = where / f"{name}.backup"
        path.write_bytes(result.backup)
        return cls(name, path, BackupFile.parse(result.backup))

    def args(self, transcript: Path) -> list[str]:
        out = ["--token", softhsm_token(TARGET).uri(), "restore", str(self.path), "--transcript", str(transcript)]
        for n in (1, 3):
            out += ["--custodian", f"{party(n).name}={party(n).uri()}"]
        return out

    @property
    def key_ids(self) -> set[bytes]:
        return {v.key_id for key in self.backup.keys for v in key.record.versions}

    def outcome(self, b: KeyManager, register_before: dict[str, object], transcript: Path, log: Path,
                runs: int = 1) -> str:
        """Which whole state B is in for this backup; fails on anything in between."""
        keyring_of(b).reload()
        record = next((r for r in keyring_of(b).records() if r.name == self.name), None)
        present = {key_id for _, key_id in objects.list_secret_keys(token_of(b))} & self.key_ids
        register = CustodyRegister(keyring_of(b)).load()
        ok = [e for e in _entries(log, "restore") if e["key"] == self.name and e["outcome"] == "ok"]
        _log_verifies(log, b)
        if record is None:
            assert not present, "key objects of an uncommitted restore were left on the target"
            assert not _facts_of(b, self.name), "facts of an uncommitted restore were left on the target"
            assert register.to_json() == register_before, "the custodian register changed, yet nothing was restored"
            assert not transcript.exists() and not ok
            return ROLLED_BACK
        assert {v.key_id for v in record.versions} == self.key_ids and present == self.key_ids
        assert register.policy_for(self.name) == self.backup.quorum, "restored without its custodians' quorum"
        assert len(ok) == runs, f"{len(ok)} ok audit entries for {runs} restore(s) that completed"
        document = verify_transcript(transcript.read_bytes()).document
        assert document["outcome"] == "success" and {k["name"] for k in document["keys"]} == {self.name}
        return COMPLETED


def _index(steps: list[Step], kind: str, after: int = 0) -> int:
    """1-based number of the first call of ``kind`` after call ``after``."""
    return next(n for n, (k, _) in enumerate(steps, 1) if k == kind and n > after)


UNWRAP = "target: restore keys under the transport key"
WRITE = "target: write data object '…'"


def _summary(what: str, steps: list[Step], outcomes: dict[Step, str]) -> str:
    counts = Counter(outcomes.values())
    order = ", ".join(f"{steps.index(p) + 1}:{'C' if o == COMPLETED else 'R'}" for p, o in outcomes.items())
    return (f"{what}: {len(steps)} token calls of {len(set(k for k, _ in steps))} kinds, {len(outcomes)} "
            f"interrupted: {dict(counts)}; by call number: {order}")


@pytest.mark.slow
def test_sigint_at_every_step_of_a_restore(tmp_path: Path) -> None:
    a, b = hsm("keymgr-A"), hsm(TARGET)
    log = tmp_path / "b-audit.log"
    traces = []
    for trace in range(3):  # the first run makes what a token and a log get on first use (MAC keys, chain)
        first = Restore.make(a, tmp_path)
        traces.append(_trace(first.args(tmp_path / f"trace-{trace}.p7s"), tmp_path, log))
        assert first.outcome(b, {}, tmp_path / f"trace-{trace}.p7s", log) == COMPLETED
    steps = traces[-1]
    points = _points(traces[-2], steps, _index(steps, WRITE, after=_index(steps, UNWRAP)))
    outcomes: dict[Step, str] = {}
    for index, at in enumerate(points):
        signame, signum = _signal_for(index)
        restore = Restore.make(a, tmp_path)
        register_before = CustodyRegister(keyring_of(b)).load().to_json()
        transcript, again = tmp_path / f"t-{index}.p7s", tmp_path / f"r-{index}.p7s"
        done = _interrupted(restore.args(transcript), tmp_path, log, at, signame)
        said_completed = _died_of(done, signum, f"restore interrupted after {at}")
        outcomes[at] = restore.outcome(b, register_before, transcript, log)
        assert said_completed == (outcomes[at] == COMPLETED), f"{at}: stderr does not match the outcome"
        assert ("restored key" in done.stdout) == (outcomes[at] == COMPLETED)
        rerun = _keymgr(restore.args(again), tmp_path, log)
        assert rerun.returncode == 0, f"rerun after {at}: {rerun.stderr}"
        assert restore.outcome(b, {}, again, log, runs=1 + (outcomes[at] == COMPLETED)) == COMPLETED
        assert ("finished it" in rerun.stderr) == (outcomes[at] == COMPLETED)
    print("\n" + _summary("restore", steps, outcomes))
    counts = Counter(outcomes.values())
    assert counts[ROLLED_BACK] and counts[COMPLETED], "both sides of the commit must have been hit"
    # in call order: rolled back up to the commit, completed from it on
    order = [outcomes[p] for p in sorted(outcomes, key=steps.index)]
    assert order == sorted(order, key=lambda o: o == COMPLETED), order
    verify = subprocess.run([sys.executable, "-m", "keymgr", "--token", softhsm_token(TARGET).uri(), "audit",
                             "verify", str(log), "--shared"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_sigkill_before_and_after_the_restore_commit_a_rerun_clears_or_finishes(tmp_path: Path) -> None:
    """SIGKILL runs no rollback: right after the unwrap the restored objects are left unreferenced
    (the rerun destroys them and restores), right after the commit the key is there without its
    custodians, transcript or ok entry (the rerun finishes it)."""
    a, b = hsm("keymgr-A"), hsm(TARGET)
    log = tmp_path / "b-audit.log"
    for trace in range(2):
        probe = Restore.make(a, tmp_path)
        steps = _trace(probe.args(tmp_path / f"probe-{trace}.p7s"), tmp_path, log)
    unwrap = _index(steps, UNWRAP)
    commit = _index(steps, WRITE, after=unwrap)
    for at, left in ((steps[unwrap - 1], "objects"), (steps[commit - 1], "record")):
        restore = Restore.make(a, tmp_path)
        transcript = tmp_path / f"k-{left}.p7s"
        done = _interrupted(restore.args(transcript), tmp_path, log, at, "KILL")
        assert done.returncode == -signal.SIGKILL
        keyring_of(b).reload()
        recorded = any(r.name == restore.name for r in keyring_of(b).records())
        present = {key_id for _, key_id in objects.list_secret_keys(token_of(b))} & restore.key_ids
        assert present == restore.key_ids and recorded == (left == "record") and not transcript.exists()
        rerun = _keymgr(restore.args(transcript), tmp_path, log)
        assert rerun.returncode == 0, rerun.stderr
        assert ("finished it" in rerun.stderr) == (left == "record")
        assert restore.outcome(b, {}, transcript, log, runs=1) == COMPLETED
        ids = [key_id for _, key_id in objects.list_secret_keys(token_of(b)) if key_id in restore.key_ids]
        assert sorted(ids) == sorted(restore.key_ids), "a restored version has two objects"


# -- rotate and destroy -------------------------------------------------------------------------


def _sweep(what: str, tmp_path: Path, make: Callable[[KeyManager], str], args: Callable[[str, Path], list[str]],
           outcome: Callable[[KeyManager, str, Path, Path, set[str]], str],
           rerun_ok: Callable[[str, subprocess.CompletedProcess[str]], None], commit: Step) -> None:
    """Interrupt ``what`` at the points :func:`_points` chooses around its ``commit`` call."""
    a = hsm(KEYS)
    log = tmp_path / f"{what}-audit.log"
    traces = []
    for trace in range(3):
        traces.append(_trace(args(make(a), tmp_path / f"trace-{trace}.p7s"), tmp_path, log))
    steps = traces[-1]
    outcomes: dict[Step, str] = {}
    points = _points(traces[-2], steps, steps.index(commit) + 1)
    for index, at in enumerate(points):
        signame, signum = _signal_for(index)
        name = make(a)
        facts_before = _facts_of(a, name)
        transcript = tmp_path / f"{what}-{index}.p7s"
        done = _interrupted(args(name, transcript), tmp_path, log, at, signame)
        said_completed = _died_of(done, signum, f"{what} interrupted after {at}")
        outcomes[at] = outcome(a, name, transcript, log, facts_before)
        assert said_completed == (outcomes[at] == COMPLETED), f"{what}, {at}: {done.stderr}"
        rerun_ok(name, _keymgr(args(name, tmp_path / f"{what}-again-{index}.p7s"), tmp_path, log))
    print("\n" + _summary(what, steps, outcomes))
    counts = Counter(outcomes.values())
    assert counts[ROLLED_BACK] and counts[COMPLETED]
    order = [outcomes[p] for p in sorted(outcomes, key=steps.index)]
    assert order == sorted(order, key=lambda o: o == COMPLETED), order


def _uri() -> str:
    return softhsm_token(KEYS).uri()


@pytest.mark.slow
def test_sigint_at_every_step_of_a_rotation(tmp_path: Path) -> None:
    def make(a: KeyManager) -> str:
        name = f"it-{uuid.uuid4().hex[:8]}"
        a.create_key(name)
        return name

    def outcome(a: KeyManager, name: str, transcript: Path, log: Path, facts_before: set[str]) -> str:
        keyring_of(a).reload()
        record = a.describe_key(name)
        labels = {label for label, _ in objects.list_secret_keys(token_of(a)) if label.startswith(f"{name}/")}
        ok = [e for e in _entries(log, "rotate") if e["key"] == name and e["outcome"] == "ok"]
        _log_verifies(log, a)
        if len(record.versions) == 1:
            assert labels == {f"{name}/v1"}, f"a rolled-back rotation left {sorted(labels)}"
            assert _facts_of(a, name) == facts_before, "a rolled-back rotation left a fact"
            assert not transcript.exists() and not ok
            return ROLLED_BACK
        assert record.primary == 2 and labels == {f"{name}/v1", f"{name}/v2"} and len(ok) == 1
        assert verify_transcript(transcript.read_bytes()).document["ceremony"] == "rotate"
        return COMPLETED

    def rerun_ok(name: str, done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == 0, done.stderr

    _sweep("rotate", tmp_path, make, lambda name, t: ["--token", _uri(), "key", "rotate", name, "--transcript", str(t)],
           outcome, rerun_ok, commit=(WRITE, 2))  # pending fact, then version fact


@pytest.mark.slow
def test_sigint_at_every_step_of_a_destroy(tmp_path: Path) -> None:
    def make(a: KeyManager) -> str:
        name = f"id-{uuid.uuid4().hex[:8]}"
        a.create_key(name)
        a.rotate(name)
        return name

    def outcome(a: KeyManager, name: str, transcript: Path, log: Path, facts_before: set[str]) -> str:
        keyring_of(a).reload()
        v1 = a.describe_key(name).version(1)
        present = {key_id for _, key_id in objects.list_secret_keys(token_of(a))}  # a find: no cached handle
        exists = v1.key_id in present
        ok = [e for e in _entries(log, "destroy") if e["key"] == name and e["outcome"] == "ok"]
        _log_verifies(log, a)
        if v1.state != "destroyed":
            assert exists and _facts_of(a, name) == facts_before and not transcript.exists() and not ok
            return ROLLED_BACK
        assert not exists, "version 1 is recorded destroyed but its object is still there"
        assert len(ok) == 1 and verify_transcript(transcript.read_bytes()).document["ceremony"] == "destroy"
        return COMPLETED

    def rerun_ok(name: str, done: subprocess.CompletedProcess[str]) -> None:
        # rolled back: the rerun destroys it; completed: it says so (a destroy cannot happen twice)
        assert done.returncode == 0 or (done.returncode == 5 and "already destroyed" in done.stderr), done.stderr

    _sweep("destroy", tmp_path, make,
           lambda name, t: ["--token", _uri(), "key", "destroy", name, "--version", "1", "--yes", "--immediately",
                            "--transcript", str(t)], outcome, rerun_ok,
           commit=(WRITE, 1))  # the state fact


@pytest.mark.slow
def test_sigint_at_every_step_of_a_policy_change(tmp_path: Path) -> None:
    """``custodian policy 2 --key NAME``: the policy and its transcript, or the register as it was."""
    names = ",".join(c.name for c in registered(hsm(KEYS), 1, 2, 3))

    def make(a: KeyManager) -> str:
        name = f"ip-{uuid.uuid4().hex[:8]}"
        a.create_key(name)
        return name

    def outcome(a: KeyManager, name: str, transcript: Path, log: Path, facts_before: set[str]) -> str:
        policy = CustodyRegister(keyring_of(a)).load().policy_for(name)
        ok = [e for e in _entries(log, "policy") if e["key"] == name and e["outcome"] == "ok"]
        _log_verifies(log, a)
        if policy is None:
            assert not transcript.exists() and not ok
            return ROLLED_BACK
        assert policy.threshold == 2 and len(ok) == 1
        assert verify_transcript(transcript.read_bytes()).document["ceremony"] == "set-policy"
        return COMPLETED

    def rerun_ok(name: str, done: subprocess.CompletedProcess[str]) -> None:
        # rolled back: the first policy of the key needs no approval; completed: changing it needs
        # the quorum in force, and it says so
        assert done.returncode == 0 or (done.returncode == 5 and "needs approvals" in done.stderr), done.stderr

    _sweep("policy", tmp_path, make,
           lambda name, t: ["--token", _uri(), "custodian", "policy", "2", "--key", name, "--custodians", names,
                            "--transcript", str(t)], outcome, rerun_ok,
           commit=(WRITE, 1))  # the register's new generation


@pytest.fixture(autouse=True)
def _no_leaked_signal_state() -> None:
    """The parent never holds signals (only the children ran commits)."""
    from keymgr import interrupts

    assert not interrupts.commit_begun()
