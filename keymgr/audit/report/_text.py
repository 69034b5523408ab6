"""The weekly review as plain text: for a terminal, a mail body, or a ticket.

Anomalies and rate-limit trips come first, since they are what the reviewer must act
on; then the counts that put them in context. Every name from the log goes through
:func:`printable`, so a principal called ``"x\\nANOMALIES (0)"`` cannot forge a line.
"""

from __future__ import annotations

from collections.abc import Sequence

from keymgr.audit.report._model import Report, Tally, printable

__all__ = ["render_text", "table"]

_METRICS = ("decrypts", "encrypts", "failures", "refused")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, indent: str = "  ") -> list[str]:
    """Aligned columns; numbers to the right. Cells are made printable here, once."""
    cells = [[printable("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_number(r[i]) for r in cells) and any(r[i].rstrip("*").isdigit() for r in cells)
               for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return (indent + "  ".join(out)).rstrip()

    return [line(list(headers))] + [line(r) for r in cells]


def _number(cell: str) -> bool:
    return cell.rstrip("*").isdigit() or cell in ("", "-")


def _matrix(report: Report, tallies: dict[str, Tally], label: str, *, flags: bool) -> list[str]:
    """One row per name and metric (decrypts always, the others when not all zero), one column a day;
    names with nothing to count (a custodian who only approved) are in the other sections."""
    rows: list[list[object]] = []
    for name, tally in sorted(tallies.items()):
        total = tally.total()
        if not any(getattr(total, metric) for metric in _METRICS):
            continue
        for metric in _METRICS:
            if metric != "decrypts" and not getattr(total, metric):
                continue
            cells: list[object] = [name if metric == "decrypts" else "", metric]
            for day in report.days:
                n = getattr(tally.days[day], metric) if day in tally.days else 0
                star = "*" if flags and metric == "decrypts" and report.flagged(name, day) else ""
                cells.append(f"{n}{star}")
            cells.append(getattr(total, metric))
            rows.append(cells)
    return table([label, "what", *(d[5:] for d in report.days), "total"], rows)


def render_text(report: Report) -> str:
    """The review as text (docs/audit.md has an example)."""
    out: list[str] = []
    since, until = report.period()
    out.append("keymgr access review")
    out.append(f"period: {since} .. {until} (UTC), {len(report.days)} days")
    for log in report.logs:
        out.append(f"log: {log.path}: {log.entries} entries, {log.in_period} in the period"
                   + (f", {log.duplicates} seen in an earlier log (counted once)" if log.duplicates else ""))
    out.extend(f"WARNING: {p}" for p in report.log_problems())
    out.append("Read, not verified: run `keymgr audit verify` on each log before relying on this review.")

    out += ["", f"ANOMALIES ({len(report.anomalies)})"]
    if not report.anomalies:
        out.append("  none")
    for a in report.anomalies:
        keys = ", ".join(f"{k} {n}" for k, n in a.keys)
        out.append(f"  ! {a.kind:<5}  {a.principal}  {a.day}  {a.decrypts} decrypts  keys: {keys or '-'}")
        out.append(f"      {a.reason}")

    out += ["", f"RATE-LIMIT TRIPS ({len(report.rate_limits)})"]
    out += table(["principal", "key", "version", "refusals", "limit", "suspended", "first", "last"],
                 [[t.principal, t.key, t.version or "-", t.count,
                   f"{t.limit}/{t.per_seconds}s" if t.limit is not None else "?", "yes" if t.suspended else "no",
                   t.first, t.last] for t in report.rate_limits]) if report.rate_limits else ["  none"]

    out += ["", f"AUDIT LOG EVENTS ({len(report.audit_events)})"]
    out += table(["time", "op", "principal", "outcome", "detail"],
                 [[e.time, e.op, e.principal, e.outcome, e.summary] for e in report.audit_events]
                 ) if report.audit_events else ["  none"]

    out += ["", "PER PRINCIPAL AND DAY (UTC; * = flagged above)"]
    out += _matrix(report, report.principals, "principal", flags=True) if report.principals else ["  none"]
    out += ["", "PER KEY AND DAY (UTC)"]
    out += _matrix(report, report.keys, "key", flags=False) if report.keys else ["  none"]

    out += ["", f"REFUSED AND FAILED ({sum(p.count for p in report.problems)} entries, grouped)"]
    out += table(["outcome", "count", "principal", "op", "key", "error", "reason", "first", "last"],
                 [[p.outcome, p.count, p.principal, p.op, p.key, p.error or "-", p.reason or "-", p.first, p.last]
                  for p in report.problems]) if report.problems else ["  none"]

    out += ["", f"KEY LIFECYCLE ({len(report.lifecycle)})"]
    out += table(["time", "op", "key", "version", "principal", "outcome", "error", "detail"],
                 [[e.time, e.op, e.key, e.version or "-", e.principal, e.outcome, e.error or "-", e.summary]
                  for e in report.lifecycle]) if report.lifecycle else ["  none"]

    out += ["", f"CEREMONIES ({len(report.ceremonies)})"]
    out += table(["time", "kind", "key", "principal", "participants", "outcome", "detail"],
                 [[e.time, e.kind, e.key, e.principal, ", ".join(e.participants) or "-", e.outcome, e.summary]
                  for e in report.ceremonies]) if report.ceremonies else ["  none"]
    if report.requests:
        out += ["", "  approvals by request:"]
        out += table(["request", "operation", "key", "approvers", "first", "last"],
                     [[r.request, r.operation, r.key, ", ".join(r.approvers), r.first, r.last]
                      for r in report.requests], indent="    ")

    out += ["", "OPERATIONS (entries in the period; aggregated successes counted one by one)"]
    out += table(["op", "ok", "refused", "failed", "intent"],
                 [[op, c.get("ok", 0), c.get("refused", 0), c.get("failed", 0), c.get("intent", 0)]
                  for op, c in sorted(report.operations.items())]) if report.operations else ["  none"]

    t = report.thresholds
    out += ["", f"thresholds: spike > {t.spike_factor:g}x the principal's median day and > {t.spike_floor} "
                f"decrypts; night {t.night_label()} > {t.night_floor} decrypts"
                + (f"; expected at night: {', '.join(sorted(t.expected_at_night))}" if t.expected_at_night else "")]
    return "\n".join(printable(line) for line in out) + "\n"  # every line, whatever built it
