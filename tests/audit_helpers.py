"""Shared by the audit tests: honest logs on a real token, and the five ways to tamper with one."""

from __future__ import annotations

import json
from pathlib import Path

from keymgr._canonical import canonical_json as canonical
from keymgr.audit import AuditLog
from keymgr.audit._entry import line_digest
from keymgr.hsm import TokenSession

ENTRIES = 8


def honest_log(path: Path, ts: TokenSession, count: int = ENTRIES) -> list[bytes]:
    """``count`` entries written through AuditLog with the token's audit key; returns the lines."""
    with AuditLog(path, token=ts, aggregate=()) as log:
        for i in range(count):
            log.record("create" if i % 2 else "rotate", key=f"orders-{i}", version=1 + i % 3,
                       outcome="ok" if i % 3 else "refused", detail={"n": i})
    return path.read_bytes().splitlines()


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def edited(lines: list[bytes], index: int) -> list[bytes]:
    """Line ``index`` (0-based) with one field changed and re-serialised canonically."""
    data = json.loads(lines[index])
    data["outcome"] = "ok" if data["outcome"] != "ok" else "failed"
    return lines[:index] + [canonical(data)] + lines[index + 1:]


def deleted(lines: list[bytes], index: int) -> list[bytes]:
    return lines[:index] + lines[index + 1:]


def swapped(lines: list[bytes], index: int) -> list[bytes]:
    return lines[:index] + [lines[index + 1], lines[index]] + lines[index + 2:]


def inserted(lines: list[bytes], index: int, *, mac: str | None = "ab" * 32) -> list[bytes]:
    """A forged entry put before line ``index``, made to fit the chain where it lands (the
    attacker can compute SHA-256, not the token's MAC)."""
    data = json.loads(lines[index - 1])
    data.update(seq=data["seq"] + 1, prev=line_digest(lines[index - 1]), op="decrypt", key="payroll", mac=mac)
    return lines[:index] + [canonical(data)] + lines[index:]


def truncated(lines: list[bytes], count: int) -> list[bytes]:
    return lines[:-count]
