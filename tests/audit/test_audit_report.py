"""The weekly access review (keymgr.audit.report, ``keymgr audit report``) over a synthetic week.

The week (tests/audit_week.py) is genuine logs with chosen times; the expected counts are
what its generator tallied as it wrote, not what the code under test computes. The HTML is
rendered by a real headless Chromium (see :func:`_run_chromium` for what works with
Debian 12's build).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from keymgr.audit import AuditLog, acting_as, verify_log
from keymgr.audit.report import Report, Thresholds, build_report, render_html, render_text
from keymgr.cli import cli
from tests.audit_week import (
    ALICE,
    BILLING,
    BULK_DAY,
    DAYS,
    ETL,
    EVIL_CUSTODIAN,
    MALLORY,
    NOW,
    REPORTS,
    START,
    Week,
    label,
    make_week,
)


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> Week:
    return make_week(tmp_path_factory.mktemp("week"))


@pytest.fixture(scope="module")
def report(week: Week) -> Report:
    return build_report(week.paths, since=START, now=NOW)


# -- the review's findings --------------------------------------------------------------------------------------


def test_the_week_is_genuine_logs(week: Week) -> None:
    assert week.entries > 2000
    for path in week.paths:
        result = verify_log(path)
        assert result.ok, result.broken


def test_flags_exactly_the_night_bulk_reader(report: Report, week: Week) -> None:
    flagged = {(a.principal, a.kind, a.day) for a in report.anomalies}
    assert flagged == {("etl", "spike", BULK_DAY), ("etl", "night", BULK_DAY)}
    spike = next(a for a in report.anomalies if a.kind == "spike")
    night = next(a for a in report.anomalies if a.kind == "night")
    assert spike.decrypts == week.decrypts[("etl", BULK_DAY)]
    assert night.decrypts == week.night[("etl", BULK_DAY)]
    others = sorted(week.decrypts[("etl", d)] for d in DAYS if d != BULK_DAY)
    assert spike.baseline == (others[2] + others[3]) / 2  # the median of six days
    assert f"{spike.decrypts} decrypts on {BULK_DAY}" in spike.reason and "above 5x the median and above 1000" \
        in spike.reason and f"its median of {spike.baseline:g}" in spike.reason
    assert f"{night.decrypts} decrypts between 00:00 and 05:00 UTC" in night.reason and "above 100" in night.reason
    assert dict(night.keys).keys() == {"customers", "orders"}


def test_counts_per_principal_key_and_day(report: Report, week: Week) -> None:
    principals = {label(a) for a in (BILLING, REPORTS, ALICE, ETL, MALLORY)}
    assert principals <= set(report.principals)
    assert report.days == DAYS
    for principal in principals:
        tally = report.principals[principal]
        for day in DAYS:
            counts = tally.days.get(day)
            got = (counts.decrypts, counts.encrypts, counts.failures) if counts else (0, 0, 0)
            assert got == (week.decrypts[(principal, day)], week.encrypts[(principal, day)],
                           week.failures[(principal, day)]), (principal, day)
    for key in ("orders", "invoices", "customers"):
        assert {d: report.keys[key].days[d].decrypts for d in DAYS} == {d: week.key_decrypts[(key, d)] for d in DAYS}
    assert report.principals["alice@ws1"].who == {"alice@ws1"}
    assert report.principals["billing"].who == {"svc-billing@app1"}
    assert [log.in_period for log in report.logs] and all(log.bad_lines == 0 for log in report.logs)


def test_refusals_rate_limits_lifecycle_and_ceremonies(report: Report) -> None:
    refused = [(p.outcome, p.principal, p.op, p.key, p.error, p.count) for p in report.problems]
    assert ("refused", "billing", "decrypt", "invoices", "PolicyError", 3) in refused
    assert ("failed", "alice@ws1", "decrypt", "customers", "IntegrityError", 5) in refused
    assert ("failed", "alice@ws1", "login", "(none)", "AuthenticationError", 2) in refused
    assert not any(p.principal == "reports" for p in report.problems)  # rate-limit refusals have their section
    [trip] = report.rate_limits
    assert (trip.principal, trip.key, trip.version, trip.count, trip.limit, trip.suspended) == \
        ("reports", "orders", 2, 4, 500, True)
    lifecycle = [(e.op, e.key, e.outcome) for e in report.lifecycle]
    assert lifecycle == [("suspend", "orders", "ok"), ("resume", "orders", "ok"), ("create", "payroll", "ok"),
                         ("rotate", "orders", "ok"), ("retire", "orders", "intent")]
    assert "interrupted" in report.lifecycle[-1].summary
    kinds = [(e.kind, e.participants) for e in report.ceremonies]
    assert kinds == [("approval", ("carol",)), ("approval", (EVIL_CUSTODIAN,)), ("backup", ()),
                     ("policy-change approval", ("carol",))]
    assert [(r.request, r.operation, r.approvers) for r in report.requests] == [
        ("0123456789abcdef", "backup", ["carol", EVIL_CUSTODIAN]), ("fedcba9876543210", "set-policy", ["carol"])]
    assert [(e.op, e.principal, e.summary) for e in report.audit_events] == [("audit-off", "bob@ws3", "by=audit=False")]
    assert report.operations["suspend"] == {"intent": 1, "ok": 1}


def test_thresholds_are_parameters(week: Week) -> None:
    quiet = build_report(week.paths, since=START, now=NOW, thresholds=Thresholds(expected_at_night=frozenset({"etl"})))
    assert {(a.principal, a.kind) for a in quiet.anomalies} == {("etl", "spike")}
    low = build_report(week.paths, since=START, now=NOW, thresholds=Thresholds(spike_floor=500))
    assert ("alice@ws1", "spike", DAYS[3]) in {(a.principal, a.kind, a.day) for a in low.anomalies}
    wide = build_report(week.paths, since=START, now=NOW, thresholds=Thresholds(night=(22, 6), night_floor=10_000))
    assert {a.kind for a in wide.anomalies} == {"spike"}
    with pytest.raises(Exception, match="night"):
        Thresholds(night=(5, 5))


def test_json_and_text_agree(report: Report) -> None:
    data = json.loads(json.dumps(report.to_json()))
    text = render_text(report)
    assert data["format"] == "keymgr-access-review/1" and data["days"] == DAYS
    assert [(a["principal"], a["kind"]) for a in data["anomalies"]] == [("etl", "night"), ("etl", "spike")]
    for anomaly in data["anomalies"]:
        assert anomaly["reason"] in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.startswith("  ") and len(line.split()) == len(DAYS) + 3 and line.split()[1] == "decrypts"}
    for principal in ("billing", "reports", "alice@ws1", "etl"):
        entry = data["principals"][principal]
        expected = [str(entry["days"].get(d, {}).get("decrypts", 0)) for d in DAYS] + [str(entry["total"]["decrypts"])]
        assert [cell.rstrip("*") for cell in rows[principal][2:]] == expected
    assert rows["etl"][2 + 5].endswith("*") and not any(c.endswith("*") for c in rows["billing"])
    assert "\n! spike  root" not in text and "\\u000a! spike  root" in text  # the forged line stays inside its cell
    assert "RATE-LIMIT TRIPS (1)" in text and "audit-off" in text and "retire" in text


def test_logs_that_do_not_parse_are_reported(tmp_path: Path, week: Week) -> None:
    damaged = tmp_path / "damaged.log"
    lines = week.paths[1].read_bytes().splitlines(keepends=True)
    damaged.write_bytes(b"".join(lines[:10]) + b"not json\n" + b"".join(lines[10:]) + b'{"torn')
    result = build_report([damaged, tmp_path / "missing.log", week.paths[1]], since=START, now=NOW)
    first, missing, again = result.logs
    assert (first.bad_lines, first.first_bad, first.entries) == (2, [11, len(lines) + 2], len(lines))
    assert missing.error is not None and "cannot read" in missing.error
    assert again.duplicates == len(lines) and again.in_period == 0  # the same entries: counted once
    assert len(result.log_problems()) == 2 and "WARNING" in render_text(result)


def test_counts_what_auditlog_writes(tmp_path: Path) -> None:
    path = tmp_path / "real.log"
    with AuditLog(path, aggregate=("decrypt",)) as log, acting_as("billing"):
        with log.operation("rotate", key="orders") as op:  # an intent entry, then the outcome
            op.version = 2
        for _ in range(25):
            log.record("decrypt", key="orders", version=2)
        log.record("decrypt", key="orders", version=2, outcome="failed", error=ValueError())
    assert [json.loads(line)["outcome"] for line in path.read_text().splitlines()] == ["intent", "ok", "failed", "ok"]
    result = build_report(path, since=None)
    counts = result.principals["billing"].total()  # today's, or yesterday's too when run at midnight
    assert (counts.decrypts, counts.failures) == (25, 1) and not result.anomalies
    assert [(e.op, e.version, e.outcome) for e in result.lifecycle] == [("rotate", 2, "ok")]


# -- the command ---------------------------------------------------------------------------------------------------


def test_cli_report_forms(tmp_path: Path, week: Week) -> None:
    args = ["audit", "report", *map(str, week.paths), "--since", "2026-11-30", "--until", "2026-12-07"]
    result = CliRunner().invoke(cli, [*args, "--format", "json", "-o", str(tmp_path / "r.json")],
                                catch_exceptions=False)
    assert result.exit_code == 0 and "2 anomalies, 1 rate-limit trips" in result.stdout
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) == "0o600"
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["since"] == "2026-11-30T00:00:00Z" and len(data["anomalies"]) == 2
    text = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert text.exit_code == 0 and "ANOMALIES (2)" in text.stdout
    quiet = CliRunner().invoke(cli, [*args, "--json", "--expected-at-night", "etl", "--spike-floor", "100000"])
    assert json.loads(quiet.stdout)["anomalies"] == []
    week_back = CliRunner().invoke(cli, [*args[:-4], "--since", "7d", "--until", "2026-12-07T00:00Z", "--json"])
    assert json.loads(week_back.stdout)["days"] == DAYS
    folder = CliRunner().invoke(cli, ["--json", "audit", "report", str(week.paths[0].parent), *args[-4:]])
    assert json.loads(folder.stdout) == data  # a directory: its *.log files, as `audit verify` takes them
    bad = CliRunner().invoke(cli, [*args, "--night", "late"])
    assert bad.exit_code == 2 and "START-END" in bad.stderr
    gone = CliRunner().invoke(cli, [*args, str(tmp_path / "moved.log")])
    assert gone.exit_code == 2 and "ANOMALIES (2)" in gone.stdout and "moved.log: cannot read" in gone.stderr


def test_cli_default_log_is_verifys(tmp_path: Path, week: Week, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYMGR_AUDIT_LOG", str(week.paths[1]))
    result = CliRunner().invoke(cli, ["audit", "report", "--since", "all", "--until", "2026-12-07", "--json"])
    assert result.exit_code == 0, result.stderr
    assert [log["path"] for log in json.loads(result.stdout)["logs"]] == [str(week.paths[1])]


# -- the HTML page ---------------------------------------------------------------------------------------------


def test_html_escapes_what_comes_from_the_log(report: Report) -> None:
    page = render_html(report)
    assert "<img" not in page and "<script" not in page and "onerror=alert(1)>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&quot;\\u000a! spike  root" in page
    assert "&lt;script&gt;alert(&#x27;c&#x27;)&lt;/script&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert 'id="anomalies"' in page and 'id="per-principal"' in page and "default-src 'none'" in page


class _Tables(HTMLParser):
    """Each table of a page by id, as rows of cell texts; and every element name seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.elements: Counter[str] = Counter()
        self.bars: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements[tag] += 1
        values = dict(attrs)
        if tag == "table":
            self._table = values.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "rect":
            self.bars.append(values.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _png_facts(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the image data): a blank page has very few."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            chunks.append(data[offset + 8:offset + 8 + length])
        offset += 12 + length
    return width, height, len(set(zlib.decompress(b"".join(chunks))))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run_chromium(binary: str, profile: Path, page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Debian 12's chromium (156 here): ``--headless`` is the new headless mode; ``--no-sandbox``
    because tests may run as root; a throwaway profile so runs never share state. With
    ``--enable-logging=stderr --v=0`` it prints every console message of the page to stderr as
    ``INFO:CONSOLE:<line>] "<message>", source: <url> (<line>)`` (errors and uncaught exceptions
    included, as ``"Uncaught ..."``); D-Bus and GPU noise on stderr is not about the page."""
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", "--hide-scrollbars", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TZ": "UTC"})


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def chromium() -> Iterator[str]:
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed and could not be here (scripts/setup.sh --dev installs the Debian "
                    "package `chromium`)")
    yield binary


@pytest.mark.slow
def test_html_in_headless_chromium(tmp_path: Path, report: Report, chromium: str) -> None:
    # first, that this chromium reports console errors the way _console reads them
    canary = tmp_path / "canary.html"
    canary.write_text("<!DOCTYPE html><html><body><script>undefinedFunction()</script></body></html>")
    probe = _run_chromium(chromium, tmp_path / "profile0", canary, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in _console(probe.stderr)), probe.stderr[-2000:]

    page = tmp_path / "review.html"
    page.write_text(render_html(report), encoding="utf-8")
    dom = _run_chromium(chromium, tmp_path / "profile1", page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == []
    parsed = _Tables()
    parsed.feed(dom.stdout)
    anomalies = parsed.tables["anomalies"]
    assert anomalies[0][:3] == ["kind", "principal", "day"]
    assert sorted((row[0], row[1], row[2]) for row in anomalies[1:]) == [("night", "etl", BULK_DAY),
                                                                         ("spike", "etl", BULK_DAY)]
    per_principal = {row[0] for row in parsed.tables["per-principal"][1:] if row[0]}
    assert {"billing", "reports", "alice@ws1", "etl"} <= per_principal
    assert any(name.startswith('<img src=x onerror=alert(1)>"') for name in per_principal)  # shown as text
    assert parsed.elements["script"] == 0 and parsed.elements["img"] == 0
    assert {"per-key", "problems", "lifecycle", "ceremonies", "requests", "rate-limits", "audit-events"} <= \
        set(parsed.tables)
    assert parsed.bars.count("bar anomalous") == 1 and parsed.bars.count("night anomalous") == 1
    assert parsed.elements["svg"] == sum(1 for t in report.principals.values() if t.total().decrypts)

    shot = tmp_path / "review.png"
    run = _run_chromium(chromium, tmp_path / "profile2", page, f"--screenshot={shot}", "--window-size=1200,2000")
    assert run.returncode == 0 and _console(run.stderr) == [], run.stderr[-2000:]
    width, height, distinct = _png_facts(shot)
    assert (width, height) == (1200, 2000) and shot.stat().st_size > 50_000 and distinct > 200
    keep = os.environ.get("KEYMGR_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
