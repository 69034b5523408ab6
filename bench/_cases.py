"""The 1 KiB cases of bench/envelope.py: keymgr, its baselines, and its peers.

Each case is a pair of zero-argument callables (encrypt one message, decrypt
one message) built once, so the timed loop measures the operation and
nothing else. Baselines, on the same token and in the same process:

* ``raw``: ``cryptography`` AESGCM on 1 KiB, the key schedule done once, and
  ``raw, fresh key``: a new AESGCM object per message (what any envelope pays);
* ``bare pkcs11``: the python-pkcs11 calls a keymgr profile makes per message,
  on keymgr's own session and KEK objects, with nothing around them;
* ``bare + raw``: those calls plus the fresh-key AESGCM, i.e. the floor for
  keymgr on that profile (issue 3: keymgr must reach 0.8x of it).

Peers: Google Tink (AEAD AES256_GCM, and KmsEnvelopeAead with a local AEAD as
the KEK) and the AWS Encryption SDK (a raw AES-256 wrapping key via its legacy
``RawMasterKeyProvider``, which writes what the raw AES keyring writes; default
signed suite, the unsigned committing suite, and the caching CMM).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import keymgr
from keymgr.envelope import DataKey

Op = Callable[[], object]
MESSAGE = os.urandom(1024)
CONTEXT = {"tenant": "acme", "purpose": "bench"}
AAD = b"tenant=acme;purpose=bench"


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # "baseline", "keymgr", "peer"
    encrypt: Op
    decrypt: Op


def raw_cases() -> list[Case]:
    key, nonce = os.urandom(32), os.urandom(12)
    aead = AESGCM(key)
    sealed = aead.encrypt(nonce, MESSAGE, AAD)

    def fresh_encrypt() -> bytes:
        return AESGCM(os.urandom(32)).encrypt(os.urandom(12), MESSAGE, AAD)

    return [
        Case("raw AESGCM (key schedule once)", "baseline", lambda: aead.encrypt(os.urandom(12), MESSAGE, AAD),
             lambda: aead.decrypt(nonce, sealed, AAD)),
        Case("raw AESGCM, fresh key per message", "baseline", fresh_encrypt,
             lambda: AESGCM(key).decrypt(nonce, sealed, AAD)),
    ]


def _raw_session(km: keymgr.KeyManager) -> Any:
    """keymgr's own python-pkcs11 session (same login, same module): baselines call it directly."""
    from tests._internals import token_of

    return token_of(km).run("bench: borrow the session", lambda session: session)


def bare_cases(km: keymgr.KeyManager, kw_key: str, gcm_key: str) -> list[Case]:
    """The python-pkcs11 calls of each profile, alone and with the fresh-key AESGCM around them."""
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    session = _raw_session(km)
    kw_kek = session.get_key(id=km.describe_key(kw_key).primary_version.key_id)
    gcm_kek = session.get_key(id=km.describe_key(gcm_key).primary_version.key_id)
    dek, nonce = os.urandom(32), os.urandom(12)
    dek_template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: False,
                    Attribute.PRIVATE: True, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}
    unwrap_template = {Attribute.PRIVATE: True, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}

    def kw_wrap(value: bytes) -> bytes:
        temp = session.create_object({**dek_template, Attribute.VALUE: value})
        try:
            return bytes(kw_kek.wrap_key(temp, mechanism=Mechanism.AES_KEY_WRAP))
        finally:
            temp.destroy()

    def kw_unwrap(wrapped: bytes) -> bytes:
        temp = kw_kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.AES_KEY_WRAP,
                                 store=False, template=unwrap_template)
        try:
            return bytes(temp[Attribute.VALUE])
        finally:
            temp.destroy()

    def gcm_wrap(value: bytes, iv: bytes | None = None) -> bytes:
        return bytes(gcm_kek.encrypt(value, mechanism=Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(iv or os.urandom(12), b"", 128)))

    def gcm_unwrap(sealed: bytes, iv: bytes = nonce) -> bytes:
        return bytes(gcm_kek.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, b"", 128)))

    gcm_sealed = bytes(gcm_kek.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, b"", 128)))
    cases = []
    for profile, wrap, unwrap in (("kw", kw_wrap, kw_unwrap), ("gcm", gcm_wrap, gcm_unwrap)):
        wrapped = gcm_sealed if profile == "gcm" else wrap(dek)
        body = AESGCM(dek).encrypt(nonce, MESSAGE, AAD)
        def bare_encrypt(w: Callable[..., bytes] = wrap) -> bytes:
            return w(os.urandom(32))

        def bare_decrypt(u: Callable[..., bytes] = unwrap, x: bytes = wrapped) -> bytes:
            return u(x)

        cases.append(Case(f"bare pkcs11, {profile}", "baseline", bare_encrypt, bare_decrypt))

        def envelope_encrypt(w: Callable[[bytes], bytes] = wrap) -> tuple[bytes, bytes]:
            key = os.urandom(32)
            return w(key), AESGCM(key).encrypt(os.urandom(12), MESSAGE, AAD)

        def envelope_decrypt(u: Callable[[bytes], bytes] = unwrap, x: bytes = wrapped, b: bytes = body) -> bytes:
            return AESGCM(u(x)).decrypt(nonce, b, AAD)

        cases.append(Case(f"bare pkcs11 + raw AESGCM, {profile}", "baseline", envelope_encrypt, envelope_decrypt))
    kek_ids = {profile: km.describe_key(name).primary_version.key_id for profile, name in (("kw", kw_key),
                                                                                          ("gcm", gcm_key))}
    cases += [_format_case(profile, kek_ids[profile], wrap, unwrap)
              for profile, wrap, unwrap in (("kw", kw_wrap, kw_unwrap), ("gcm", gcm_wrap, gcm_unwrap))]
    return cases


