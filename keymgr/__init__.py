"""keymgr: encryption keys kept in hardware, and safe envelope encryption on top.

The safe API is :class:`KeyManager` and the error tree in :mod:`keymgr.errors`.
:mod:`keymgr.hsm` is the PKCS#11 layer underneath (the hazmat). The folders of
``keymgr/`` are its layers, each importing only those below it (README.md,
"Layout"; tests/test_layers.py keeps it so).
"""

from typing import TYPE_CHECKING, Any

from keymgr import errors as _errors
from keymgr.errors import *  # noqa: F403 - every error class: ``except keymgr.PolicyError``

if TYPE_CHECKING:
    from keymgr.custody.facade import Custody as Custody
    from keymgr.keyring.store import KeyPolicy as KeyPolicy
    from keymgr.keyring.store import KeyRecord as KeyRecord
    from keymgr.keyring.store import KeyVersion as KeyVersion
    from keymgr.manager import KeyManager as KeyManager
    from keymgr.manager import TokenInfo as TokenInfo

__version__ = "0.1.0"

#: Loaded on first use (PEP 562): ``import keymgr`` alone (the CLI's ``--help``, a program that
#: only catches keymgr's errors) does not pay for python-pkcs11 and the token layer.
_LAZY = {"KeyManager": "keymgr.manager", "TokenInfo": "keymgr.manager", "Custody": "keymgr.custody.facade",
         "KeyPolicy": "keymgr.keyring.store", "KeyRecord": "keymgr.keyring.store", "KeyVersion": "keymgr.keyring.store"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keymgr' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

#: The error classes and the lazily loaded API, derived rather than copied.
__all__ = sorted([*_errors.__all__, *_LAZY])
