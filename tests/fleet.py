"""A simulated fleet: N "hosts" on one machine that share only a SoftHSM2 token directory.

Each host is a process in its own mount namespace (``unshare -m --propagation private``)
with fresh tmpfs mounts on ``/tmp``, ``/var/tmp``, ``/run`` and ``/dev/shm``, and its own
``HOME`` and ``TMPDIR`` inside its private ``/tmp``. Everything keymgr keeps per machine
(the advisory locks under ``TMPDIR``, ``$KEYMGR_HOME``, anything in ``/run`` or ``/dev/shm``)
is therefore per host, as on separate machines; the token directory, which lives outside
those mounts (under ``<repo>/.fleet-tmp``), is the one thing they share, as hosts share a
network HSM. Needs root (or CAP_SYS_ADMIN): tests are skipped, with the reason, only when
mount namespaces are not permitted.

A host runs a Python script given as a string. The script runs with these globals:

``HOST``      this host's index, ``0 .. N_HOSTS-1``
``N_HOSTS``   how many hosts this run has
``URI``       the token's ``pkcs11:`` URI (with ``pin-value``)
``ARGS``      this host's arguments (anything JSON can carry)
``DISK``      a directory of this host that outlives it (``<workspace>/hosts/<HOST>``), for
              state a restarted host should find again; ``/tmp`` dies with the host
``barrier()`` block until every live host has reached the same barrier, then until the
              common wall-clock moment the harness picked (returns it; ``START_AT`` is set)
``wait_for_start()`` the first ``barrier()``: do the slow setup (imports, opening the
              token) before it and the racing part after it, so the race is real
``mark(label)`` tell the harness the host got here (a kill point for ``kill_at_mark``)
``RESULT``    the script sets it: the JSON-able result the harness hands back

The script's ``print`` output (and anything C code writes to fd 1) goes to stderr; the
harness alone writes stdout: exactly one JSON line, ``RESULT``. Protocol lines (barriers,
marks) go on stderr prefixed ``@@fleet`` and are taken out of the stderr handed back.

Usage::

    with fleet_workspace() as ws:
        token = fresh_token(ws)
        run_host("import keymgr\\nwith keymgr.KeyManager(URI, audit=False) as km: km.create_key('k')\\n"
                 "RESULT = 'ok'", token).check()
        run = run_hosts(3, SCRIPT, token, args=[{"count": 20}] * 3, kill_at_mark={2: "wrote"})
        run.assert_ok()  # hosts 0 and 1 succeeded; host 2 died by SIGKILL at its mark
        per_host = run.results
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["FleetRun", "FleetToken", "HostResult", "MASKED", "FLEET_ROOT", "fleet_workspace", "fresh_token",
           "require_namespaces", "run_host", "run_hosts"]

REPO = Path(__file__).resolve().parent.parent
#: the directories each host gets a private tmpfs on
MASKED = ("/tmp", "/var/tmp", "/run", "/dev/shm")


def _under_masked(path: Path) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in MASKED)


#: the shared scratch area: outside every directory a host gets privately (gitignored in the
#: checkout; a checkout that itself lives under /tmp, as a CI clone may, uses /var/lib instead)
FLEET_ROOT = Path(os.environ.get("KEYMGR_FLEET_ROOT") or (
    "/var/lib/keymgr-fleet-tests" if _under_masked(REPO) else REPO / ".fleet-tmp"))
#: a checkout under a masked directory is bound back into each host's private mounts, at its path
_KEEP = [REPO] if _under_masked(REPO) else []
USER_PIN = "1234"
SO_PIN = "5678"
_PREFIX = "@@fleet "

# Runs as `sh -c _SHELL fleet-host python -c _BOOT SPEC`: fresh tmpfs mounts, then HOME and TMPDIR in them.
def _shell(hold: Path) -> str:
    """The host's mount setup: the checkout (if under a masked directory) bound aside first, fresh
    tmpfs mounts, the checkout bound back at its path, then HOME and TMPDIR in the private /tmp."""
    aside = [(keep, hold / str(n)) for n, keep in enumerate(_KEEP)]
    steps = [f"mkdir -p '{spot}' && mount --bind '{keep}' '{spot}'" for keep, spot in aside]
    steps += [f"mount -t tmpfs -o mode=1777 tmpfs {d}" for d in MASKED]
    steps += [f"mkdir -p '{keep}' && mount --bind '{spot}' '{keep}'" for keep, spot in aside]
    return "set -e; " + " && ".join(steps) + '; mkdir -p "$HOME" "$TMPDIR"; exec "$@"'


_SHELL = _shell(FLEET_ROOT / ".hold")

_BOOT = r'''
import json, os, sys, time, traceback
_spec = json.loads(sys.argv[1])
_out = os.fdopen(os.dup(1), "w")      # the result line's channel
os.dup2(2, 1)                         # everything else written to fd 1 lands on stderr
sys.stdout = sys.stderr
sys.argv = ["<fleet-script>"]
_kill = _spec["kill_at_mark"]         # [label, occurrence] or None: pause there until SIGKILLed
_seen = {}
_gen = [0]

def _say(*words):
    sys.stderr.write("\n@@fleet " + " ".join(str(w) for w in words) + "\n")
    sys.stderr.flush()

def mark(label):
    label = str(label)
    if not label or any(c.isspace() for c in label):
        raise ValueError(f"mark label must be one word: {label!r}")
    _seen[label] = _seen.get(label, 0) + 1
    _say("mark", label, repr(time.time()))
    if _kill is not None and label == _kill[0] and _seen[label] == _kill[1]:
        while True:                   # the harness SIGKILLs this host now
            time.sleep(1)

def barrier():
    _gen[0] += 1
    _say("ready", _gen[0])
    line = sys.stdin.readline().split()
    if len(line) != 2 or int(line[0]) != _gen[0]:
        raise RuntimeError(f"fleet barrier {_gen[0]} aborted by the harness ({line!r})")
    at = float(line[1])
    while True:
        left = at - time.time()
        if left <= 0:
            break
        time.sleep(left - 0.002 if left > 0.004 else 0)
    late = time.time() - at
    _say("go", _gen[0], repr(late))
    _g["START_AT"] = at
    return at

def wait_for_start():
    return barrier() if _gen[0] == 0 else _g["START_AT"]

_g = {"__name__": "__fleet__", "HOST": _spec["host"], "N_HOSTS": _spec["n_hosts"], "URI": _spec["uri"],
      "ARGS": _spec["args"], "DISK": _spec["disk"], "START_AT": None, "barrier": barrier,
      "wait_for_start": wait_for_start, "mark": mark}
try:
    exec(compile(_spec["script"], "<fleet-script>", "exec"), _g)
except SystemExit as exc:
    if exc.code not in (None, 0):
        raise
except BaseException:
    traceback.print_exc()
    raise SystemExit(1) from None
if "RESULT" not in _g:
    raise SystemExit("fleet: the script did not set RESULT")
_out.write(json.dumps(_g["RESULT"]) + "\n")
_out.flush()
'''


# --------------------------------------------------------------------------- namespaces

_probe: list[str | None] = []


def _namespace_problem() -> str | None:
    """None when this process may run hosts; else why not (cached)."""
    if _probe:
        return _probe[0]
    reason: str | None = None
    if shutil.which("unshare") is None:
        raise RuntimeError("unshare (util-linux) is not installed: the fleet harness needs it")
    if os.geteuid() != 0:
        reason = f"mount namespaces need root (CAP_SYS_ADMIN); running as uid {os.geteuid()}"
    else:
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                "mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /run"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            err = probe.stderr.strip()
            if "not permitted" not in err.lower() and "permission denied" not in err.lower():
                raise RuntimeError(f"unshare -m failed for another reason than permissions: {err}")
            reason = f"mount namespaces are not permitted here: {err}"
    _probe.append(reason)
    return reason


def require_namespaces() -> None:
    """pytest.skip (with the reason) when mount namespaces are not permitted; fail on any other problem."""
    reason = _namespace_problem()
    if reason is not None:
        pytest.skip(f"fleet harness: {reason}")


def _masked(path: Path | str) -> str | None:
    resolved = Path(path).resolve()
    for d in MASKED:
        if resolved == Path(d) or Path(d) in resolved.parents:
            return d
    return None


def _check_reachable(paths: Mapping[str, Path | str]) -> None:
    for what, path in paths.items():
        if any(Path(path).resolve() == keep or keep in Path(path).resolve().parents for keep in _KEEP):
            continue  # bound back into every host (_shell)
        hidden = _masked(path)
        if hidden is not None:
            raise RuntimeError(f"fleet harness: {what} {path} is under {hidden}, which every host replaces "
                               "with a private tmpfs: hosts could not reach it")


# --------------------------------------------------------------------------- token

@contextmanager
def fleet_workspace() -> Iterator[Path]:
    """A fresh directory under ``FLEET_ROOT`` (outside every host-private mount), removed afterwards."""
    _check_reachable({"the fleet scratch area": FLEET_ROOT})
    FLEET_ROOT.mkdir(exist_ok=True)
    ws = FLEET_ROOT / uuid.uuid4().hex[:12]
    ws.mkdir()
    try:
        yield ws
    finally:
        shutil.rmtree(ws, ignore_errors=True)
        with contextlib.suppress(OSError):
            FLEET_ROOT.rmdir()  # only when no other run's workspace is left


def softhsm_module() -> str:
    from keymgr.hsm.discovery import SOFTHSM_CANDIDATES

    for candidate in SOFTHSM_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise RuntimeError("SoftHSM2 is not installed: run scripts/setup.sh --dev")


@dataclass(frozen=True)
class FleetToken:
    """A SoftHSM2 token of its own: its configuration, token directory, URI and environment."""

    workspace: Path
    conf: Path
    tokendir: Path
    label: str
    module_path: str
    user_pin: str
    so_pin: str

    @property
    def uri(self) -> str:
        return f"pkcs11:token={self.label}?module-path={self.module_path}&pin-value={self.user_pin}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs in its environment to see this token (and import keymgr)."""
        return {"SOFTHSM2_CONF": str(self.conf), "PYTHONPATH": str(REPO)}


