"""keymgr's error tree: every failure a caller can see is one of these.

::

    KeymgrError
    ├── ConfigurationError        bad settings, bad CLI arguments, missing files
    │   └── UriError              a malformed RFC 7512 ``pkcs11:`` URI
    ├── TokenError                the token (or its module) failed
    │   ├── ModuleLoadError       a PKCS#11 module could not be loaded
    │   ├── TokenNotFoundError    no token (or several) matched a URI
    │   ├── TokenRemovedError     the token went away mid-operation
    │   └── MechanismUnsupportedError  the token cannot do what was asked
    ├── AuthenticationError       logging in to a token failed
    │   ├── PinIncorrectError     wrong PIN; carries the token's tries-left state
    │   └── PinLockedError        the PIN is locked; says how to unlock
    ├── KeyNotFoundError          no such key name / version / object
    │   └── RecipientNotFoundError  no recipient of a ciphertext is a key here (also an IntegrityError)
    ├── IntegrityError            a ciphertext, stream, log or file failed authentication
    ├── FormatError               bytes that are not what they claim to be (malformed CMS ...)
    │   └── UnsupportedAlgorithmError  well-formed, but an algorithm keymgr does not accept (named)
    ├── PolicyError               refused by policy: key state, quorum, rate limit, template
    └── StorageError              a file could not be written safely (full disk ...)

Why so few classes: callers act on the category (retry with another PIN,
ask for the token, refuse the data), and every authentication failure of a
ciphertext (tampered, truncated, wrong context, wrong key) is the *same*
``IntegrityError`` so the error itself is no oracle. The two exceptions say
only what anyone can read in the clear: which recipients a message names
(``RecipientNotFoundError``) and which algorithm it asks for
(``UnsupportedAlgorithmError``: RSA PKCS#1 v1.5, an unknown content cipher).

No message ever contains a PIN, key byte, share or plaintext: messages are
built only from names, labels, counts and PKCS#11 return-code names. The
original PKCS#11 exception, where there is one, is kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "FormatError",
    "IntegrityError",
    "KeyNotFoundError",
    "KeymgrError",
    "MechanismUnsupportedError",
    "ModuleLoadError",
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


class KeymgrError(Exception):
    """Root of every error keymgr raises on purpose."""


class ConfigurationError(KeymgrError):
    """Settings, arguments or files given to keymgr are unusable."""


class KeyExistsError(ConfigurationError):
    """A key with that name already exists on the token (``create_key(..., exist_ok=True)``
    returns it instead, when it has the profile asked for)."""


class UriError(ConfigurationError, ValueError):
    """A ``pkcs11:`` URI does not follow RFC 7512."""


class TokenError(KeymgrError):
    """The token or its PKCS#11 module failed."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        #: Name of the PKCS#11 return code behind this error, if any (e.g. ``CKR_DEVICE_ERROR``).
        self.code = code


class ModuleLoadError(TokenError):
    """A PKCS#11 module (shared library) could not be loaded or initialised."""


class TokenNotFoundError(TokenError):
    """No token matched a URI, or more than one did."""


class TokenRemovedError(TokenError):
    """The token was removed (or its service stopped) during an operation."""


class MechanismUnsupportedError(TokenError):
    """The token does not support the mechanism or object an operation needs."""


class AuthenticationError(KeymgrError):
    """Logging in to a token failed."""


class PinIncorrectError(AuthenticationError):
    """The PIN was wrong. ``tries_left`` is the token's own report.

    ``tries_left`` is one of ``"unknown"``, ``"count-low"`` or ``"final-try"``
    (PKCS#11 tokens report states, not numbers: CKF_USER_PIN_COUNT_LOW,
    CKF_USER_PIN_FINAL_TRY).
    """

    def __init__(self, message: str, *, token: str, tries_left: str) -> None:
        super().__init__(message)
        self.token = token
        self.tries_left = tries_left


class PinLockedError(AuthenticationError):
    """The token's PIN is locked; only the SO (or a PUK) can unlock it."""

    def __init__(self, message: str, *, token: str) -> None:
        super().__init__(message)
        self.token = token


class KeyNotFoundError(KeymgrError, LookupError):
    """No key with that name, version or identifier exists on the token."""


class IntegrityError(KeymgrError):
    """Data failed authentication: tampered, truncated, wrong key or wrong context.

    Deliberately one class with one message per kind of object, so that the
    error does not tell an attacker which check failed.
    """


class RecipientNotFoundError(KeyNotFoundError, IntegrityError):
    """None of a ciphertext's recipients names a key of this token: a message for another
    token, or one whose recipients were edited (the two look the same).

    Both a :class:`KeyNotFoundError` (what an operator acts on: use the other site's
    token) and an :class:`IntegrityError` (what a program refusing tampered data
    catches), so that every edited byte of a ciphertext is an ``IntegrityError``.
    Its message differs from the integrity message only by what is public: the
    recipients' key ids are not secret and are compared before any key is used.
    """


class FormatError(KeymgrError, ValueError):
    """Bytes are not a well-formed keymgr / CMS object."""


class UnsupportedAlgorithmError(FormatError):
    """Well-formed bytes that ask for an algorithm keymgr does not accept, named in the message
    (RSA PKCS#1 v1.5 key transport, an unknown content-encryption algorithm, a KDF it lacks).

    Not an :class:`IntegrityError`: the algorithm identifiers of a CMS message are public,
    unauthenticated fields, so naming them tells nobody anything they could not read, while
    "tampered" would send an operator looking for an attacker instead of at the sender's
    settings. ``KeyManager.decrypt`` passes it through unchanged.
    """


class PolicyError(KeymgrError, PermissionError):
    """Refused by policy: key state, missing approvals, rate limit, template rule."""


class StorageError(KeymgrError, OSError):
    """A file could not be written or replaced safely (full disk, permissions)."""


#: Every error class above (and so every one ``keymgr`` exports): derived, so a new class cannot be
#: left out of ``keymgr.__all__``.
__all__ = sorted(name for name, value in list(globals().items())
                 if isinstance(value, type) and issubclass(value, KeymgrError))
