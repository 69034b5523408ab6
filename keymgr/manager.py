"""KeyManager: the safe API that applications use.

::

    with keymgr.KeyManager() as km:                  # the embedded local token
        km.create_key("orders")
        blob = km.encrypt(b"card 4111...", key="orders", context={"tenant": "acme"})
        km.decrypt(blob, context={"tenant": "acme"})

A ``KeyManager`` is bound to one token (named by an RFC 7512 URI, or the
embedded SoftHSM token when none is given). It is safe to share between
threads: every token call is serialised per module underneath.
"""

from __future__ import annotations

from types import TracebackType

from keymgr import errors
from keymgr.hsm import Capabilities, PinCallback, Pkcs11Uri, TokenSession, open_token, probe
from keymgr.keyring import KeyPolicy, Keyring, KeyRecord
from keymgr.local import LocalToken

__all__ = ["KeyManager"]


class KeyManager:
    """Keys in one token, and everything applications do with them."""

    def __init__(self, token: str | Pkcs11Uri | None = None, *, pin_callback: PinCallback | None = None) -> None:
        """Open the token named by ``token`` (a ``pkcs11:`` URI), or the local token.

        The PIN comes from the URI's ``pin-source`` / ``pin-value`` or, failing
        those, from ``pin_callback`` (default: a no-echo terminal prompt).
        """
        if token is None:
            local = LocalToken.default()
            local.activate()
            token = local.uri()
        uri = Pkcs11Uri.parse(token) if isinstance(token, str) else token
        self._uri = uri
        self._ts: TokenSession | None = open_token(uri, pin_callback=pin_callback)
        self._keyring = Keyring(self._ts)

    def __repr__(self) -> str:
        state = "closed" if self._ts is None else repr(self._ts.label)
        return f"KeyManager(token={state})"

    def __enter__(self) -> KeyManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Forget this manager's token handle. The process stays logged in for other users
        of the same token (the login is per process); :func:`keymgr.hsm.close_all` logs out."""
        self._ts = None

    @property
    def token(self) -> TokenSession:
        if self._ts is None:
            raise errors.ConfigurationError("this KeyManager is closed")
        return self._ts

    @property
    def keyring(self) -> Keyring:
        self.token  # noqa: B018 - raises when closed
        return self._keyring

    # -- keys -------------------------------------------------------------------

    def create_key(self, name: str, *, profile: str = "kw", rotate_after_days: int | None = None,
                   max_messages: int | None = None) -> KeyRecord:
        """Generate version 1 of a named key inside the token.

        ``profile`` chooses how the key protects data keys: ``"kw"`` (AES key
        wrap, RFC 3394: the standard form OpenSSL reads) or ``"gcm"`` (AES-GCM
        inside the token: one token call per message). See docs/format.md.
        """
        policy = KeyPolicy(rotate_after_days=rotate_after_days, max_messages=max_messages)
        return self.keyring.create(name, profile=profile, policy=policy)

    def list_keys(self) -> list[KeyRecord]:
        """Every named key on the token, with its versions."""
        return self.keyring.records()

    def describe_key(self, name: str) -> KeyRecord:
        """One named key: versions, states, primary, key check values, policy."""
        return self.keyring.get(name)

    def capabilities(self) -> Capabilities:
        """What the token can do (probed once per process)."""
        return probe(self.token)