def fresh_token(workspace: Path, label: str = "fleet", *, user_pin: str = USER_PIN,
                so_pin: str = SO_PIN) -> FleetToken:
    """Initialise a SoftHSM2 token in ``workspace/<label>/`` with its own ``softhsm2.conf``.

    The harness's processes are the only ones that should open it: SoftHSM reads its token
    directory once per process, so the pytest process (configured by conftest) never sees it.
    """
    _check_reachable({"the token workspace": workspace})
    folder = workspace / label
    tokendir = folder / "tokens"
    tokendir.mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n")
    made = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", user_pin,
                           "--so-pin", so_pin], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    if made.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {made.stderr.strip() or made.stdout.strip()}")
    return FleetToken(workspace, conf, tokendir, label, softhsm_module(), user_pin, so_pin)


# --------------------------------------------------------------------------- results

@dataclass
class HostResult:
    index: int
    returncode: int | None
    #: the script's RESULT (None when the host printed no result line)
    result: Any
    stdout: str
    #: stderr without the harness's ``@@fleet`` protocol lines
    stderr: str
    #: (label, host wall-clock time) of each mark(), in order
    marks: list[tuple[str, float]] = field(default_factory=list)
    #: seconds each barrier() woke after its release moment (small positive: the race was real)
    lateness: list[float] = field(default_factory=list)
    #: SIGKILLed by the harness on request (kill_after / kill_at_mark), and why
    killed: bool = False
    kill_reason: str = ""
    timed_out: bool = False
    #: set when the result line could not be parsed
    protocol_error: str = ""
    #: the harness's wall-clock time when it saw the host exit
    exited_at: float | None = None

    @property
    def ok(self) -> bool:
        return (self.returncode == 0 and not self.killed and not self.timed_out and not self.protocol_error
                and self.stdout.strip() != "")

    def describe(self) -> str:
        state = ("timed out" if self.timed_out else f"killed ({self.kill_reason})" if self.killed
                 else f"exit {self.returncode}")
        tail = "\n".join(self.stderr.rstrip().splitlines()[-25:])
        extra = f" protocol error: {self.protocol_error}" if self.protocol_error else ""
        return f"host {self.index}: {state}{extra}\n  stderr (tail):\n    " + tail.replace("\n", "\n    ")

    def check(self) -> Any:
        """The result, or AssertionError with the host's stderr."""
        assert self.ok, self.describe()
        return self.result


