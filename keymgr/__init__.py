"""keymgr: encryption keys kept in hardware, and safe envelope encryption on top.

The safe API is :class:`KeyManager` and the error tree in :mod:`keymgr.errors`.
:mod:`keymgr.hsm` is the PKCS#11 layer underneath (the hazmat).
"""

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
    StorageError,
    TokenError,
    TokenNotFoundError,
    TokenRemovedError,
    UriError,
)
from keymgr.keyring import KeyPolicy, KeyRecord, KeyVersion
from keymgr.manager import KeyManager

__version__ = "0.1.0"

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
    "StorageError",
    "TokenError",
    "TokenNotFoundError",
    "TokenRemovedError",
    "UriError",
]
