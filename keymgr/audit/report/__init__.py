"""keymgr.audit.report: the weekly access review of audit logs (docs/audit.md, "The weekly review").

Our users' data-protection rules say "access logs are reviewed weekly; anomalous bulk
access freezes the account". The rate limits (:mod:`keymgr.audit.limits`) freeze; this
is the review: who decrypted and encrypted what, day by day, what was refused or failed,
which keys changed state, which ceremonies ran and who took part, and the days that
stand out, each with the numbers that made it stand out.

* :func:`build_report` reads logs (never raising for what they contain) into a :class:`Report`;
* :meth:`Report.to_json`, :func:`render_text`, :func:`render_html` are three views of it;
* :class:`Thresholds`: when a day is flagged, every default documented;
* :func:`parse_since`: ``7d`` / ``24h`` / ISO 8601, as ``keymgr audit report --since`` takes.

One module per concern: ``_model`` (the values), ``_build`` (reading and flagging),
``_text`` and ``_html`` (rendering only).
"""

from keymgr.audit.report._build import build_report, parse_since, principal_of
from keymgr.audit.report._html import render_html
from keymgr.audit.report._model import Anomaly, Event, LogStatus, Problem, Report, Request, Tally, Thresholds, Trip
from keymgr.audit.report._text import render_text

__all__ = [
    "Anomaly",
    "Event",
    "LogStatus",
    "Problem",
    "Report",
    "Request",
    "Tally",
    "Thresholds",
    "Trip",
    "build_report",
    "parse_since",
    "principal_of",
    "render_html",
    "render_text",
]