def _format_case(profile: str, kek_id: bytes, wrap: Callable[..., bytes], unwrap: Callable[..., bytes]) -> Case:
    """The bare calls with keymgr's format layer around them instead of a bare AESGCM: a fresh
    data key, its recipient, the CMS message with context and commitment; no manager, keyring,
    state check, usage meter or session layer. What keymgr's CMS envelope costs at least."""
    from keymgr.envelope import kek_recipient_der, open_message, read_kek_recipient, seal_message

    def seal() -> bytes:
        dek = DataKey(os.urandom(32))
        try:
            if profile == "gcm":
                iv = os.urandom(12)
                recipient = kek_recipient_der(kek_id, wrap(dek.reveal(), iv), "aes256_gcm", iv)
            else:
                recipient = kek_recipient_der(kek_id, wrap(dek.reveal()), "aes256_wrap")
            return seal_message(MESSAGE, dek=dek, recipient_infos=[recipient], context=CONTEXT)
        finally:
            dek.wipe()

    def unwrap_der(der: bytes) -> DataKey:
        found = read_kek_recipient(der)
        if found.algorithm == "aes256_gcm":
            return DataKey(unwrap(found.encrypted_key, found.gcm_nonce))
        return DataKey(unwrap(found.encrypted_key))

    blob = seal()
    assert open_message(blob, unwrap_der=unwrap_der, context=CONTEXT) == MESSAGE
    return Case(f"bare pkcs11 + keymgr format layer, {profile}", "baseline", seal,
                lambda: open_message(blob, unwrap_der=unwrap_der, context=CONTEXT))


def manager(uri: str, **options: Any) -> keymgr.KeyManager:
    """A KeyManager for the comparisons: with the audit log off (peers keep none), unless
    ``options`` name one; managers without the ``audit=`` option are made as they come."""
    import inspect

    if "audit" in inspect.signature(keymgr.KeyManager).parameters:
        options.setdefault("audit", False)
    else:
        options.pop("audit", None)
    return keymgr.KeyManager(uri, **options)


def keymgr_case(name: str, km: keymgr.KeyManager, key: str) -> Case:
    blob = km.encrypt(MESSAGE, key=key, context=CONTEXT)
    return Case(name, "keymgr", lambda: km.encrypt(MESSAGE, key=key, context=CONTEXT),
                lambda: km.decrypt(blob, context=CONTEXT))


def format_cases() -> list[Case]:
    """keymgr's format layer alone with one cached DataKey: what is left when no token is called."""
    from keymgr.envelope import kek_recipient_der, open_message, seal_message

    dek = DataKey(os.urandom(32))
    recipient = kek_recipient_der(os.urandom(16), os.urandom(40), "aes256_wrap")
    blob = seal_message(MESSAGE, dek=dek, recipient_infos=[recipient], context=CONTEXT)
    return [Case("keymgr format layer only (cached DataKey)", "keymgr",
                 lambda: seal_message(MESSAGE, dek=dek, recipient_infos=[recipient], context=CONTEXT),
                 lambda: open_message(blob, unwrap_der=lambda _: dek, context=CONTEXT))]


def tink_cases() -> list[Case]:
    import tink
    from tink import aead

    aead.register()
    primitive = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    kek = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    envelope = aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, kek)
    sealed, enveloped = primitive.encrypt(MESSAGE, AAD), envelope.encrypt(MESSAGE, AAD)
    return [
        Case("Tink AEAD AES256_GCM", "peer", lambda: primitive.encrypt(MESSAGE, AAD),
             lambda: primitive.decrypt(sealed, AAD)),
        Case("Tink KmsEnvelopeAead (local KEK)", "peer", lambda: envelope.encrypt(MESSAGE, AAD),
             lambda: envelope.decrypt(enveloped, AAD)),
    ]


def esdk_cases() -> list[Case]:
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy, EncryptionKeyType, WrappingAlgorithm
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

    wrapping = WrappingKey(wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                           wrapping_key=os.urandom(32), wrapping_key_type=EncryptionKeyType.SYMMETRIC)

    class RawAesKey(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "bench"

        def _get_raw_key(self, key_id: bytes) -> WrappingKey:
            return wrapping

    provider = RawAesKey()
    provider.add_master_key(b"kek")
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    caching = aws_encryption_sdk.CachingCryptoMaterialsManager(
        master_key_provider=provider, cache=aws_encryption_sdk.LocalCryptoMaterialsCache(capacity=100),
        max_age=300.0, max_messages_encrypted=10_000)
    unsigned = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    variants: list[tuple[str, dict[str, Any]]] = [
        ("AWS ESDK raw AES, default signed suite", {"key_provider": provider}),
        ("AWS ESDK raw AES, unsigned suite", {"key_provider": provider, "algorithm": unsigned}),
        ("AWS ESDK raw AES, caching CMM (unsigned)", {"materials_manager": caching, "algorithm": unsigned}),
    ]
    cases = []
    for name, options in variants:
        sealed, _ = client.encrypt(source=MESSAGE, encryption_context=CONTEXT, **options)
        reader = {k: v for k, v in options.items() if k != "algorithm"}
        def peer_encrypt(o: dict[str, Any] = options) -> object:
            return client.encrypt(source=MESSAGE, encryption_context=CONTEXT, **o)

        def peer_decrypt(r: dict[str, Any] = reader, s: bytes = sealed) -> object:
            return client.decrypt(source=s, **r)

        cases.append(Case(name, "peer", peer_encrypt, peer_decrypt))
    return cases