@dataclass
class FleetRun:
    hosts: list[HostResult]
    #: wall-clock moments each barrier generation was released at (index 0: the start barrier)
    releases: list[float]

    @property
    def results(self) -> list[Any]:
        return [h.result for h in self.hosts]

    @property
    def returncodes(self) -> list[int | None]:
        return [h.returncode for h in self.hosts]

    @property
    def stderrs(self) -> list[str]:
        return [h.stderr for h in self.hosts]

    @property
    def started_at(self) -> float | None:
        return self.releases[0] if self.releases else None

    def assert_ok(self) -> None:
        """Every host not killed on purpose succeeded; every host killed on purpose died by SIGKILL."""
        bad = [h for h in self.hosts if (h.returncode != -signal.SIGKILL if h.killed else not h.ok)]
        assert not bad, "fleet hosts failed:\n" + "\n".join(h.describe() for h in bad)

    def max_lateness(self) -> float:
        return max((x for h in self.hosts for x in h.lateness), default=0.0)


# --------------------------------------------------------------------------- running hosts

KillAt = str | tuple[str, int]


class _Host:
    def __init__(self, index: int, proc: subprocess.Popen[str]) -> None:
        self.index = index
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self.marks: list[tuple[str, float]] = []
        self.lateness: list[float] = []
        self.reached = 0  # barrier generations reached
        self.exited = False
        self.exited_at: float | None = None
        self.kill_reason = ""
        self.timed_out = False
        self.threads: list[threading.Thread] = []

    def sigkill(self, reason: str = "") -> None:
        """SIGKILL the host's process group (its own session: the host and anything it started).

        ``reason`` empty: a time-out. Whether the kill took is decided by the exit status (a host
        may have exited on its own just before)."""
        if self.exited or self.kill_reason or self.timed_out:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if reason:
            self.kill_reason = reason
        else:
            self.timed_out = True


