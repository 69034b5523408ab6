"""Private-key operations per second on real tokens, against the same operation on the host.

Usage (tokens named by URIs with a PIN; the TPM's env.sh sourced first)::

    python bench/token_rates.py 'pkcs11:token=keymgr-A?module-path=...&pin-value=1234' \\
        'pkcs11:token=keymgr-tpm?module-path=.../libtpm2_pkcs11.so&pin-value=1234'

For each token: RSA-2048 OAEP decrypt, ECDH P-256 derive, RSA-PSS and ECDSA sign
(where the token can), and a whole public-key message decrypt (parse, token
operation, unwrap, AES-GCM), as ops/s; the host baseline is pyca/cryptography
doing the same private-key operation in this process. Key pairs are made with
labels ``bench-*`` and left on the token (tokens in tests are throwaway).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keymgr.hsm import asym, open_token, probe
from keymgr.recipients import pubkey


def rate(fn: Callable[[], object], seconds: float = 1.5) -> float:
    fn()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        count += 1
    return count / elapsed


def bench_token(uri: str) -> None:
    ts = open_token(uri)
    caps = probe(ts)
    print(f"\n== token {ts.label!r} ({ts.module.description}); schemes {', '.join(caps.schemes)}")
    suffix = uuid.uuid4().hex[:6]
    if caps.has("rsa-keygen") and caps.oaep_hash():
        ref = asym.generate_keypair(ts, "rsa-2048", label=f"bench-rsa-{suffix}")
        public = asym.public_key(ts, ref)
        assert isinstance(public, rsa.RSAPublicKey)
        h = hashes.SHA256() if caps.oaep_hash() == "sha256" else hashes.SHA1()
        oaep = padding.OAEP(padding.MGF1(h), h, None)
        ct = public.encrypt(b"k" * 32, oaep)
        host = rsa.generate_private_key(65537, 2048)
        host_ct = host.public_key().encrypt(b"k" * 32, oaep)
        token_rate = rate(lambda: asym.rsa_oaep_decrypt(ts, ref, ct, hash=caps.oaep_hash() or "sha1"))
        host_rate = rate(lambda: host.decrypt(host_ct, oaep))
        print(f"RSA-2048 OAEP-{caps.oaep_hash()} decrypt: {token_rate:9.1f}/s  (host {host_rate:9.1f}/s, "
              f"ratio {token_rate / host_rate:.3f})")
        print(f"RSA-2048 PSS sign:          {rate(lambda: asym.sign(ts, ref, b'x')):9.1f}/s")
        key = pubkey.TokenPrivateKey(ts, ref)
        blob = pubkey.encrypt_to(b"m" * 1024, [key.recipient()])
        print(f"1 KiB message to RSA key, decrypt: {rate(lambda: pubkey.decrypt_with(blob, [key])):9.1f}/s")
    if caps.has("ec-keygen"):
        ref = asym.generate_keypair(ts, "ec-p256", label=f"bench-ec-{suffix}")
        print(f"ECDSA P-256 sign:           {rate(lambda: asym.sign(ts, ref, b'x')):9.1f}/s")
        if caps.has("ecdh-p256"):
            peer = ec.generate_private_key(ec.SECP256R1())
            point = peer.public_key().public_bytes(serialization.Encoding.X962,
                                                   serialization.PublicFormat.UncompressedPoint)
            token_rate = rate(lambda: asym.ecdh_derive(ts, ref, point))
            public = asym.public_key(ts, ref)
            assert isinstance(public, ec.EllipticCurvePublicKey)
            host_rate = rate(lambda: peer.exchange(ec.ECDH(), public))
            print(f"ECDH P-256 derive:          {token_rate:9.1f}/s  (host {host_rate:9.1f}/s, "
                  f"ratio {token_rate / host_rate:.3f})")
            key = pubkey.TokenPrivateKey(ts, ref)
            blob = pubkey.encrypt_to(b"m" * 1024, [key.recipient()])
            print(f"1 KiB message to EC key, decrypt:  {rate(lambda: pubkey.decrypt_with(blob, [key])):9.1f}/s")


if __name__ == "__main__":
    for token_uri in sys.argv[1:] or sys.exit(__doc__):  # type: ignore[func-returns-value]
        bench_token(token_uri)
