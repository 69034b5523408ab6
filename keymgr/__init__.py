"""keymgr: encryption keys kept in hardware, and safe envelope encryption on top.

The safe API is :class:`KeyManager` and the error tree in :mod:`keymgr.errors`.
:mod:`keymgr.hsm` is the PKCS#11 layer underneath (the hazmat).
"""

from typing import TYPE_CHECKING, Any

from keymgr.errors import (
    AuthenticationError,
    ConfigurationError,
    FormatError,
    IntegrityError,
    KeymgrError,
    KeyNotFoundError,
    MechanismUnsupportedError,
    PinIncorrectError,
    PinLockedError,
    PolicyError,
    RecipientNotFoundError,
    StorageError,
    TokenError,
    TokenNotFoundError,
    TokenRemovedError,
    UnsupportedAlgorithmError,
    UriError,
)

if TYPE_CHECKING:
    from keymgr.keyring import KeyPolicy, KeyRecord, KeyVersion
    from keymgr.manager import KeyManager

__version__ = "0.1.0"

#: Loaded on first use (PEP 562): ``import keymgr`` alone (the CLI's ``--help``, a program that
#: only catches keymgr's errors) does not pay for python-pkcs11 and the token layer.
_LAZY = {"KeyManager": "keymgr.manager", "KeyPolicy": "keymgr.keyring", "KeyRecord": "keymgr.keyring",
         "KeyVersion": "keymgr.keyring"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keymgr' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "FormatError",
    "IntegrityError",
    "KeyManager",
    "KeyNotFoundError",
    "KeyPolicy",
    "KeyRecord",
    "KeyVersion",
    "KeymgrError",
    "MechanismUnsupportedError",
    "PinIncorrectError",
    "PinLockedError",
    "PolicyError",
    "RecipientNotFoundError",
    "StorageError",
    "TokenError",
    "TokenNotFoundError",
    "TokenRemovedError",
    "UnsupportedAlgorithmError",
    "UriError",
]