def _pump_stdout(h: _Host) -> None:
    assert h.proc.stdout is not None
    for line in h.proc.stdout:
        h.out.append(line)


def _pump_stderr(h: _Host, events: queue.Queue[tuple[int, str, list[str]]]) -> None:
    assert h.proc.stderr is not None
    blank = False  # a held-back empty line: the one the protocol line's leading newline makes
    for line in h.proc.stderr:
        at = line.find(_PREFIX)
        if at < 0:
            if blank:
                h.err.append("\n")
            blank = line == "\n"
            if not blank:
                h.err.append(line)
            continue
        blank = False
        if at > 0:  # text the script wrote without a newline before the protocol line
            h.err.append(line[:at] + "\n")
        words = line[at + len(_PREFIX):].split()
        if words:
            events.put((h.index, words[0], words[1:]))


def _wait(h: _Host, events: queue.Queue[tuple[int, str, list[str]]]) -> None:
    h.proc.wait()
    for t in h.threads:  # the protocol lines it wrote are all queued before its exit
        t.join(timeout=5)
    events.put((h.index, "exit", []))


def _host_env(token: FleetToken, index: int, run_tag: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"TMPDIR", "TMP", "TEMP", "KEYMGR_HOME", "KEYMGR_AUDIT_LOG", "XDG_RUNTIME_DIR",
                        "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"}
           and not k.startswith("PYTEST_")}
    home = f"/tmp/fleet-host-{index}-{run_tag}"
    env.update(token.env)
    env.update({"HOME": f"{home}/home", "TMPDIR": f"{home}/tmp", "PYTHONDONTWRITEBYTECODE": "1",
                "FLEET_HOST": str(index)})
    if extra:
        env.update(extra)
    return env


