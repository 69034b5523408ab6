"""The software TPM 2.0 token for the test suite, driven by ``scripts/tpm2-token.sh``.

swtpm + tpm2-abrmd + tpm2-pkcs11 give a second, real PKCS#11 implementation
next to SoftHSM: token ``keymgr-tpm`` (user PIN ``1234``, SO PIN ``sopin1234``)
holding ``rsa-kek`` (RSA-2048, CKA_ID ``b"01"``) and ``ec-kek`` (P-256,
CKA_ID ``b"02"``). Wrong PINs count against the TPM's dictionary-attack
counter: after ``da_max_tries`` of them the token answers ``PIN_LOCKED`` even
to the right PIN until ``unlock_tpm()`` (or one try is forgiven every
``da_recovery_s`` seconds).

Usage from a fixture::

    tpm = ensure_tpm_token(state_dir)      # starts everything; raises TpmSetupError
    os.environ.update(tpm.env)             # BEFORE pkcs11.lib(tpm.module_path)
    lib = pkcs11.lib(tpm.module_path)

``tpm.env`` must be in ``os.environ`` before the module is first loaded in the
process: tpm2-pkcs11 reads ``TPM2_PKCS11_STORE`` / ``TPM2_PKCS11_TCTI`` when it
is initialised, and GLib reads ``DBUS_SESSION_BUS_ADDRESS`` when it first
connects to the bus. python-pkcs11 keeps one instance per module path, so one
process can use one TPM state directory only.

Failing versus skipping -- the ``KEYMGR_REQUIRE_TPM=1`` convention: this module
never skips and never decides. ``ensure_tpm_token`` returns ``None`` only where
the TPM stack cannot exist at all (not Linux); every other failure raises
``TpmSetupError`` carrying the script's output. The caller (``tests/conftest.py``)
may turn either into a skip on a developer machine, but when
``KEYMGR_REQUIRE_TPM=1`` (CI, ``scripts/test.sh``) both must fail the run, so a
broken TPM setup can never pass as "skipped". ``tpm_required()`` reads it.

What the token does (tpm2-pkcs11 1.9.0 on swtpm 0.7.1, python-pkcs11 0.10.1):

- Two slots: the token, plus an empty uninitialised one (slot 2): find it by label.
- Wrong user PIN: ``PinIncorrect`` for tries 1..``da_max_tries``, then ``PinLocked``,
  also for the right PIN. The token flags never change (no USER_PIN_COUNT_LOW,
  USER_PIN_FINAL_TRY or USER_PIN_LOCKED): only the TPM's lockout counter knows.
  tpm2-pkcs11 prints ``ERROR: ...`` lines to stderr on each wrong PIN.
- Token removal: ``stop_tpm`` stops the daemons in an orderly way (TPM2_Shutdown
  first: no wrong-PIN penalty); ``start_tpm`` brings the same token and objects
  back and clears the wrong-PIN counter. While stopped, a process that had the
  token open gets ``GeneralError`` from every call that reaches the TPM (sign,
  decrypt, login), while ``get_slots``/``get_token`` still list the token and a
  session without login still opens (the token list is read at C_Initialize). A
  new process gets ``GeneralError`` from ``pkcs11.lib()`` itself (C_Initialize).
  After ``start_tpm``, the old process keeps getting ``GeneralError`` until
  ``lib.reinitialize()``, which works only if the bus survived
  (``stop_tpm(..., keep_bus=True)``): after a full stop, GLib's connection to the
  old bus is dead for good and ``reinitialize()`` raises ``GeneralError`` (then
  every call: "not initialized"), so only a new process gets the token back.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tpm2-token.sh"
REQUIRE_ENV = "KEYMGR_REQUIRE_TPM"

# Seconds. Setup may apt-get install packages on a fresh machine (~15 s on a good
# mirror); from scratch it takes ~5 s, when already up ~0.6 s.
SETUP_TIMEOUT = 600.0
COMMAND_TIMEOUT = 60.0

# Variables in env.sh that describe the token rather than configure the module.
_FACT_PREFIX = "KEYMGR_TPM_"


class TpmSetupError(RuntimeError):
    """A tpm2-token.sh command failed or timed out; ``output`` is what it printed."""

    def __init__(self, command: str, reason: str, output: str) -> None:
        self.command = command
        self.reason = reason
        self.output = output
        super().__init__(f"scripts/tpm2-token.sh {command}: {reason}\n{output.rstrip()}")


@dataclass(frozen=True)
class TpmToken:
    """The TPM token as set up by ``ensure_tpm_token``."""

    module_path: str
    token_label: str
    user_pin: str
    so_pin: str
    # What to put into os.environ before the module is loaded (see module docstring).
    env: dict[str, str] = field(hash=False)
    state_dir: Path
    rsa_label: str = "rsa-kek"
    ec_label: str = "ec-kek"
    da_max_tries: int = 3  # wrong PINs before PIN_LOCKED
    da_recovery_s: int = 10  # one wrong PIN forgiven per this many seconds


def tpm_required() -> bool:
    """True when a TPM that cannot be set up must fail the run (``KEYMGR_REQUIRE_TPM=1``)."""
    return os.environ.get(REQUIRE_ENV) == "1"


def ensure_tpm_token(state_dir: Path | str, *, timeout: float = SETUP_TIMEOUT) -> TpmToken | None:
    """Install (if needed), start and set up the TPM token in ``state_dir``.

    Idempotent and safe after a crash (stale pid files, killed daemons): it runs
    ``tpm2-token.sh setup``, which also clears any wrong-PIN lockout.
    Returns ``None`` only on platforms without the TPM stack (not Linux);
    raises ``TpmSetupError`` (with the script's output) on any failure.
    """
    if not sys.platform.startswith("linux"):
        return None
    state_dir = Path(state_dir)
    _run("setup", state_dir, timeout)
    values = read_env_file(state_dir / "env.sh")
    try:
        token = TpmToken(
            module_path=values[f"{_FACT_PREFIX}MODULE"],
            token_label=values[f"{_FACT_PREFIX}TOKEN_LABEL"],
            user_pin=values[f"{_FACT_PREFIX}USER_PIN"],
            so_pin=values[f"{_FACT_PREFIX}SO_PIN"],
            env={k: v for k, v in values.items() if not k.startswith(_FACT_PREFIX)},
            state_dir=state_dir,
            rsa_label=values[f"{_FACT_PREFIX}RSA_LABEL"],
            ec_label=values[f"{_FACT_PREFIX}EC_LABEL"],
            da_max_tries=int(values[f"{_FACT_PREFIX}DA_MAX_TRIES"]),
            da_recovery_s=int(values[f"{_FACT_PREFIX}DA_RECOVERY_S"]),
        )
    except (KeyError, ValueError) as exc:
        raise TpmSetupError("setup", f"incomplete {state_dir / 'env.sh'}: {exc!r}", "") from exc
    if not os.path.isfile(token.module_path):
        raise TpmSetupError("setup", f"PKCS#11 module {token.module_path} is missing", "")
    return token


def stop_tpm(state_dir: Path | str, *, keep_bus: bool = False, timeout: float = COMMAND_TIMEOUT) -> None:
    """Remove the token: orderly TPM2_Shutdown, then stop tpm2-abrmd, dbus-daemon, swtpm.

    ``keep_bus=True`` leaves the private dbus-daemon running: use it when this
    process has loaded the module and must use the token again after
    ``start_tpm`` (by ``lib.reinitialize()``); see the module docstring.
    """
    _run("stop --keep-bus" if keep_bus else "stop", Path(state_dir), timeout)


def start_tpm(state_dir: Path | str, *, timeout: float = COMMAND_TIMEOUT) -> None:
    """Bring the token back after ``stop_tpm`` (same objects; wrong-PIN counter cleared)."""
    _run("start", Path(state_dir), timeout)


def unlock_tpm(state_dir: Path | str, *, timeout: float = COMMAND_TIMEOUT) -> None:
    """Clear the TPM's dictionary-attack lockout, i.e. forget all wrong PINs, at once."""
    _run("unlock", Path(state_dir), timeout)


def lockout_counter(state_dir: Path | str, *, timeout: float = COMMAND_TIMEOUT) -> int:
    """The TPM's dictionary-attack counter (TPM2_PT_LOCKOUT_COUNTER): wrong PINs not yet
    forgiven. The token's flags never show it, so tests read it from the TPM itself."""
    for line in _run("status", Path(state_dir), timeout).splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "TPM2_PT_LOCKOUT_COUNTER":
            return int(value.strip(), 0)
    raise TpmSetupError("status", "no TPM2_PT_LOCKOUT_COUNTER line", "")


def reset_tpm(state_dir: Path | str, *, timeout: float = COMMAND_TIMEOUT) -> None:
    """Stop everything and delete ``state_dir`` (for the end of a test run)."""
    _run("reset", Path(state_dir), timeout)


def read_env_file(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines of an env.sh written by tpm2-token.sh."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            values[name] = value
    return values


def _run(command: str, state_dir: Path, timeout: float) -> str:
    """Run ``tpm2-token.sh command`` for ``state_dir``; its combined output, or TpmSetupError.

    The script runs in a session of its own so that a timeout kills it and the
    tools it is waiting for, not the daemons (they detach into sessions of
    their own) and not us.
    """
    env = {**os.environ, "KEYMGR_TPM_DIR": str(state_dir)}
    try:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), *command.split()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise TpmSetupError(command, f"cannot run bash: {exc}", "") from exc
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TpmSetupError(command, f"timed out after {timeout:g} s", output or "") from None
    if proc.returncode != 0:
        raise TpmSetupError(command, f"exit status {proc.returncode}", output)
    return output
