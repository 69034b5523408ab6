"""keymgr.audit: the tamper-evident audit log.

Every key operation appends one JSON line, chained by SHA-256 to the line before
and MACed inside the token by a dedicated audit key; the token also keeps a
checkpoint (last seq and hash) so that a cut-off tail is detected. See
docs/audit.md for the format, what verification proves, and the fsync,
checkpoint and aggregation choices.

* :class:`AuditLog`: the writer (file, ``logging`` and syslog sinks; aggregation);
* :func:`verify_log`: the verifier (``keymgr audit verify``); :func:`read_entries`
  and :func:`select` read a log back (``keymgr audit show``);
* :func:`default_log_path` and :func:`token_log_path`: where a log goes when no one says;
* :func:`repair_log`: start a log that lost entries again, on the record (``keymgr audit repair``);
* :func:`acting_as`: attribute operations to an application principal;
* :class:`RateLimit`: anomaly limits on decryption (:mod:`keymgr.audit.limits`).
"""

from keymgr.audit._config import default_log_path, resolve_audit, standalone_operation, token_log_path
from keymgr.audit._entry import Actor, Entry, parse_line
from keymgr.audit._log import AuditLog
from keymgr.audit._operation import Operation, acting_as, current_operation, current_principal
from keymgr.audit.limits import RateLimit, RateLimiter
from keymgr.audit.repair import Repair, repair_log
from keymgr.audit.verify import (
    Break,
    FleetReport,
    MissingLog,
    VerifyReport,
    parse_time,
    read_entries,
    select,
    verify_log,
    verify_logs,
)

__all__ = [
    "Actor",
    "AuditLog",
    "Break",
    "Entry",
    "Operation",
    "RateLimit",
    "RateLimiter",
    "Repair",
    "VerifyReport",
    "acting_as",
    "current_operation",
    "current_principal",
    "default_log_path",
    "parse_line",
    "parse_time",
    "read_entries",
    "repair_log",
    "resolve_audit",
    "select",
    "standalone_operation",
    "token_log_path",
    "verify_log",
    "verify_logs",
    "FleetReport",
    "MissingLog",
]
