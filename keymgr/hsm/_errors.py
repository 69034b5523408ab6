"""Translate python-pkcs11 exceptions into keymgr's error tree, in one place.

Every call into python-pkcs11 runs inside :func:`translating`, so no raw
``pkcs11`` exception crosses the token layer (STYLE.md, item 2). The original
exception stays reachable as ``__cause__`` for debugging; messages carry only
the operation, the token label and the PKCS#11 return-code name, never data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pkcs11.exceptions as p11x

from keymgr import errors

__all__ = ["code_name", "missing_role", "translate", "translating", "SESSION_LOST", "TOKEN_GONE"]

#: Errors after which the session is unusable but the token is still there.
SESSION_LOST: tuple[type[BaseException], ...] = (
    p11x.SessionHandleInvalid,
    p11x.SessionClosed,
    p11x.UserNotLoggedIn,
)

#: Errors that mean the token (or the service behind it) went away.
TOKEN_GONE: tuple[type[BaseException], ...] = (
    p11x.DeviceRemoved,
    p11x.TokenNotPresent,
    p11x.TokenNotRecognised,
    p11x.SlotIDInvalid,
)

_CKR_NAMES: dict[type[BaseException], str] = {
    p11x.DeviceRemoved: "CKR_DEVICE_REMOVED",
    p11x.TokenNotPresent: "CKR_TOKEN_NOT_PRESENT",
    p11x.TokenNotRecognised: "CKR_TOKEN_NOT_RECOGNIZED",
    p11x.SlotIDInvalid: "CKR_SLOT_ID_INVALID",
    p11x.SessionHandleInvalid: "CKR_SESSION_HANDLE_INVALID",
    p11x.SessionClosed: "CKR_SESSION_CLOSED",
    p11x.UserNotLoggedIn: "CKR_USER_NOT_LOGGED_IN",
    p11x.DeviceError: "CKR_DEVICE_ERROR",
    p11x.DeviceMemory: "CKR_DEVICE_MEMORY",
    p11x.HostMemory: "CKR_HOST_MEMORY",
    p11x.GeneralError: "CKR_GENERAL_ERROR",
    p11x.FunctionFailed: "CKR_FUNCTION_FAILED",
    p11x.MechanismInvalid: "CKR_MECHANISM_INVALID",
    p11x.MechanismParamInvalid: "CKR_MECHANISM_PARAM_INVALID",
    p11x.FunctionNotSupported: "CKR_FUNCTION_NOT_SUPPORTED",
    p11x.ArgumentsBad: "CKR_ARGUMENTS_BAD",
    p11x.KeyTypeInconsistent: "CKR_KEY_TYPE_INCONSISTENT",
    p11x.KeySizeRange: "CKR_KEY_SIZE_RANGE",
    p11x.AttributeTypeInvalid: "CKR_ATTRIBUTE_TYPE_INVALID",
    p11x.AttributeValueInvalid: "CKR_ATTRIBUTE_VALUE_INVALID",
    p11x.AttributeReadOnly: "CKR_ATTRIBUTE_READ_ONLY",
    p11x.AttributeSensitive: "CKR_ATTRIBUTE_SENSITIVE",
    p11x.TemplateIncomplete: "CKR_TEMPLATE_INCOMPLETE",
    p11x.TemplateInconsistent: "CKR_TEMPLATE_INCONSISTENT",
    p11x.KeyUnextractable: "CKR_KEY_UNEXTRACTABLE",
    p11x.KeyNotWrappable: "CKR_KEY_NOT_WRAPPABLE",
    p11x.KeyHandleInvalid: "CKR_KEY_HANDLE_INVALID",
    p11x.ObjectHandleInvalid: "CKR_OBJECT_HANDLE_INVALID",
    p11x.EncryptedDataInvalid: "CKR_ENCRYPTED_DATA_INVALID",
    p11x.EncryptedDataLenRange: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    p11x.WrappedKeyInvalid: "CKR_WRAPPED_KEY_INVALID",
    p11x.WrappedKeyLenRange: "CKR_WRAPPED_KEY_LEN_RANGE",
    p11x.DataInvalid: "CKR_DATA_INVALID",
    p11x.DataLenRange: "CKR_DATA_LEN_RANGE",
    p11x.SignatureInvalid: "CKR_SIGNATURE_INVALID",
    p11x.SignatureLenRange: "CKR_SIGNATURE_LEN_RANGE",
    p11x.PinIncorrect: "CKR_PIN_INCORRECT",
    p11x.PinLocked: "CKR_PIN_LOCKED",
    p11x.PinExpired: "CKR_PIN_EXPIRED",
    p11x.PinInvalid: "CKR_PIN_INVALID",
    p11x.PinLenRange: "CKR_PIN_LEN_RANGE",
    p11x.TokenWriteProtected: "CKR_TOKEN_WRITE_PROTECTED",
    p11x.SessionReadOnly: "CKR_SESSION_READ_ONLY",
    p11x.OperationActive: "CKR_OPERATION_ACTIVE",
    p11x.UserAlreadyLoggedIn: "CKR_USER_ALREADY_LOGGED_IN",
    p11x.UserPinNotInitialized: "CKR_USER_PIN_NOT_INITIALIZED",
    p11x.SessionCount: "CKR_SESSION_COUNT",
}

_INTEGRITY = (
    p11x.EncryptedDataInvalid,
    p11x.EncryptedDataLenRange,
    p11x.WrappedKeyInvalid,
    p11x.WrappedKeyLenRange,
    p11x.SignatureInvalid,
    p11x.SignatureLenRange,
)
_UNSUPPORTED = (
    p11x.MechanismInvalid,
    p11x.MechanismParamInvalid,
    p11x.FunctionNotSupported,
    p11x.KeyTypeInconsistent,
    p11x.KeySizeRange,
    p11x.AttributeTypeInvalid,
    p11x.TemplateIncomplete,
    p11x.TemplateInconsistent,
    p11x.ArgumentsBad,
)
_POLICY = (
    p11x.KeyUnextractable,
    p11x.KeyNotWrappable,
    p11x.AttributeSensitive,
    p11x.AttributeReadOnly,
    p11x.TokenWriteProtected,
    p11x.SessionReadOnly,
)


#: python-pkcs11 gives a key object these methods only if its CKA_* role allows them
#: (STACK-FACTS.md 9): a key used outside its role raises AttributeError, not a PKCS#11 error.
_ROLE_METHODS = {"wrap_key": "wrap", "unwrap_key": "unwrap", "encrypt": "encrypt", "decrypt": "decrypt",
                 "sign": "sign", "verify": "verify", "derive_key": "derive"}


def missing_role(exc: AttributeError, key: object) -> str | None:
    """The role (``"wrap"``, ``"decrypt"``, ...) that ``key`` lacks, when ``exc`` is python-pkcs11
    saying so; None for any other AttributeError (a bug to let through)."""
    return _ROLE_METHODS.get(exc.name or "") if exc.obj is key else None


#: CKR codes python-pkcs11 0.10.1 has no exception class for: it raises a bare PKCS11Error
#: ("Unmapped error code 0x68"). Named here so that errors say which, and mapped like the rest.
_UNMAPPED_CODES = {0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED", 0x1B: "CKR_ACTION_PROHIBITED",
                   0x190: "CKR_CRYPTOKI_NOT_INITIALIZED", 0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED"}
#: ...of which these are the key's attributes refusing the operation (a template doing its job)
_UNMAPPED_POLICY = frozenset({"CKR_KEY_FUNCTION_NOT_PERMITTED", "CKR_ACTION_PROHIBITED"})
_UNMAPPED_MESSAGE = re.compile(r"Unmapped error code 0x([0-9a-fA-F]+)")


def code_name(exc: BaseException) -> str:
    """The CKR_* name behind a python-pkcs11 exception (or its class name)."""
    for cls in type(exc).__mro__:
        if cls in _CKR_NAMES:
            return _CKR_NAMES[cls]
    if type(exc) is p11x.PKCS11Error:
        unmapped = _UNMAPPED_MESSAGE.fullmatch(str(exc))
        if unmapped:
            code = int(unmapped.group(1), 16)
            return _UNMAPPED_CODES.get(code, f"CKR_0x{code:X}")
    return type(exc).__name__


def translate(exc: BaseException, *, operation: str, token: str) -> errors.KeymgrError:
    """Map one python-pkcs11 exception to the keymgr error a caller can act on."""
    code = code_name(exc)
    where = f"{operation} on token {token!r}"
    if isinstance(exc, TOKEN_GONE):
        return errors.TokenRemovedError(f"{where}: the token was removed ({code})", code=code)
    if isinstance(exc, _INTEGRITY):
        return errors.IntegrityError(f"{where}: the token rejected the data as not authentic ({code})")
    if isinstance(exc, _UNSUPPORTED):
        return errors.MechanismUnsupportedError(f"{where}: not supported by this token ({code})", code=code)
    if isinstance(exc, _POLICY) or code in _UNMAPPED_POLICY:
        return errors.PolicyError(f"{where}: refused by the key's attributes ({code})")
    if isinstance(exc, (p11x.KeyHandleInvalid, p11x.ObjectHandleInvalid)):
        return errors.KeyNotFoundError(f"{where}: the key object no longer exists ({code})")
    if isinstance(exc, p11x.PinLocked):
        return errors.PinLockedError(
            f"{where}: the user PIN is locked; the security officer must reset it (SO PIN / PUK)",
            token=token,
        )
    if isinstance(exc, (p11x.PinIncorrect, p11x.PinInvalid, p11x.PinLenRange)):
        return errors.PinIncorrectError(f"{where}: PIN incorrect", token=token, tries_left="unknown")
    return errors.TokenError(f"{where} failed ({code})", code=code)


@contextmanager
def translating(operation: str, token: str) -> Iterator[None]:
    """Run a block of python-pkcs11 calls; re-raise their errors as keymgr errors."""
    try:
        yield
    except errors.KeymgrError:
        raise
    except p11x.PKCS11Error as exc:
        raise translate(exc, operation=operation, token=token) from exc
