"""PINs: where they come from, and how they are kept out of sight.

A PIN reaches keymgr from one of four places, in this order of preference:

* ``pin-source=file:/path`` (RFC 7512 section 2.3; a bare absolute path is
  accepted too): the first line of a file, which should be mode 0600;
* ``pin-source=env:VAR``: an environment variable (keymgr's extension, for CI);
* ``pin-value=...`` in the URI: convenient in tests, discouraged elsewhere;
* a :data:`PinCallback`: an interactive prompt (no echo) or a GUI dialog.

The :class:`Pin` wrapper never shows its value in ``repr``/``str``, refuses
pickling and can be wiped. keymgr never retries a PIN by itself: a wrong PIN
is reported once, with the token's tries-left state, and the caller decides.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keymgr import errors
from keymgr._memory import zero

__all__ = ["Pin", "PinRequest", "PinCallback", "PinSource", "prompt_pin", "pin_source_from_uri", "tries_left_note"]


class Pin:
    """A PIN held in a wipeable buffer; never printed, never pickled."""

    __slots__ = ("_buf",)

    def __init__(self, value: str | bytes | bytearray) -> None:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if not raw:
            raise errors.AuthenticationError("an empty PIN was given")
        self._buf = bytearray(raw)

    def reveal(self) -> str:
        """The PIN as text, for the one call (C_Login) that needs it."""
        return self._buf.decode("utf-8")

    def wipe(self) -> None:
        zero(self._buf)
        self._buf = bytearray()

    def __repr__(self) -> str:
        return "Pin(***)"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("a Pin cannot be pickled")


@dataclass(frozen=True)
class PinRequest:
    """What a PIN callback is told: which token, why, and what the token reports."""

    token_label: str
    reason: str = "login"  # "login" or "context-specific" (CKA_ALWAYS_AUTHENTICATE)
    tries_left: str = "unknown"  # "unknown", "count-low", "final-try"
    user: str = "user"  # "user" or "so"


#: A function that returns a PIN for a request, or None to cancel.
PinCallback = Callable[[PinRequest], "str | None"]

#: What a token's PIN-counter flags say, in words that claim no more than the flags do: PKCS#11
#: reports states, never a count (SoftHSM sets CKF_USER_PIN_COUNT_LOW after any one wrong PIN).
_TRIES_LEFT_NOTES = {"final-try": "the token reports one try left before the PIN locks",
                     "count-low": "the token reports few tries left",
                     "unknown": "the token does not report tries left"}


def tries_left_note(state: str) -> str:
    """The token's tries-left ``state`` (:func:`keymgr.hsm.sessions.tries_left_state`) as a phrase."""
    return _TRIES_LEFT_NOTES.get(state, _TRIES_LEFT_NOTES["unknown"])


def prompt_pin(request: PinRequest) -> str | None:
    """Default callback: ask on the terminal without echo; None when there is no terminal."""
    if not sys.stdin.isatty():
        return None
    warning = f" [{tries_left_note(request.tries_left)}]" if request.tries_left in ("final-try", "count-low") else ""
    what = "SO PIN" if request.user == "so" else "PIN"
    return getpass.getpass(f"{what} for token {request.token_label!r}{warning}: ")


@dataclass(frozen=True)
class PinSource:
    """Where a token's PIN comes from. Holds a location, not the PIN itself,
    except for ``pin-value`` URIs (whose value is hidden from repr)."""

    kind: str  # "file", "env", "value", "callback", "protected"
    location: str = ""
    _value: str | None = None

    def __repr__(self) -> str:
        shown = "***" if self.kind == "value" else self.location
        return f"PinSource({self.kind}:{shown})"

    __str__ = __repr__

    def read(self, request: PinRequest, callback: PinCallback | None = None) -> Pin | None:
        """Produce the PIN, or None for protected-path / no PIN available."""
        if self.kind == "value":
            return Pin(self._value or "")
        if self.kind == "file":
            return Pin(_read_pin_file(Path(self.location)))
        if self.kind == "env":
            value = os.environ.get(self.location)
            if not value:
                raise errors.AuthenticationError(f"environment variable {self.location} holds no PIN")
            return Pin(value)
        if self.kind == "protected":
            return None
        answer = (callback or prompt_pin)(request)
        if answer is None:
            raise errors.AuthenticationError(
                f"a PIN is needed for token {request.token_label!r} and none was given "
                "(use pin-source=file:... or env:VAR in the token URI, KEYMGR_PIN for the local token, "
                "or run at a terminal)"
            )
        return Pin(answer)


def _read_pin_file(path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.ConfigurationError(f"cannot read PIN file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise errors.ConfigurationError(f"PIN file {path} is readable by others; chmod 600 it")
    pin = text.splitlines()[0] if text else ""
    if not pin:
        raise errors.ConfigurationError(f"PIN file {path} is empty")
    return pin


def pin_source_from_uri(pin_source: str | None, pin_value: str | None) -> PinSource:
    """Turn a URI's ``pin-source`` / ``pin-value`` into a :class:`PinSource`."""
    if pin_value is not None:
        return PinSource("value", _value=pin_value)
    if pin_source is None:
        return PinSource("callback")
    if pin_source.startswith("file:"):
        location = pin_source[len("file:") :]
        if location.startswith("//"):
            location = location[2:]
        return PinSource("file", location)
    if pin_source.startswith("env:"):
        return PinSource("env", pin_source[len("env:") :])
    if pin_source == "protected":
        return PinSource("protected")
    if pin_source.startswith("/"):
        return PinSource("file", pin_source)
    raise errors.ConfigurationError(
        "unsupported pin-source (use file:/path, env:VAR or protected)"
    )
