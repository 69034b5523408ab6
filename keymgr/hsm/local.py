"""The embedded default token: a SoftHSM2 token of keymgr's own.

``keymgr init`` creates it under ``$KEYMGR_HOME`` (default
``$XDG_DATA_HOME/keymgr``, i.e. ``~/.local/share/keymgr``), with its own
``softhsm2.conf`` and token directory, never the system token directory, so
it cannot collide with other SoftHSM users on the machine. Its URI carries
``softhsm2-conf=`` (:data:`~keymgr.hsm.modules.SOFTHSM_CONF_ATTR`), so the URI
works as printed wherever a token URI is taken.

PINs, and where they are kept:

* the user PIN is generated and kept in a 0600 file that the URI names with
  ``pin-source=file:...``; or, chosen at a prompt (``--prompt-pin``), kept
  nowhere: later commands ask for it at a terminal or read ``KEYMGR_PIN``;
* the SO PIN is generated and handed back once (``keymgr init`` shows it once)
  and not kept, because whoever holds both PINs can export backup-capable keys
  (docs/security.md); ``keep_so_pin`` keeps it beside the user PIN (0600) for
  a development machine; a prompted one is never shown.

``softhsm2-util`` cannot read PINs from a pipe, so the token is initialised
with throwaway PINs on its command line and the real PINs are set through
PKCS#11 (C_InitPIN, C_SetPIN) at once; a crash in between is finished by the
next ``init`` from a 0600 ``init.pending`` file, which for those seconds also
holds the new SO PIN when keymgr generated it (so a crash after C_SetPIN cannot
lock the SO out). A PIN someone typed is never written to disk, not even there:
after such a crash, ``init --prompt-pin`` again, with the same SO PIN, finishes.
Running ``init`` twice is safe.

PIN lengths are checked against the token's own limits (ulMinPinLen,
ulMaxPinLen; SoftHSM: 4 to 255) before anything is set (:meth:`LocalToken.pin_limits`):
the token would refuse a short PIN only halfway, as a misleading "PIN incorrect".
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from keymgr import errors
from keymgr.files import atomic_write
from keymgr.hsm.pins import Pin

__all__ = ["LocalToken", "InitResult", "keymgr_home", "LOCAL_TOKEN_LABEL", "PIN_ENV_VAR"]

LOCAL_TOKEN_LABEL = "keymgr"
#: SoftHSM's PIN length limits (MIN_PIN_LEN, MAX_PIN_LEN), where pkcs11-tool cannot read the token's
_SOFTHSM_MIN_PIN, _SOFTHSM_MAX_PIN = 4, 255
#: Where the local token's user PIN comes from when no PIN file is kept (``init --prompt-pin``).
PIN_ENV_VAR = "KEYMGR_PIN"


@dataclass(frozen=True)
class InitResult:
    """What :meth:`LocalToken.init` did. True when the token was created now, so that
    ``if local.init():`` reads as it did when ``init`` returned a bool."""

    created: bool
    #: The generated SO PIN, not kept anywhere: to be shown once (None when kept or given).
    so_pin: Pin | None = None

    def __bool__(self) -> bool:
        return self.created


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

    @property
    def pin_kept(self) -> bool:
        """Whether the user PIN is kept on disk (False after ``init --prompt-pin``)."""
        return self.pin_path.is_file()

    def uri(self) -> str:
        """The token's URI: works as printed (``softhsm2-conf=``); its PIN from the PIN file,
        else from ``$KEYMGR_PIN`` when set, else from a prompt."""
        from keymgr.hsm.modules import SOFTHSM_CONF_ATTR
        from keymgr.hsm.uri import Pkcs11Uri

        pin_source = f"file:{self.pin_path}" if self.pin_kept else (
            f"env:{PIN_ENV_VAR}" if os.environ.get(PIN_ENV_VAR) else None)
        return Pkcs11Uri(token=LOCAL_TOKEN_LABEL, module_path=_softhsm_module(), pin_source=pin_source,
                         vendor_query=((SOFTHSM_CONF_ATTR, str(self.conf_path)),)).format()

    def is_named_by(self, uri: str) -> bool:
        """Whether ``uri`` names this token (its label and its ``softhsm2-conf=``), e.g. the URI
        ``keymgr init`` printed, given back with ``--token``: it is then the local token."""
        from keymgr.hsm.modules import SOFTHSM_CONF_ATTR
        from keymgr.hsm.uri import Pkcs11Uri

        try:
            parsed = Pkcs11Uri.parse(uri)
        except errors.UriError:
            return False
        confs = [Path(v).resolve() for n, v in parsed.vendor_query if n == SOFTHSM_CONF_ATTR]
        return parsed.token == LOCAL_TOKEN_LABEL and confs == [self.conf_path.resolve()]

    def activate(self) -> None:
        """Point SoftHSM at this token's configuration before the module is loaded."""
        if not self.conf_path.is_file():
            raise errors.TokenNotFoundError(
                f"the local token is not initialised (no {self.conf_path}); run `keymgr init`")
        from keymgr.hsm.modules import use_softhsm_config

        use_softhsm_config(str(self.conf_path))

    def is_initialised(self) -> bool:
        return self.conf_path.is_file() and not self.pending_path.exists() \
            and any(self.token_dir.glob("*/token.object"))

    def init(self, pin: str | None = None, *, so_pin: str | None = None, keep_so_pin: bool = False) -> InitResult:
        """Create the token (idempotent): see the module docstring for where the PINs go.

        ``pin``: the user PIN, kept nowhere (None: generate one into the PIN file).
        ``so_pin``: the SO PIN (None: generate one, returned once in the result unless
        ``keep_so_pin``, which keeps it in a 0600 file beside the user PIN). A PIN outside the
        token's length limits is refused (ConfigurationError) before any PIN is set."""
        if self.is_initialised():
            return InitResult(False)
        self._create_token()
        if pin is not None or so_pin is not None:
            low, high = self.pin_limits()
            for what, given in (("user PIN", pin), ("SO PIN", so_pin)):
                if given is not None and not low <= len(given) <= high:
                    raise errors.ConfigurationError(
                        f"the {what} must have {low} to {high} characters (the token's limits); no PIN was set: "
                        "run `keymgr init` again")
        shown = None
        if self.pending_path.exists():
            try:
                shown = self._set_real_pins(pin, so_pin, keep_so_pin)
            except errors.KeymgrError as exc:
                raise errors.TokenError(f"the local token could not be initialised ({exc}); it is left "
                                        f"half-initialised in {self.home} (its PINs not all set; no typed PIN was "
                                        "written anywhere): run `keymgr init` again to finish it") from None
        return InitResult(True, shown)

    def pin_limits(self) -> tuple[int, int]:
        """The token's shortest and longest PIN (ulMinPinLen, ulMaxPinLen), creating the token
        (with throwaway PINs, finished by :meth:`init`) if need be: an uninitialised token shows
        none. Read with ``pkcs11-tool`` (OpenSC); SoftHSM's own limits, 4 and 255, where it is absent."""
        self._create_token()
        tool = shutil.which("pkcs11-tool")
        if tool is not None:
            result = subprocess.run([tool, "--module", _softhsm_module(), "-L"], capture_output=True, text=True,
                                    timeout=60, check=False, env={**os.environ, "SOFTHSM2_CONF": str(self.conf_path)})
            for block in result.stdout.split("\nSlot ")[1:]:
                found = re.search(r"pin min/max\s*:\s*(\d+)/(\d+)", block)
                if found and re.search(rf"token label\s*:\s*{LOCAL_TOKEN_LABEL}\s*$", block, re.MULTILINE):
                    return int(found.group(1)), int(found.group(2))
        return _SOFTHSM_MIN_PIN, _SOFTHSM_MAX_PIN

    def _create_token(self) -> None:
        """The token directory, its configuration, and the token with throwaway PINs (once)."""
        util = shutil.which("softhsm2-util")
        if util is None:
            raise errors.ModuleLoadError("softhsm2-util is not installed (apt-get install softhsm2)")
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.home, 0o700)
        self.token_dir.mkdir(exist_ok=True, mode=0o700)
        atomic_write(self.conf_path, (f"directories.tokendir = {self.token_dir}\n"
                                      "objectstore.backend = file\nlog.level = ERROR\n"
                                      "slots.removable = false\n").encode(), mode=0o600)
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

    def _user_pin(self, given: str | None) -> str:
        """The user PIN to set: the one given (and no stale PIN file), the kept one, or a new one kept."""
        if given is not None:
            self.pin_path.unlink(missing_ok=True)
            return given
        if self.pin_kept:
            return self.pin_path.read_text().splitlines()[0]
        generated = secrets.token_urlsafe(18)
        atomic_write(self.pin_path, (generated + "\n").encode(), mode=0o600)
        return generated

    def _set_real_pins(self, pin: str | None, so_pin: str | None, keep_so_pin: bool) -> Pin | None:
        """Set the real PINs over the throwaway ones; returns the generated SO PIN to show once."""
        from keymgr.hsm.admin import set_initial_pins

        lines = self.pending_path.read_text().split()
        temp_so, chosen_so = lines[0], so_pin or (lines[2] if len(lines) > 2 else None)
        if chosen_so is None:
            chosen_so = (self.so_pin_path.read_text().splitlines()[0] if self.so_pin_path.is_file()
                         else secrets.token_urlsafe(18))
        if so_pin is None:  # generated: kept there until set, so a crash cannot lock the SO out; a typed one never
            atomic_write(self.pending_path, "\n".join([*lines[:2], chosen_so, ""]).encode(), mode=0o600)
        if keep_so_pin:
            atomic_write(self.so_pin_path, (chosen_so + "\n").encode(), mode=0o600)
        user_pin = self._user_pin(pin)
        self.activate()
        set_initial_pins(_softhsm_module(), LOCAL_TOKEN_LABEL, temp_so_pin=temp_so, so_pin=chosen_so,
                         user_pin=user_pin)
        self.pending_path.unlink()
        return None if so_pin is not None or self.so_pin_path.is_file() else Pin(chosen_so)