def run_hosts(n: int, script: str, token: FleetToken, *,
              args: Sequence[Any] | Callable[[int], Any] | None = None,
              timeout: float = 60.0,
              kill_after: Mapping[int, float] | None = None,
              kill_at_mark: Mapping[int, KillAt] | None = None,
              env: Mapping[str, str] | None = None,
              lead: float = 0.2) -> FleetRun:
    """Run ``script`` on ``n`` hosts at once; return when all have exited (or ``timeout`` passed).

    ``args``: one JSON-able value per host (a sequence of length ``n``), or a function of the
    host index; ``ARGS`` is None without it. ``kill_after``: host index -> seconds after the
    start barrier's release (the host must call ``wait_for_start()``) to SIGKILL it.
    ``kill_at_mark``: host index -> label (or (label, occurrence), 1-based): the host pauses at
    that ``mark()`` and is SIGKILLed there, so the crash point is exact. ``env``: extra environment
    for every host. ``lead``: seconds between a barrier's release and the moment hosts go.
    Hosts still running at ``timeout`` are SIGKILLed and reported ``timed_out`` (not raised).
    """
    require_namespaces()
    if n < 1:
        raise ValueError("a fleet needs at least one host")
    if isinstance(args, Sequence) and not isinstance(args, (str, bytes)):
        if len(args) != n:
            raise ValueError(f"args has {len(args)} entries for {n} hosts")
        per_host = list(args)
    elif callable(args):
        per_host = [args(i) for i in range(n)]
    elif args is None:
        per_host = [None] * n
    else:
        raise TypeError("args: a sequence of one value per host, or a function of the host index")
    kill_after = dict(kill_after or {})
    kills: dict[int, tuple[str, int]] = {i: (k, 1) if isinstance(k, str) else (k[0], int(k[1]))
                                         for i, k in (kill_at_mark or {}).items()}
    for i in [*kill_after, *kills]:
        if not 0 <= i < n:
            raise ValueError(f"no host {i} in a fleet of {n}")
    _check_reachable({"the python interpreter": sys.executable, "sys.prefix": sys.prefix,
                      "sys.base_prefix": sys.base_prefix, "the repository": REPO,
                      "the token directory": token.tokendir, "the token's softhsm2.conf": token.conf,
                      "the SoftHSM module": token.module_path})

    run_tag = uuid.uuid4().hex[:8]
    events: queue.Queue[tuple[int, str, list[str]]] = queue.Queue()
    hosts: list[_Host] = []
    releases: list[float] = []
    deadline = time.monotonic() + timeout
    try:
        for i in range(n):
            disk = token.workspace / "hosts" / str(i)
            disk.mkdir(parents=True, exist_ok=True)
            spec = {"host": i, "n_hosts": n, "uri": token.uri, "args": per_host[i], "disk": str(disk),
                    "script": script, "kill_at_mark": list(kills[i]) if i in kills else None}
            proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", _SHELL, "fleet-host",
                 sys.executable, "-c", _BOOT, json.dumps(spec)],
                cwd=REPO, env=_host_env(token, i, run_tag, env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
            h = _Host(i, proc)
            h.threads = [threading.Thread(target=_pump_stdout, args=(h,), daemon=True),
                         threading.Thread(target=_pump_stderr, args=(h, events), daemon=True)]
            for t in h.threads:
                t.start()
            threading.Thread(target=_wait, args=(h, events), daemon=True).start()
            hosts.append(h)

        kill_due: dict[int, float] = {}  # host -> monotonic moment
        while not all(h.exited for h in hosts):
            now = time.monotonic()
            if now >= deadline:
                for h in hosts:
                    h.sigkill()
                deadline = float("inf")  # now wait for the exits
            for i, due in list(kill_due.items()):
                if now >= due:
                    hosts[i].sigkill(f"kill_after={kill_after[i]}s")
                    del kill_due[i]
            wake = min([deadline, *kill_due.values()]) - time.monotonic()
            try:
                index, kind, words = events.get(timeout=max(0.0, min(wake, 1.0)))
            except queue.Empty:
                continue
            h = hosts[index]
            if kind == "exit":
                h.exited = True
                h.exited_at = time.time()
            elif kind == "ready":
                h.reached = int(words[0])
            elif kind == "go":
                h.lateness.append(float(words[1]))
            elif kind == "mark":
                h.marks.append((words[0], float(words[1])))
                if index in kills:
                    label, occurrence = kills[index]
                    if words[0] == label and sum(m[0] == label for m in h.marks) == occurrence:
                        h.sigkill(f"at mark {label!r} #{occurrence}")
            # Release barrier generation g once every live host has reached it (and someone waits).
            gen = len(releases) + 1
            live = [x for x in hosts if not x.exited and not x.kill_reason and not x.timed_out]
            if live and all(x.reached >= gen for x in live):
                at = time.time() + lead
                releases.append(at)
                for x in live:
                    with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                        assert x.proc.stdin is not None
                        x.proc.stdin.write(f"{gen} {at!r}\n")
                        x.proc.stdin.flush()
                if gen == 1:
                    base = time.monotonic() + (at - time.time())
                    kill_due.update({i: base + s for i, s in kill_after.items()})
    finally:
        for h in hosts:
            if not h.exited:  # only when this loop failed: leave nothing running
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.proc.wait(timeout=10)
            if h.proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    h.proc.stdin.close()
            for t in h.threads:
                t.join(timeout=5)

    return FleetRun([_result(h) for h in hosts], releases)


def _result(h: _Host) -> HostResult:
    stdout = "".join(h.out)
    lines = [x for x in stdout.splitlines() if x.strip()]
    result: Any = None
    problem = ""
    if len(lines) == 1:
        try:
            result = json.loads(lines[0])
        except json.JSONDecodeError as exc:
            problem = f"result line is not JSON ({exc}): {lines[0][:200]!r}"
    elif len(lines) > 1:
        problem = f"{len(lines)} lines on stdout, expected one JSON line"
    stderr = "".join(h.err)
    by_sigkill = h.proc.returncode == -signal.SIGKILL
    return HostResult(h.index, h.proc.returncode, result, stdout, stderr, h.marks, h.lateness,
                      bool(h.kill_reason) and by_sigkill, h.kill_reason if by_sigkill else "",
                      h.timed_out and by_sigkill, problem, h.exited_at)


def run_host(script: str, token: FleetToken, *, args: Any = None, timeout: float = 60.0,
             env: Mapping[str, str] | None = None) -> HostResult:
    """One host on its own (e.g. set-up before a race, or checking the token after one)."""
    return run_hosts(1, script, token, args=[args], timeout=timeout, env=env).hosts[0]
