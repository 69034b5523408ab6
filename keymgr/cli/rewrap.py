"""``keymgr rewrap PATH...``: move every envelope under some paths to its key's primary.

Thin (STYLE.md 10): :func:`keymgr.rewrap.bulk.run` does the work; this
module draws the progress bar (stderr, on a terminal or with ``--progress``:
files done, rate, ETA) and prints the summary, or ``--json``. Exit status: 0
when nothing failed, 1 when any file failed (each named with its reason on
stderr), the usual error codes when the run could not start.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from keymgr.cli._common import CliState, console, emit_json, pass_state

if TYPE_CHECKING:  # the engine (multiprocessing, the token layer) is imported when the command runs
    from keymgr.rewrap.bulk import Summary
    from keymgr.rewrap.file import FileOutcome

__all__ = ["rewrap_command"]

_SHOWN = 20  # failures / skipped files listed by name in the human summary


class _Bar:
    """A rich progress bar without its refresh thread: worker processes are forked while it
    is on screen, and a fork must not copy a thread holding the console's locks."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[rate]:>8.1f} files/s"),
                                  TextColumn("[red]{task.fields[failed]} failed"), TimeRemainingColumn(),
                                  console=Console(file=sys.stderr), auto_refresh=False, transient=True)
        self._task = self._progress.add_task(label, total=None, rate=0.0, failed=0)
        self._started = time.monotonic()
        self._drawn = 0.0
        self._failed = 0
        self._progress.start()

    def total(self, count: int) -> None:
        self._progress.update(self._task, total=count)
        self._progress.refresh()

    def advance(self, outcome: FileOutcome) -> None:
        self._failed += outcome.status == "failed"
        done = self._progress.tasks[0].completed + 1
        now = time.monotonic()
        rate = done / (now - self._started) if now > self._started else 0.0
        self._progress.update(self._task, advance=1, rate=rate, failed=self._failed)
        if now - self._drawn >= 0.1:
            self._drawn = now
            self._progress.refresh()

    def stop(self) -> None:
        self._progress.stop()


def _print_summary(summary: Summary) -> None:
    from rich.table import Table

    title = "rewrap (dry run: nothing written)" if summary.dry_run else "rewrap"
    table = Table(title=title)
    table.add_column("files")
    table.add_column("count", justify="right")
    labels = (("rewrapped", "would rewrap" if summary.dry_run else "rewrapped"), ("current", "already current"),
              ("skipped", "skipped (not envelopes, or not for this token)"), ("failed", "failed"))
    for key, label in labels:
        table.add_row(label, str(summary.counts[key]))
    if summary.resumed:
        table.add_row("  of which finished by an earlier run", str(summary.resumed))
    if summary.cleaned:
        table.add_row("leftover temporary files removed", str(summary.cleaned))
    table.add_row("elapsed", f"{summary.elapsed:.2f} s ({summary.rate:.1f} envelopes/s)")
    console().print(table)
    for outcome in summary.skipped[:_SHOWN]:
        click.echo(f"skipped: {outcome.path}: {outcome.reason}")
    for outcome in summary.failures[:_SHOWN]:
        click.echo(f"failed: {outcome.path}: {outcome.reason}", err=True)
    hidden = max(0, len(summary.failures) - _SHOWN) + max(0, len(summary.skipped) - _SHOWN)
    if hidden:
        click.echo(f"... and {hidden} more (use --json for every file)")


@click.command("rewrap")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (token calls are serialised within a process).")
@click.option("--threads", type=click.IntRange(1, 64), default=None,
              help="Threads per process, overlapping file I/O and fsyncs with token calls [default: 4].")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Journal file: an interrupted run given the same journal resumes where it stopped.")
@click.option("--dry-run", is_flag=True, help="Report what would be rewrapped; write nothing, call no unwrap.")
@click.option("--allow-compromised", is_flag=True,
              help="Recovery: let versions marked compromised be rewrapped away from (docs/rotation.md runbook).")
@click.option("--progress/--no-progress", default=None,
              help="Draw the progress bar (default: when stderr is a terminal).")
@pass_state
def rewrap_command(state: CliState, paths: tuple[str, ...], jobs: int, threads: int | None, journal: str | None,
                   dry_run: bool, allow_compromised: bool, progress: bool | None) -> None:
    """Rewrap every keymgr envelope under PATH... (recursively) to its key's current primary.

    Only the wrapped data keys change; payloads are never read. Files that are not
    keymgr envelopes are reported and left untouched. Each file is replaced atomically.
    """
    if allow_compromised:
        from keymgr.manager import KeyManager

        km = KeyManager(state.token_uri, allow_compromised=True)
    else:
        km = state.manager()
    show = progress if progress is not None else (sys.stderr.isatty() and not state.json_output)
    bar = _Bar("dry run" if dry_run else "rewrap") if show else None
    on_total: Callable[[int], Any] | None = bar.total if bar else None
    try:
        summary = km.rewrap_files(paths, jobs=jobs, threads=threads, journal=journal, dry_run=dry_run,
                                  on_total=on_total, on_outcome=bar.advance if bar else None)
    finally:
        if bar is not None:
            bar.stop()
    if state.json_output:
        emit_json(summary.to_json())
    else:
        _print_summary(summary)
    if not summary.ok:
        sys.exit(1)
