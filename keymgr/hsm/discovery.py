"""Finding tokens: which module, which slot, which token a ``pkcs11:`` URI names.

A URI that names no module uses :func:`default_module_path` (``KEYMGR_MODULE``
or SoftHSM2). When nothing matches, or several tokens do, the error lists
what *was* found, so a user can correct the URI without another tool.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pkcs11.exceptions as p11x

from keymgr import errors
from keymgr.hsm._errors import code_name
from keymgr.hsm.modules import (
    P11KIT_CONFIG_DIRS,
    SOFTHSM_CONF_ATTR,
    Module,
    load_module,
    resolve_module_name,
    use_softhsm_config,
)
from keymgr.hsm.uri import Pkcs11Uri

__all__ = ["FoundToken", "default_module_path", "find_token", "library_matches", "list_tokens", "module_for_uri",
           "registered_modules"]

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


@dataclass(frozen=True)
class FoundToken:
    """A token as discovery sees it: enough to match, list and open it."""

    module: Module
    slot_id: int
    slot_description: str
    slot_manufacturer: str
    slot_flags: int
    label: str
    manufacturer: str
    model: str
    serial: str
    flags: int

    @property
    def token(self) -> pkcs11.Token:
        """The python-pkcs11 token object (re-read: slots can change)."""
        for slot in self.module.lib.get_slots(token_present=True):
            if slot.slot_id == self.slot_id:
                token: pkcs11.Token = slot.get_token()
                return token
        raise errors.TokenRemovedError(f"token {self.label!r} is no longer in slot {self.slot_id}")

    def uri(self) -> str:
        """A URI naming exactly this token (label, serial, module), properly encoded."""
        return Pkcs11Uri(token=self.label, serial=self.serial, module_path=self.module.path).format()

    def describe(self) -> str:
        return f"{self.label!r} (serial {self.serial}, slot {self.slot_id}, {Path(self.module.path).name})"


def default_module_path() -> str:
    """The module used when a URI names none: ``$KEYMGR_MODULE`` or SoftHSM2."""
    configured = os.environ.get("KEYMGR_MODULE")
    if configured:
        return configured
    for candidate in SOFTHSM_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise errors.ModuleLoadError(
        "no PKCS#11 module given and SoftHSM2 is not installed (set KEYMGR_MODULE or module-path=)"
    )


def module_for_uri(uri: Pkcs11Uri) -> Module:
    """The module a URI names (module-path, module-name, else the default), SoftHSM pointed
    first at the configuration a ``softhsm2-conf=`` query attribute names."""
    confs = [value for name, value in uri.vendor_query if name == SOFTHSM_CONF_ATTR]
    if len(confs) > 1:
        raise errors.ConfigurationError(f"{SOFTHSM_CONF_ATTR}= appears twice in the token URI")
    if confs:
        use_softhsm_config(confs[0])
    if uri.module_path:
        return load_module(uri.module_path)
    if uri.module_name:
        return load_module(resolve_module_name(uri.module_name))
    return load_module(default_module_path())


def registered_modules() -> list[str]:
    """Paths of the modules p11-kit knows about, plus the default module."""
    paths: list[str] = []
    for directory in P11KIT_CONFIG_DIRS:
        if not directory.is_dir():
            continue
        for config in sorted(directory.glob("*.module")):
            try:
                path = resolve_module_name(config.stem)
            except errors.KeymgrError:
                continue
            if os.path.realpath(path) not in {os.path.realpath(p) for p in paths}:
                paths.append(path)
    try:
        default = default_module_path()
        if os.path.realpath(default) not in {os.path.realpath(p) for p in paths}:
            paths.insert(0, default)
    except errors.KeymgrError:
        pass
    return paths


def _strip(value: str | bytes) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.rstrip(" \x00")


def list_tokens(module: Module) -> list[FoundToken]:
    """Every initialised token present in the module's slots."""
    found: list[FoundToken] = []
    with module.lock:
        module.ensure_current()
        try:
            slots = module.lib.get_slots(token_present=True)
            for slot in slots:
                try:
                    token = slot.get_token()
                    found.append(
                        FoundToken(
                            module=module,
                            slot_id=int(slot.slot_id),
                            slot_description=_strip(slot.slot_description),
                            slot_manufacturer=_strip(slot.manufacturer_id),
                            slot_flags=int(slot.flags),
                            label=_strip(token.label),
                            manufacturer=_strip(token.manufacturer_id),
                            model=_strip(token.model),
                            serial=_strip(token.serial),
                            flags=int(token.flags),
                        )
                    )
                except p11x.PKCS11Error:
                    continue  # a slot emptied between the two calls
        except p11x.PKCS11Error as exc:
            raise errors.TokenError(f"cannot list slots of {module.path} ({code_name(exc)})") from exc
    return found


