"""What CMS encoding costs on the per-message path (not a test).

Run: ``python bench/cms_encoding.py [--n 20000]``

Times, per 1 KiB message in one process and one run: raw ``cryptography``
AESGCM encrypt / decrypt; keymgr ``seal_message`` / ``open_message`` with
a cached :class:`DataKey` (the data-key cache path: no token, no HKDF, no key
schedule) and with raw DEK bytes; and building / parsing the same structure
with asn1crypto, which is why keymgr encodes these few fixed shapes itself.
Results are recorded in docs/format.md ("Costs").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asn1crypto import cms, core  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from cryptography.hazmat.primitives.keywrap import aes_key_wrap  # noqa: E402

from keymgr.envelope import DataKey, kek_recipient_info, open_message, parse_message, seal_message  # noqa: E402


class GcmParameters(core.Sequence):
    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer, {"default": 12})]


def per_op(fn: Callable[[], object], n: int) -> float:
    """Median over 5 batches of µs per call."""
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n // 5):
            fn()
        batches.append((time.perf_counter() - start) / (n // 5) * 1e6)
    return sorted(batches)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description="Per-message cost of CMS encoding.")
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    n = args.n
    plaintext, dek, kek = os.urandom(1024), os.urandom(32), os.urandom(32)
    key = DataKey(dek)
    ri = kek_recipient_info(b"bench-kek", aes_key_wrap(kek, dek), "aes256_wrap")
    context = {"tenant": "acme", "purpose": "orders"}
    aead, nonce = AESGCM(dek), os.urandom(12)
    sealed_raw = aead.encrypt(nonce, plaintext, b"")
    blob = seal_message(plaintext, dek=key, recipient_infos=[ri], context=context)
    compat = seal_message(plaintext, dek=key, recipient_infos=[ri], context=None, compat_openssl=True)
    attrs = cms.CMSAttributes.load(parse_message(blob).aad)
    ri_copy = cms.RecipientInfo.load(ri.dump())

    def asn1_build() -> bytes:
        """The same message's structure, built the asn1crypto way (GCM itself left out)."""
        aed = cms.AuthEnvelopedData({
            "version": "v0", "recipient_infos": [ri_copy],
            "auth_encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {
                    "algorithm": "aes256_gcm",
                    "parameters": GcmParameters({"aes_nonce": nonce, "aes_icvlen": 16})},
                "encrypted_content": sealed_raw[:-16]},
            "auth_attrs": attrs, "mac": sealed_raw[-16:]})
        return cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": aed}).dump()

    def asn1_parse() -> None:
        aed = cms.ContentInfo.load(blob, strict=True)["content"]
        _ = [r.chosen["encrypted_key"].native for r in aed["recipient_infos"]]
        eci = aed["auth_encrypted_content_info"]
        _ = eci["content_encryption_algorithm"]["parameters"].contents, eci["encrypted_content"].native
        _ = aed["auth_attrs"].untag().dump(), aed["mac"].native

    rows = [
        ("raw AESGCM encrypt 1 KiB", per_op(lambda: aead.encrypt(nonce, plaintext, b""), n)),
        ("raw AESGCM decrypt 1 KiB", per_op(lambda: aead.decrypt(nonce, sealed_raw, b""), n)),
        ("seal_message, cached DataKey, context", per_op(
            lambda: seal_message(plaintext, dek=key, recipient_infos=[ri], context=context), n)),
        ("seal_message, cached DataKey, compat", per_op(
            lambda: seal_message(plaintext, dek=key, recipient_infos=[ri], context=None, compat_openssl=True), n)),
        ("seal_message, DEK bytes, context", per_op(
            lambda: seal_message(plaintext, dek=dek, recipient_infos=[ri], context=context), n)),
        ("parse_message", per_op(lambda: parse_message(blob), n)),
        ("open_message, cached DataKey, context", per_op(
            lambda: open_message(blob, unwrap=lambda r: key, context=context), n)),
        ("open_message, cached DataKey, compat", per_op(
            lambda: open_message(compat, unwrap=lambda r: key, context=None), n)),
        ("open_message, DEK bytes, context", per_op(
            lambda: open_message(blob, unwrap=lambda r: dek, context=context), n)),
        ("asn1crypto: build the same ContentInfo", per_op(asn1_build, max(n // 20, 50))),
        ("asn1crypto: parse it and read the fields", per_op(asn1_parse, max(n // 20, 50))),
    ]
    print(f"1 KiB messages, µs per operation (median of 5 batches, {n} ops)")
    for name, us in rows:
        print(f"  {name:<42} {us:8.1f} µs  {1e6 / us:>10,.0f} ops/s")


if __name__ == "__main__":
    main()
