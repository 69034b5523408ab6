"""Bulk rewrap: every envelope under some paths moved to its key's primary, resumably.

``keymgr rewrap PATH...`` is this module with a progress bar. For each
regular file found (directories are walked recursively, symbolic links are
not followed):

- not a keymgr envelope, or an envelope none of whose recipients is a key of
  this token (another site's): reported as *skipped*, never opened for writing;
- all of our recipients under the primary already: *current*, left as it is;
- otherwise: the new envelope (:mod:`keymgr.rewrap.message`: recipients only) replaces
  the file atomically (temporary file in the same directory, fsync, rename,
  directory fsync: :func:`keymgr.files.atomic_output`), keeping its mode
  (and owner, when run as root): *rewrapped*;
- anything refused (a retired version, a tampered recipient, an unreadable
  file, a file changed while it was being rewrapped): *failed*, file untouched.

A kill at any moment leaves every file either old or new, never torn (the
rename is the commit), plus at most one temporary file per worker thread,
named ``.NAME.keymgr-rewrap.PID.XXXXXXXX.tmp`` (where the filesystem has
``O_TMPFILE``, only in the instant between naming it and the rename:
keymgr.files); the next run deletes those
whose writer is gone (it holds an flock on its temporary file while it lives: a pid can be
reused or belong to a dying process) and never takes them for input. With a journal
(:mod:`keymgr.rewrap.journal`) the next run also knows which files were
finished and does not look at them again beyond a digest.

Parallelism: PKCS#11 calls are serialised per module in a process
(STACK-FACTS.md 1), so ``jobs`` worker processes (forked: each re-opens the
token and logs in again with the PIN the parent used) give token
parallelism; ``threads`` per process overlap the file I/O and fsyncs with
the token calls (bench/rewrap.py measured both; docs/rewrap.md). Workers die
with their parent (``PR_SET_PDEATHSIG``), so a killed run leaves no process
holding the journal's lock.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from keymgr import errors
from keymgr.files import os_error_reason, temp_file_abandoned
from keymgr.rewrap.file import TEMP_NAME, TEMP_TAG, FileOutcome, FileRewrapper
from keymgr.rewrap.journal import Journal
from keymgr.rewrap.message import Rewrapper

__all__ = ["DEFAULT_THREADS", "TEMP_TAG", "FileOutcome", "Summary", "run", "walk"]

#: threads per worker process (bench/rewrap.py: fsync latency, not the token, bounds one thread)
DEFAULT_THREADS = 4


@dataclass
class Summary:
    """Counts by status, the files that were not rewrapped and why, and the rate."""

    dry_run: bool = False
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("rewrapped", "current", "skipped",
                                                                          "failed"), 0))
    resumed: int = 0
    cleaned: int = 0
    failures: list[FileOutcome] = field(default_factory=list)
    skipped: list[FileOutcome] = field(default_factory=list)
    elapsed: float = 0.0

    def add(self, outcome: FileOutcome) -> None:
        self.counts[outcome.status] += 1
        self.resumed += outcome.resumed
        if outcome.status == "failed":
            self.failures.append(outcome)
        elif outcome.status == "skipped":
            self.skipped.append(outcome)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        return self.counts["failed"] == 0

    @property
    def rate(self) -> float:
        """Envelopes (rewrapped or current) per second."""
        return (self.counts["rewrapped"] + self.counts["current"]) / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, **self.counts, "resumed": self.resumed, "cleaned_temp_files": self.cleaned,
                "elapsed_s": round(self.elapsed, 3), "envelopes_per_s": round(self.rate, 1),
                "failures": [f.to_json() for f in self.failures], "skipped_files": [s.to_json() for s in self.skipped]}


def walk(paths: Iterable[str | os.PathLike[str]], summary: Summary) -> Iterator[str | FileOutcome]:
    """Absolute paths of the files to look at, in a stable order; outcomes for what is no file.

    The paths given are resolved (a symbolic link named on the command line is followed, as
    ``find -H`` does); below them links are reported and not followed, and a directory that
    cannot be listed is a failure. A leftover temporary file of a dead rewrap process is
    deleted (``summary.cleaned``)."""
    for given in paths:
        top = os.path.realpath(os.fspath(given))
        if not os.path.exists(top):
            yield FileOutcome(os.path.abspath(os.fspath(given)), "failed", reason="no such file or directory")
            continue
        if not os.path.isdir(top):
            yield from _files_in(os.path.dirname(top), [os.path.basename(top)], summary)
            continue
        unreadable: list[OSError] = []
        for directory, subdirs, names in os.walk(top, onerror=unreadable.append, followlinks=False):
            yield from _unreadable(unreadable)
            for name in [d for d in subdirs if os.path.islink(os.path.join(directory, d))]:
                subdirs.remove(name)
                yield FileOutcome(os.path.join(directory, name), "skipped", reason="symbolic link (not followed)")
            subdirs.sort()
            yield from _files_in(directory, sorted(names), summary)
        yield from _unreadable(unreadable)


def _unreadable(errors_seen: list[OSError]) -> Iterator[FileOutcome]:
    while errors_seen:
        exc = errors_seen.pop(0)
        yield FileOutcome(str(exc.filename), "failed", reason=f"cannot list directory: {os_error_reason(exc)}")


def _files_in(directory: str, names: Sequence[str], summary: Summary) -> Iterator[str | FileOutcome]:
    for name in names:
        path = os.path.join(directory, name)
        temp = TEMP_NAME.match(name)
        if temp is not None:
            if temp_file_abandoned(path):
                try:
                    os.unlink(path)
                    summary.cleaned += 1
                except FileNotFoundError:
                    pass
            continue
        yield FileOutcome(path, "skipped", reason="symbolic link (not followed)") if os.path.islink(path) else path




def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies, so a killed run leaves no worker holding
    the journal lock or writing after a resumed run began. Elsewhere the worker checks its parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_Report = Callable[[FileOutcome], None]


def _serve(worker: FileRewrapper, tasks: Any, results: Any, threads: int, parent: int, start: Any) -> None:
    """A worker process: take paths from ``tasks`` until the None sentinel, report each outcome.

    The first token call (re-initialising the module after fork) is made under ``start``, one
    worker at a time: SoftHSM 2.6.1 initialised by two forked children at once lost the token
    in one of them now and then (2-5 runs in 30 here; TokenRemovedError "reconnect")."""
    _die_with_parent()
    # the parent reports an interrupt (keymgr.interrupts) and its end ends the workers: a worker
    # raising KeyboardInterrupt too would print multiprocessing's traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with start:
        worker.ready()

    def loop() -> None:
        while os.getppid() == parent:
            path = tasks.get()
            if path is None:
                return
            results.put(worker.process(path))

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(loop) for _ in range(threads)]:
            future.result()


def _in_processes(worker: FileRewrapper, paths: list[str], jobs: int, threads: int, report: _Report) -> None:
    ctx = multiprocessing.get_context("fork")  # the children inherit the logged-in manager (see module doc)
    tasks, results, start = ctx.Queue(), ctx.Queue(), ctx.Lock()
    procs = [ctx.Process(target=_serve, args=(worker, tasks, results, threads, os.getpid(), start), daemon=True)
             for _ in range(jobs)]
    for proc in procs:
        proc.start()
    for path in paths:
        tasks.put(path)
    for _ in range(jobs * threads):
        tasks.put(None)
    pending = set(paths)
    while pending:
        try:
            outcome = results.get(timeout=0.5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                for path in sorted(pending):
                    report(FileOutcome(path, "failed", reason="the worker process died; run again to resume"))
                break
            continue
        pending.discard(outcome.path)
        report(outcome)
    for proc in procs:
        proc.join(timeout=5)


def run(rewrapper: Rewrapper, paths: Iterable[str | os.PathLike[str]], *, jobs: int = 1,
        threads: int = DEFAULT_THREADS, journal: str | os.PathLike[str] | None = None, dry_run: bool = False,
        on_total: Callable[[int], None] | None = None, on_outcome: _Report | None = None) -> Summary:
    """Rewrap every envelope under ``paths``; the :class:`Summary` says what happened to each file.

    ``on_total`` hears the number of files once the walk is done, ``on_outcome`` each file's
    outcome as it comes (progress bars). ``journal`` names the journal file (created if
    missing, resumed if not); a dry run reads it for nothing and writes nothing.
    """
    if jobs < 1 or threads < 1:
        raise errors.ConfigurationError("--jobs and --threads must be at least 1")
    started = time.monotonic()
    summary = Summary(dry_run=dry_run)

    def report(outcome: FileOutcome) -> None:
        summary.add(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    opened = Journal(journal) if journal is not None and not dry_run else None
    try:
        files: dict[str, None] = {}  # ordered and unique: a file named twice is rewrapped once
        early: list[FileOutcome] = []
        for found in walk(paths, summary):
            if isinstance(found, str):
                files[found] = None
            else:
                early.append(found)
        if opened is not None:
            files.pop(os.path.abspath(opened.path), None)
        if on_total is not None:
            on_total(len(files) + len(early))
        for outcome in early:
            report(outcome)
        worker = FileRewrapper(rewrapper, opened, dry_run=dry_run)
        worker.ready()  # before any fork: the workers inherit the probe
        if jobs == 1 or len(files) < 2:
            with ThreadPoolExecutor(threads) as pool:
                for outcome in pool.map(worker.process, list(files)):
                    report(outcome)
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            _in_processes(worker, list(files), jobs, threads, report)
    finally:
        if opened is not None:
            opened.close()
    summary.elapsed = time.monotonic() - started
    return summary
