"""Trusted transport keys: the only way a long-term key leaves a token, and comes back.

Backup (DESIGN.md, "Key templates"; Clulow 2003): a key that may be backed
up is SENSITIVE, EXTRACTABLE and WRAP_WITH_TRUSTED, so C_WrapKey accepts
only a wrapping key marked CKA_TRUSTED, and only the security officer can
set that attribute. :func:`export_wrapped` therefore runs a short SO step:

1. the process's user session is closed (this logs the process out: login
   state is per application, STACK-FACTS.md 2);
2. an *anchor* session is opened without login, the SO logs in on a second
   session, and the anchor creates the transport key (a public session
   object: an SO session cannot create private objects) with TRUSTED set;
3. the SO logs out; the anchor session, and with it the transport key,
   survives; the user logs in again (the PIN the session remembered);
4. each key is wrapped under the transport key (AES-KW, RFC 3394 / 5649);
5. the transport key is destroyed and the anchor closed, always.

Measured on SoftHSM 2.6.1: the user cannot create a TRUSTED key
(CKR_ATTRIBUTE_READ_ONLY); an untrusted key cannot wrap a WRAP_WITH_TRUSTED
key (CKR_KEY_NOT_WRAPPABLE); the SO cannot create a private object
(CKR_USER_NOT_LOGGED_IN); a public session object survives the SO's logout.

Restore: :func:`import_unwrapped` makes the transport key a private,
unwrap-only session object on the target and unwraps each key into a token
object with the target template (non-extractable). SoftHSM checks
CKA_MODIFIABLE while it applies an unwrap template, so MODIFIABLE=false must
come last or the unwrap fails with CKR_ATTRIBUTE_READ_ONLY *and leaves the
half-made token object behind*; any failure here destroys every object the
call created (found by CKA_ID), so the target is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from keymgr import errors
from keymgr.hsm._errors import translate
from keymgr.hsm.objects import WRAP_MECHANISMS
from keymgr.hsm.pins import Pin
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import TRANSPORT_EXPORT, TRANSPORT_IMPORT, KeyTemplate

__all__ = ["ImportItem", "export_wrapped", "import_unwrapped", "key_ids_present"]


def _ordered(template: KeyTemplate, **extra: Any) -> dict[Attribute, Any]:
    """The template as CKA_* pairs, MODIFIABLE last (see the module docstring)."""
    attrs: dict[Attribute, Any] = {Attribute[n]: v for n, v in template.attributes.items() if n != "MODIFIABLE"}
    attrs.pop(Attribute.TOKEN, None)
    attrs.update({Attribute[n]: v for n, v in extra.items()})
    if "MODIFIABLE" in template.attributes:
        attrs[Attribute.MODIFIABLE] = template.attributes["MODIFIABLE"]
    return attrs


def _secret(template: KeyTemplate, value: bytes | bytearray) -> dict[Attribute, Any]:
    attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
             Attribute.TOKEN: bool(template.attributes.get("TOKEN", False)), Attribute.VALUE: bytes(value)}
    attrs.update(_ordered(template, LABEL="keymgr/transport"))
    return attrs


def _so_login_error(exc: BaseException, label: str) -> errors.KeymgrError:
    if isinstance(exc, (p11x.PinIncorrect, p11x.PinInvalid, p11x.PinLenRange)):
        return errors.PinIncorrectError(f"wrong SO PIN for token {label!r}; keymgr did not retry",
                                        token=label, tries_left="unknown")
    if isinstance(exc, p11x.PinLocked):
        return errors.PinLockedError(f"the SO PIN of token {label!r} is locked", token=label)
    if isinstance(exc, (p11x.AnotherUserAlreadyLoggedIn, p11x.UserAlreadyLoggedIn)):
        return errors.TokenError(f"token {label!r}: another session of this process is still logged in; "
                                 "close it before a backup")
    return translate(exc, operation="SO login to mark the transport key trusted", token=label)


def export_wrapped(ts: TokenSession, key_ids: Sequence[bytes], transport: bytes | bytearray, *, so_pin: Pin,
                   mechanism: str = "aes-kw") -> list[bytes]:
    """Wrap each key (by CKA_ID) under a one-time trusted transport key of value ``transport``.

    The SO PIN is used once, to mark the transport key trusted, and wiped by the
    caller. Keys that are not extractable raise :class:`~keymgr.errors.PolicyError`.
    """
    mech = Mechanism(WRAP_MECHANISMS[mechanism])
    with ts.module.lock:
        ts._drop_session()  # noqa: SLF001 - same package: the user must log out for the SO step
        token = ts.found.token
        try:
            anchor = token.open(rw=True)
        except p11x.PKCS11Error as exc:
            raise translate(exc, operation="open session", token=ts.label) from exc
        try:
            try:
                so = token.open(rw=True, so_pin=so_pin.reveal())
            except p11x.PKCS11Error as exc:
                raise _so_login_error(exc, ts.label) from exc
            try:
                key: Any = anchor.create_object(_secret(TRANSPORT_EXPORT, transport))
            except p11x.PKCS11Error as exc:
                raise translate(exc, operation="create trusted transport key", token=ts.label) from exc
            finally:
                so.close()

            def wrap(session: pkcs11.Session) -> list[bytes]:
                out = []
                for key_id in key_ids:
                    found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id}))
                    if len(found) != 1:
                        raise errors.KeyNotFoundError(f"no single key object with id {key_id.hex()} "
                                                      f"on token {ts.label!r}")
                    out.append(bytes(key.wrap_key(found[0], mechanism=mech)))
                return out

            try:
                return ts.run("wrap keys under the transport key", wrap)
            finally:
                with contextlib.suppress(p11x.PKCS11Error):  # closing the anchor destroys it anyway
                    key.destroy()
        finally:
            with contextlib.suppress(p11x.PKCS11Error):
                anchor.close()


@dataclass(frozen=True)
class ImportItem:
    """One key to unwrap into the target token."""

    key_id: bytes
    label: str
    template: KeyTemplate
    wrapped: bytes = field(repr=False)


def key_ids_present(ts: TokenSession, key_ids: Sequence[bytes]) -> list[bytes]:
    """Which of ``key_ids`` already name an object on the token."""

    def call(session: pkcs11.Session) -> list[bytes]:
        return [k for k in key_ids if list(session.get_objects({Attribute.ID: k}))]

    return ts.run("look up key ids", call)


def import_unwrapped(ts: TokenSession, transport: bytes | bytearray, items: Sequence[ImportItem], *,
                     mechanism: str = "aes-kw") -> dict[bytes, str | None]:
    """Unwrap every item into a token object; all or nothing. Returns each CKA_ID's key check value.

    The transport key is a private session object, destroyed before returning;
    on any failure every object this call created is destroyed too.
    """
    mech = Mechanism(WRAP_MECHANISMS[mechanism])
    ids = [item.key_id for item in items]
    if len(set(ids)) != len(ids):
        raise errors.FormatError("two keys to restore share a CKA_ID")

    def call(session: pkcs11.Session) -> dict[bytes, str | None]:
        clash = [k.hex() for k in ids if list(session.get_objects({Attribute.ID: k}))]
        if clash:
            raise errors.PolicyError(f"token {ts.label!r} already holds objects with CKA_ID {', '.join(clash)}; "
                                     "nothing was restored")
        key: Any = session.create_object(_secret(TRANSPORT_IMPORT, transport))
        created: dict[bytes, str | None] = {}
        try:
            for item in items:
                template = _ordered(item.template)
                obj = key.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, item.wrapped, id=item.key_id,
                                     label=item.label, mechanism=mech, store=True, template=template)
                try:
                    created[item.key_id] = bytes(obj[Attribute.CHECK_VALUE]).hex() or None
                except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, KeyError):
                    created[item.key_id] = None
            return created
        except BaseException:
            for key_id in ids:  # SoftHSM may leave a half-made object behind: find it by id
                for obj in list(session.get_objects({Attribute.ID: key_id})):
                    obj.destroy()
            raise
        finally:
            key.destroy()

    return ts.run("restore keys under the transport key", call)
