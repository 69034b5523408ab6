"""The weekly review as one self-contained HTML page: tables and hand-written SVG charts.

No script and no external resource (font, image, stylesheet): the page reads the same as
a mail attachment, in a ticket or on an air-gapped laptop, and its Content-Security-Policy
(``default-src 'none'``) makes the browser enforce that, so even a name that slipped past
escaping could load or run nothing. Every string from the log (principal, key, error,
detail, custodian) is attacker-influenced: it goes through :func:`_e`, which makes it
printable and then :func:`html.escape`\\ s it, quotes included, for text and attributes alike.

Tables carry ids a test or a scraper can find: ``anomalies``, ``rate-limits``,
``audit-events``, ``per-principal``, ``per-key``, ``problems``, ``lifecycle``, ``ceremonies``, ``requests``,
``operations``, ``thresholds``; the charts are ``figure.chart`` in ``#charts``, anomalous
bars ``rect.bar.anomalous``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from keymgr.audit.report._model import Report, Tally, printable

__all__ = ["render_html"]

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body{font:14px/1.4 system-ui,"DejaVu Sans",sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:4px 0 12px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;
vertical-align:top;white-space:nowrap}td.wrap{white-space:normal;min-width:16em}th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.anomaly td,td.anomalous{background:#fde2e1}td.anomalous{font-weight:bold;color:#a00}
section.alert{border-left:6px solid #d62728;background:#fff6f6;padding:4px 14px 8px;margin-top:16px}
section.alert h2{color:#a00;border:0}.warning{color:#a00;font-weight:bold}.note{color:#555}
.ok{color:#276b27}#charts{display:flex;flex-wrap:wrap;gap:14px}figure.chart{margin:0;border:1px solid #ddd;
padding:6px}figcaption{font-weight:bold;font-size:13px;max-width:300px;overflow-wrap:anywhere}
.swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:-1px}
rect.bar{fill:#5b8ff9}rect.night{fill:#23408e}rect.bar.anomalous{fill:#d62728}
rect.night.anomalous{fill:#7d1010}svg text{font:9px system-ui,"DejaVu Sans",sans-serif;fill:#444}
"""
_METRICS = ("decrypts", "encrypts", "failures", "refused")
#: Cells longer than this may wrap; the others (times, counts, names) stay on one line.
_LONG = 40


@dataclass(frozen=True)
class _Cell:
    """A table cell with a class (and a tooltip): a flagged count, say."""

    value: object
    cls: str = ""
    title: str = ""


def _e(value: object) -> str:
    return html.escape(printable("" if value is None else str(value)), quote=True)


def _td(cell: object) -> str:
    if not isinstance(cell, _Cell):
        cell = _Cell(cell)
    long = not isinstance(cell.value, int) and len(str(cell.value)) > _LONG  # a 128-character principal
    classes = " ".join(c for c in ("num" if isinstance(cell.value, int) else "", cell.cls, "wrap" if long else "")
                       if c)
    attrs = (f' class="{classes}"' if classes else "") + (f' title="{_e(cell.title)}"' if cell.title else "")
    return f"<td{attrs}>{_e(cell.value)}</td>"