def library_matches(uri: Pkcs11Uri, module: Module) -> bool:
    """Whether ``module`` is the library the URI's ``library-*`` attributes name (C_GetInfo)."""
    if uri.library_manufacturer is None and uri.library_description is None and uri.library_version is None:
        return True
    with module.lock:
        module.ensure_current()
        lib = module.lib
        major, minor = lib.library_version
        return uri.matches_library(manufacturer=_strip(lib.manufacturer_id),
                                   description=_strip(lib.library_description), version=(int(major), int(minor)))


def _matches(uri: Pkcs11Uri, token: FoundToken) -> bool:
    if uri.vendor_path:
        return False  # RFC 7512 2.4: an attribute we do not understand matches nothing
    checks = (
        (uri.token, token.label),
        (uri.manufacturer, token.manufacturer),
        (uri.serial, token.serial),
        (uri.model, token.model),
        (uri.slot_description, token.slot_description),
        (uri.slot_manufacturer, token.slot_manufacturer),
    )
    if any(wanted is not None and wanted != actual for wanted, actual in checks):
        return False
    return uri.slot_id is None or uri.slot_id == token.slot_id


#: How often, and how far apart (seconds), a module nobody in this process uses yet is
#: re-initialised to look again for a token that its first C_Initialize did not list.
_LOOK_AGAIN = (0.05, 0.2, 0.5)


def find_token(uri: Pkcs11Uri) -> FoundToken:
    """The one token a URI names; a clear error listing the candidates otherwise.

    SoftHSM reads its token directory once, at C_Initialize, and leaves out a token whose files
    another process is rewriting at that moment (seen when processes rotate or write records
    at once). So a miss on a module that no session of this process uses yet is looked up again,
    re-initialising the module, a few times before it is reported; a module in use is never
    re-initialised for this, as that would log its sessions out."""
    module = module_for_uri(uri)
    tokens = list_tokens(module)
    library = library_matches(uri, module)
    matches = [t for t in tokens if library and _matches(uri, t)]
    for delay in _LOOK_AGAIN:
        if matches or module.in_use or uri.vendor_path or not library:
            break
        time.sleep(delay)
        try:
            module.reinitialize()
        except errors.KeymgrError:
            break
        tokens = list_tokens(module)
        matches = [t for t in tokens if _matches(uri, t)]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(t.describe() for t in tokens) or "none"
    if not library:
        lib = module.lib
        raise errors.TokenNotFoundError(
            f"no token matches {uri}: its library-* attributes do not match module {module.path} "
            f"(library-manufacturer={_strip(lib.manufacturer_id)!r}, library-description="
            f"{_strip(lib.library_description)!r}, library-version={'.'.join(map(str, lib.library_version))})")
    if not matches:
        blank = any(not _strip(t.label) and not _strip(t.serial) for t in tokens)
        hint = ("; a slot with no label and no serial holds an uninitialised token, or, on SoftHSM, one whose "
                "token.object a process killed during its login left short (docs/deployment.md, 'SoftHSM in a "
                "fleet')") if blank else ""
        raise errors.TokenNotFoundError(f"no token matches {uri}; tokens found: {listing}{hint}")
    raise errors.TokenNotFoundError(
        f"{len(matches)} tokens match {uri}; name one with token=, serial= or slot-id=. Tokens found: {listing}"
    )
