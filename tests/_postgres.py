"""A throwaway PostgreSQL server for tests, the bench and the example: Debian's binaries,
``initdb`` in a temporary directory, listening only on a unix socket there, stopped and
removed at the end. PostgreSQL refuses to run as root (CI runs as root), so as root the
server runs as the ``postgres`` system user the Debian package creates (else ``nobody``).

    with TempPostgres() as pg:
        engine = sqlalchemy.create_engine(pg.url("keymgr"))
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (``/usr/lib/postgresql/<v>/bin``), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def missing_reason() -> str | None:
    """Why no server can be started here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (Debian package postgresql; scripts/setup.sh --dev installs it)"
    try:
        import psycopg  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e '.[db]')"
    return None


class TempPostgres:
    """One server on a unix socket in its own temporary directory."""

    def __init__(self, *, durable: bool = True) -> None:
        """``durable=False`` turns fsync off: for tests, whose kills hit the client, never the
        server (a shutdown checkpoint with fsync took ~25 s of a test run); benchmarks keep it on."""
        self.durable = durable
        # as root the server runs as another user, who must reach the directory: /tmp, not a private TMPDIR
        self.dir = Path(tempfile.mkdtemp(prefix="keymgr-pg-", dir="/tmp" if os.geteuid() == 0 else None))
        found = postgres_bin()
        if found is None:
            raise RuntimeError(missing_reason() or "PostgreSQL missing")
        self._bin: Path = found
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres" if _user_exists("postgres") else "nobody"
            pw = pwd.getpwnam(self._user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = self.dir / "data"
        self.socket_dir = self.dir

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()[-400:]}")

    def start(self) -> TempPostgres:
        self._run("initdb", "-D", str(self.data), "-U", "keymgr", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--locale=C")
        fsync = "on" if self.durable else "off"
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -c fsync={fsync} "
                   "-c max_connections=40 -c shared_buffers=64MB")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")
        self._run("createdb", "-h", str(self.socket_dir), "-U", "keymgr", "keymgr")
        return self

    def url(self, database: str = "keymgr") -> str:
        return f"postgresql+psycopg://keymgr@/{database}?host={self.socket_dir}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
