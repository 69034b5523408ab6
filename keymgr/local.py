"""The embedded default token: a SoftHSM2 token of keymgr's own.

``keymgr init`` creates it under ``$KEYMGR_HOME`` (default
``$XDG_DATA_HOME/keymgr``, i.e. ``~/.local/share/keymgr``), with its own
``softhsm2.conf`` and token directory, never the system token directory, so
it cannot collide with other SoftHSM users on the machine. The user PIN is
chosen at init (prompted or generated) and kept in a 0600 file that the
default URI names with ``pin-source=file:...``; the SO PIN is generated and
kept beside it (0600) for the PIN-unlock runbook.

``softhsm2-util`` cannot read PINs from a pipe, so the token is initialised
with throwaway PINs on its command line and the real PINs are set through
PKCS#11 (C_SetPIN / C_InitPIN) at once; a crash in between is finished by the
next ``init`` from a 0600 ``init.pending`` file. Running ``init`` twice is safe.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from keymgr import errors
from keymgr._files import atomic_write

__all__ = ["LocalToken", "keymgr_home", "LOCAL_TOKEN_LABEL"]

LOCAL_TOKEN_LABEL = "keymgr"


def keymgr_home() -> Path:
    configured = os.environ.get("KEYMGR_HOME")
    if configured:
        return Path(configured).expanduser().resolve()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(data) / "keymgr").resolve()


def _softhsm_module() -> str:
    from keymgr.hsm.discovery import SOFTHSM_CANDIDATES

    for candidate in SOFTHSM_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise errors.ModuleLoadError("SoftHSM2 is not installed (apt-get install softhsm2, or run scripts/setup.sh)")


@dataclass(frozen=True)
class LocalToken:
    """Paths and URI of the embedded default token."""

    home: Path

    @classmethod
    def default(cls) -> LocalToken:
        return cls(keymgr_home())

    @property
    def conf_path(self) -> Path:
        return self.home / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.home / "tokens"

    @property
    def pin_path(self) -> Path:
        return self.home / "user.pin"

    @property
    def so_pin_path(self) -> Path:
        return self.home / "so.pin"

    @property
    def pending_path(self) -> Path:
        return self.home / "init.pending"

    def uri(self) -> str:
        from keymgr.hsm.uri import Pkcs11Uri

        return Pkcs11Uri(token=LOCAL_TOKEN_LABEL, module_path=_softhsm_module(),
                         pin_source=f"file:{self.pin_path}").format()

    def activate(self) -> None:
        """Point SoftHSM at this token's configuration before the module is loaded."""
        if not self.conf_path.is_file():
            raise errors.TokenNotFoundError(
                f"the local token is not initialised (no {self.conf_path}); run `keymgr init`")
        from keymgr.hsm.modules import loaded_modules

        wanted = str(self.conf_path)
        current = os.environ.get("SOFTHSM2_CONF")
        softhsm_loaded = any("softhsm" in m.path for m in loaded_modules())
        if current != wanted and softhsm_loaded:
            raise errors.ConfigurationError(
                "SoftHSM was already loaded in this process with another SOFTHSM2_CONF; "
                "open the local token before any other SoftHSM token, or pass a token URI")
        os.environ["SOFTHSM2_CONF"] = wanted

    def is_initialised(self) -> bool:
        return self.conf_path.is_file() and self.pin_path.is_file() and not self.pending_path.exists() \
            and any(self.token_dir.glob("*/token.object"))

    def init(self, pin: str | None = None) -> bool:
        """Create the token (idempotent). Returns True if it was created now."""
        if self.is_initialised():
            return False
        util = shutil.which("softhsm2-util")
        if util is None:
            raise errors.ModuleLoadError("softhsm2-util is not installed (apt-get install softhsm2)")
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.home, 0o700)
        self.token_dir.mkdir(exist_ok=True, mode=0o700)
        atomic_write(self.conf_path, (f"directories.tokendir = {self.token_dir}\n"
                                      "objectstore.backend = file\nlog.level = ERROR\n"
                                      "slots.removable = false\n").encode(), mode=0o600)
        if not self.pin_path.is_file():
            atomic_write(self.pin_path, ((pin or secrets.token_urlsafe(18)) + "\n").encode(), mode=0o600)
            atomic_write(self.so_pin_path, (secrets.token_urlsafe(18) + "\n").encode(), mode=0o600)
        env = {**os.environ, "SOFTHSM2_CONF": str(self.conf_path)}
        if not any(self.token_dir.glob("*/token.object")):
            temp_so, temp_user = secrets.token_hex(8), secrets.token_hex(8)
            atomic_write(self.pending_path, f"{temp_so}\n{temp_user}\n".encode(), mode=0o600)
            result = subprocess.run(
                [util, "--init-token", "--free", "--label", LOCAL_TOKEN_LABEL, "--so-pin", temp_so,
                 "--pin", temp_user], env=env, capture_output=True, text=True, timeout=60, check=False)
            if result.returncode != 0:
                raise errors.TokenError(f"softhsm2-util could not create the local token: "
                                        f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")
        if self.pending_path.exists():
            self._set_real_pins()
        return True

    def _set_real_pins(self) -> None:
        from keymgr.hsm.admin import set_initial_pins

        temp_so, _temp_user = self.pending_path.read_text().split()
        self.activate()
        set_initial_pins(_softhsm_module(), LOCAL_TOKEN_LABEL, temp_so_pin=temp_so,
                         so_pin=self.so_pin_path.read_text().splitlines()[0],
                         user_pin=self.pin_path.read_text().splitlines()[0])
        self.pending_path.unlink()
