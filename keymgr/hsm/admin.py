"""Security-officer operations: setting PINs on a freshly initialised token."""

from __future__ import annotations

import pkcs11.exceptions as p11x

from keymgr.hsm._errors import translating
from keymgr.hsm.modules import load_module

__all__ = ["set_initial_pins"]


def set_initial_pins(module_path: str, token_label: str, *, temp_so_pin: str, so_pin: str, user_pin: str) -> None:
    """Replace the throwaway SO PIN with ``so_pin`` and set the user PIN (C_SetPIN, C_InitPIN).

    Safe to repeat: if the SO PIN was already changed, ``so_pin`` logs in.
    """
    module = load_module(module_path)
    with module.lock, translating("set initial PINs", token_label):
        module.reinitialize()  # re-read a token directory another program just wrote
        token = module.lib.get_token(token_label=token_label)
        try:
            session = token.open(rw=True, so_pin=temp_so_pin)
            current = temp_so_pin
        except p11x.PinIncorrect:
            session = token.open(rw=True, so_pin=so_pin)
            current = so_pin
        try:
            session.init_pin(user_pin)
            if current != so_pin:
                session.set_pin(current, so_pin)
        finally:
            session.close()
