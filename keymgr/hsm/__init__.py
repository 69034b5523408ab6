"""keymgr.hsm: the PKCS#11 token layer, the *hazmat* of keymgr.

Everything here speaks PKCS#11: modules, RFC 7512 URIs, sessions, PINs,
objects and capability probes. It is importable, and the rest of keymgr is
built on it, but it makes no policy choices for you: use
:class:`keymgr.KeyManager` unless you know why you need this layer.
This is the only package of keymgr that imports ``pkcs11``.

Also here because everything above builds on them: :mod:`keymgr.hsm.templates`
(the attribute sets keymgr creates keys with, per profile) and
:mod:`keymgr.hsm.local` (the local SoftHSM token ``keymgr`` sets up by itself).
"""

from keymgr.hsm.capabilities import Capabilities, probe
from keymgr.hsm.discovery import FoundToken, find_token, list_tokens, registered_modules
from keymgr.hsm.modules import Module, load_module
from keymgr.hsm.pins import Pin, PinCallback, PinRequest, PinSource
from keymgr.hsm.sessions import TokenSession, close_all, open_token
from keymgr.hsm.uri import Pkcs11Uri

__all__ = [
    "Capabilities",
    "FoundToken",
    "Module",
    "Pin",
    "PinCallback",
    "PinRequest",
    "PinSource",
    "Pkcs11Uri",
    "TokenSession",
    "close_all",
    "find_token",
    "list_tokens",
    "load_module",
    "open_token",
    "probe",
    "registered_modules",
]