def _table(ident: str, headers: Sequence[str], rows: Sequence[Sequence[object]], *,
           row_class: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    if not rows:
        body = f'<tr class="none"><td colspan="{len(headers)}">none</td></tr>'
    else:
        tr = f'<tr class="{row_class}">' if row_class else "<tr>"
        body = "\n".join(tr + "".join(_td(c) for c in row) + "</tr>" for row in rows)
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _chart(report: Report, principal: str, tally: Tally) -> str:
    """Decrypts per day of one principal, as bars on the principal's own scale (a shared scale
    would flatten every principal but the busiest); the night-window part of each bar darker,
    flagged days red."""
    width, height, top, bottom, side = 300, 160, 28, 22, 8
    days = report.days
    counts = [tally.days[d].decrypts if d in tally.days else 0 for d in days]
    peak = max(counts, default=0) or 1
    slot = (width - 2 * side) / max(len(days), 1)
    bar = slot * 0.72
    plot = height - top - bottom
    every = max(1, len(days) // 10)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="decrypts per day of {_e(principal)}">',
             f'<text x="{side}" y="11">max {peak} a day</text>',
             f'<line x1="{side}" y1="{top + plot}" x2="{width - side}" y2="{top + plot}" stroke="#999"/>']
    for i, (day, n) in enumerate(zip(days, counts, strict=True)):
        flagged = " anomalous" if report.flagged(principal, day) else ""
        x = side + i * slot + (slot - bar) / 2
        h = plot * n / peak
        night = min(tally.night.get(day, 0), n)
        tip = f"{principal} {day}: {n} decrypts, {night} in the night window" + (" (flagged)" if flagged else "")
        parts.append(f'<rect class="bar{flagged}" x="{x:.1f}" y="{top + plot - h:.1f}" width="{bar:.1f}" '
                     f'height="{h:.1f}"><title>{_e(tip)}</title></rect>')
        if night:
            nh = plot * night / peak
            parts.append(f'<rect class="night{flagged}" x="{x:.1f}" y="{top + plot - nh:.1f}" width="{bar:.1f}" '
                         f'height="{nh:.1f}"><title>{_e(tip)}</title></rect>')
        if i % every == 0:
            middle = x + bar / 2
            parts.append(f'<text x="{middle:.1f}" y="{height - 8}" text-anchor="middle">{day[5:]}</text>')
            if n:
                parts.append(f'<text x="{middle:.1f}" y="{top + plot - h - 3:.1f}" text-anchor="middle">{n}</text>')
    parts.append("</svg>")
    return (f'<figure class="chart"><figcaption>{_e(principal)}</figcaption>' + "".join(parts) + "</figure>")


def _matrix(ident: str, report: Report, tallies: dict[str, Tally], label: str, *, flags: bool) -> str:
    """A row per name and metric (decrypts always, others when not all zero), a column per day."""
    rows: list[list[object]] = []
    for name, tally in sorted(tallies.items()):
        total = tally.total()
        if not any(getattr(total, metric) for metric in _METRICS):
            continue  # a custodian who only approved: in the ceremonies table
        for metric in _METRICS:
            if metric != "decrypts" and not getattr(total, metric):
                continue
            who = ", ".join(sorted(tally.who)[:5]) + (" ..." if len(tally.who) > 5 else "")
            row: list[object] = [name if metric == "decrypts" else "", _Cell(who if metric == "decrypts" else "",
                                                                             "wrap"), metric]
            for day in report.days:
                n = getattr(tally.days[day], metric) if day in tally.days else 0
                why = report.flagged(name, day) if flags and metric == "decrypts" else []
                row.append(_Cell(n, "anomalous", "; ".join(a.reason for a in why)) if why else n)
            row.append(getattr(total, metric))
            rows.append(row)
    column = "acting OS accounts" if flags else "used by"
    return _table(ident, [label, column, "what", *(d[5:] for d in report.days), "total"], rows)


def render_html(report: Report) -> str:
    """The review as one HTML page (module docstring)."""
    since, until = report.period()
    title = f"keymgr access review {since} .. {until}"
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           "<h1>keymgr access review</h1>",
           f'<p>Period <b>{_e(since)}</b> to <b>{_e(until)}</b> (UTC, end exclusive), '
           f"{len(report.days)} days.</p><ul>"]
    out += [f"<li>{_e(log.path)}: {log.entries} entries, {log.in_period} in the period</li>" for log in report.logs]
    out += [f'<li class="warning">{_e(problem)}</li>' for problem in report.log_problems()]
    out.append('</ul><p class="note">Read, not verified: run <code>keymgr audit verify</code> on each log '
               "before relying on this review.</p>")

    out.append(f'<section class="alert" id="anomalies-section"><h2>Anomalies ({len(report.anomalies)})</h2>')
    out.append(_table("anomalies", ["kind", "principal", "day", "decrypts", "keys", "why"],
                      [[a.kind, a.principal, a.day, a.decrypts, ", ".join(f"{k} ({n})" for k, n in a.keys),
                        _Cell(a.reason, "wrap")] for a in report.anomalies], row_class="anomaly"))
    out.append(f"<h2>Rate-limit trips ({len(report.rate_limits)})</h2>")
    out.append(_table("rate-limits", ["principal", "key", "version", "refusals", "limit", "suspended", "first",
                                      "last"],
                      [[t.principal, t.key, t.version or "-", t.count,
                        f"{t.limit} per {t.per_seconds} s" if t.limit is not None else "?",
                        _Cell("yes", "anomalous") if t.suspended else "no", t.first, t.last]
                       for t in report.rate_limits], row_class="anomaly"))
    out.append(f"<h2>Audit log events ({len(report.audit_events)})</h2>")
    out.append(_table("audit-events", ["time", "op", "principal", "outcome", "detail"],
                      [[e.time, e.op, e.principal, e.outcome, _Cell(e.summary, "wrap")] for e in report.audit_events],
                      row_class="anomaly"))
    out.append("</section>")

    out.append('<h2>Decrypts per day and principal</h2><p class="note">Each chart on its own scale.'
               '<span class="swatch" style="background:#5b8ff9"></span>decrypts'
               '<span class="swatch" style="background:#23408e"></span>of which in the night window '
               f'{_e(report.thresholds.night_label())}'
               '<span class="swatch" style="background:#d62728"></span>flagged day</p><div id="charts">')
    out += [_chart(report, p, t) for p, t in sorted(report.principals.items()) if t.total().decrypts]
    out.append("</div>")

    out.append("<h2>Per principal and day</h2>")
    out.append(_matrix("per-principal", report, report.principals, "principal", flags=True))
    out.append("<h2>Per key and day</h2>")
    out.append(_matrix("per-key", report, report.keys, "key", flags=False))
    out.append(f"<h2>Refused and failed ({sum(p.count for p in report.problems)} entries, grouped)</h2>")
    out.append(_table("problems", ["outcome", "count", "principal", "op", "key", "error", "reason", "first", "last"],
                      [[p.outcome, p.count, p.principal, p.op, p.key, p.error or "-", p.reason or "-", p.first,
                        p.last] for p in report.problems]))
    out.append(f"<h2>Key lifecycle ({len(report.lifecycle)})</h2>")
    out.append(_table("lifecycle", ["time", "op", "key", "version", "principal", "outcome", "error", "participants",
                                    "detail"],
                      [[e.time, e.op, e.key, e.version or "-", e.principal,
                        _Cell(e.outcome, "" if e.outcome == "ok" else "anomalous"), e.error or "-",
                        ", ".join(e.participants) or "-", _Cell(e.summary, "wrap")] for e in report.lifecycle]))
    out.append(f"<h2>Ceremonies ({len(report.ceremonies)})</h2>")
    out.append(_table("ceremonies", ["time", "kind", "key", "principal", "participants", "outcome", "detail"],
                      [[e.time, e.kind, e.key, e.principal, _Cell(", ".join(e.participants) or "-", "wrap"),
                        _Cell(e.outcome, "" if e.outcome == "ok" else "anomalous"), _Cell(e.summary, "wrap")]
                       for e in report.ceremonies]))
    out.append("<h3>Approvals by request</h3>")
    out.append(_table("requests", ["request", "operation", "key", "approvers", "first", "last"],
                      [[r.request, r.operation, r.key, _Cell(", ".join(r.approvers), "wrap"), r.first, r.last]
                       for r in report.requests]))
    out.append("<h2>Operations</h2><p class=\"note\">Entries in the period; aggregated successes counted one by "
               "one.</p>")
    out.append(_table("operations", ["op", "ok", "refused", "failed", "intent"],
                      [[op, c.get("ok", 0), c.get("refused", 0), c.get("failed", 0), c.get("intent", 0)]
                       for op, c in sorted(report.operations.items())]))
    t = report.thresholds
    out.append("<h2>Thresholds</h2>")
    out.append(_table("thresholds", ["rule", "flagged when"],
                      [["spike", f"a day's decrypts > {t.spike_factor:g} x the principal's median day and "
                                 f"> {t.spike_floor}"],
                       ["night", f"decrypts in {t.night_label()} > {t.night_floor} in one night"],
                       ["expected at night", ", ".join(sorted(t.expected_at_night)) or "-"]]))
    out.append("</body></html>\n")
    return "\n".join(out)
