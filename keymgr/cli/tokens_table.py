"""How ``keymgr tokens`` prints: a table whose token labels are never cut.

A token label is what a custodian types at the restore prompt, so a label shown
as ``custodi…`` or folded over two lines is worse than no listing. Where the
terminal is too narrow for a table that shows every label (and every column
heading) whole, each token is printed as a few lines instead, its label alone
on the first (the terminal may wrap a long line, but nothing is cut);
``--wide`` keeps the table at its natural width and lets the terminal wrap it.
Labels are printed as plain text, never as rich markup (a label such as
``[bold]`` is shown as it is).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import click

from keymgr.cli._common import console

__all__ = ["print_tokens"]

_COLUMNS = ("module", "slot", "token", "serial", "flags", "PIN", "schemes")


def _rows(report: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row of plain strings per token (or per module without tokens)."""
    rows: list[tuple[str, ...]] = []
    for entry in report:
        name = Path(entry["module"]).name
        if "error" in entry:
            rows.append((name, "-", "-", "-", "-", "-", entry["error"]))
        elif not entry["tokens"]:
            rows.append((name, "-", "(no tokens)", "", "", "", ""))
        for tok in entry["tokens"]:
            schemes = ", ".join(tok.get("schemes", [])) or tok.get("probe_error", "-")
            if "probe_note" in tok:
                schemes += f" ({tok['probe_note']})"
            flags = ", ".join(f for f in tok["flags"] + tok["slot_flags"] if f != "token-present")
            rows.append((name, str(tok["slot_id"]), tok["label"], tok["serial"], flags, tok["pin_state"], schemes))
    return rows


def _table(rows: list[tuple[str, ...]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    labels = [row[2] for row in rows]
    table = Table(title="PKCS#11 tokens")
    for column in _COLUMNS:
        if column == "token":
            table.add_column(column, no_wrap=True, min_width=max(map(len, labels), default=5))
        else:
            table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _fits(table: Any, labels: list[str], width: int) -> bool:
    """Whether ``table`` printed ``width`` columns wide shows every label whole on one line,
    and every column heading too (a heading folded letter by letter: a table too narrow to read)."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, soft_wrap=False, highlight=False).print(table)
    lines = buffer.getvalue().splitlines()
    return all(any(word in line for line in lines) for word in [*labels, *_COLUMNS])


def _print_lines(report: list[dict[str, Any]]) -> None:
    """The narrow form: per module, each token's label alone on its line, the rest indented below."""
    click.echo("PKCS#11 tokens")
    for entry in report:
        name = Path(entry["module"]).name
        if "error" in entry:
            click.echo(f"{name}: {entry['error']}")
            continue
        click.echo(f"{name}:" if entry["tokens"] else f"{name}: no tokens")
        for row in _rows([{**entry, "tokens": [tok]} for tok in entry["tokens"]]):
            _, slot, label, serial, flags, pin, schemes = row
            click.echo(f"  token: {label}" if label else "  token: (no label: not initialised)")
            click.echo(f"    serial {serial or '-'}, slot {slot}, PIN {pin}")
            if flags:
                click.echo(f"    flags: {flags}")
            click.echo(f"    schemes: {schemes}")


def print_tokens(report: list[dict[str, Any]], *, wide: bool = False) -> None:
    """Print the report of ``keymgr tokens`` as a table (or as lines where a table would cut a label)."""
    from rich.console import Console
    from rich.measure import Measurement

    rows = _rows(report)
    table = _table(rows)
    out = console()
    if wide:
        natural = Measurement.get(out, out.options.update(width=10_000), table).maximum
        Console(file=out.file, width=max(natural, out.width), highlight=False, soft_wrap=True).print(table)
        return
    labels = [tok["label"] for entry in report for tok in entry["tokens"]]
    if _fits(table, labels, out.width):
        out.print(table)
    else:
        _print_lines(report)
