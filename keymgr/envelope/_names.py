"""Names of the algorithm and content-type OIDs others put in CMS messages, for error messages.

When keymgr refuses a message for its algorithm (:class:`~keymgr.errors.UnsupportedAlgorithmError`),
the operator should learn what the sender chose, in the words the sender's tool uses
(``openssl cms -encrypt -aes-256-cbc``, Bouncy Castle's ``CMSAlgorithm``), and what to
ask for instead. An OID keymgr has no name for is shown dotted: it is a public field of
the message, so showing it discloses nothing.
"""

from __future__ import annotations

__all__ = ["describe", "name_of"]

#: OID -> (short name, what it is)
NAMES: dict[str, tuple[str, str]] = {
    # content types (RFC 5652, RFC 5083)
    "1.2.840.113549.1.7.1": ("id-data", "content type"),
    "1.2.840.113549.1.7.2": ("id-signedData", "CMS SignedData"),
    "1.2.840.113549.1.7.3": ("id-envelopedData", "CMS EnvelopedData, no integrity protection"),
    "1.2.840.113549.1.7.6": ("id-encryptedData", "CMS EncryptedData"),
    "1.2.840.113549.1.9.16.1.2": ("id-ct-authData", "CMS AuthenticatedData"),
    "1.2.840.113549.1.9.16.1.23": ("id-ct-authEnvelopedData", "CMS AuthEnvelopedData"),
    # content-encryption algorithms
    "2.16.840.1.101.3.4.1.2": ("aes-128-cbc", "AES-128-CBC, no integrity protection"),
    "2.16.840.1.101.3.4.1.22": ("aes-192-cbc", "AES-192-CBC, no integrity protection"),
    "2.16.840.1.101.3.4.1.42": ("aes-256-cbc", "AES-256-CBC, no integrity protection"),
    "2.16.840.1.101.3.4.1.6": ("aes-128-gcm", "AES-128-GCM"),
    "2.16.840.1.101.3.4.1.26": ("aes-192-gcm", "AES-192-GCM"),
    "2.16.840.1.101.3.4.1.46": ("aes-256-gcm", "AES-256-GCM"),
    "2.16.840.1.101.3.4.1.7": ("aes-128-ccm", "AES-128-CCM"),
    "2.16.840.1.101.3.4.1.27": ("aes-192-ccm", "AES-192-CCM"),
    "2.16.840.1.101.3.4.1.47": ("aes-256-ccm", "AES-256-CCM"),
    "1.2.840.113549.1.9.16.3.18": ("chacha20-poly1305", "ChaCha20-Poly1305, RFC 8103"),
    "1.2.840.113549.3.7": ("des-ede3-cbc", "Triple-DES-CBC, no integrity protection"),
    # key transport
    "1.2.840.113549.1.1.1": ("rsaEncryption", "RSA PKCS#1 v1.5 key transport"),
    "1.2.840.113549.1.1.7": ("id-RSAES-OAEP", "RSA-OAEP key transport"),
    # key agreement (RFC 5753, SEC 1)
    "1.3.133.16.840.63.0.2": ("dhSinglePass-stdDH-sha1kdf-scheme", "ECDH, X9.63 KDF with SHA-1"),
    "1.3.132.1.11.0": ("dhSinglePass-stdDH-sha224kdf-scheme", "ECDH, X9.63 KDF with SHA-224"),
    "1.3.132.1.11.1": ("dhSinglePass-stdDH-sha256kdf-scheme", "ECDH, X9.63 KDF with SHA-256"),
    "1.3.132.1.11.2": ("dhSinglePass-stdDH-sha384kdf-scheme", "ECDH, X9.63 KDF with SHA-384"),
    "1.3.132.1.11.3": ("dhSinglePass-stdDH-sha512kdf-scheme", "ECDH, X9.63 KDF with SHA-512"),
    "1.3.133.16.840.63.0.3": ("dhSinglePass-cofactorDH-sha1kdf-scheme", "cofactor ECDH, X9.63 KDF with SHA-1"),
    "1.3.132.1.14.0": ("dhSinglePass-cofactorDH-sha224kdf-scheme", "cofactor ECDH, X9.63 KDF with SHA-224"),
    "1.3.132.1.14.1": ("dhSinglePass-cofactorDH-sha256kdf-scheme", "cofactor ECDH, X9.63 KDF with SHA-256"),
    "1.3.132.1.14.2": ("dhSinglePass-cofactorDH-sha384kdf-scheme", "cofactor ECDH, X9.63 KDF with SHA-384"),
    "1.3.132.1.14.3": ("dhSinglePass-cofactorDH-sha512kdf-scheme", "cofactor ECDH, X9.63 KDF with SHA-512"),
    "1.3.133.16.840.63.0.16": ("mqvSinglePass-sha1kdf-scheme", "ECMQV, X9.63 KDF with SHA-1"),
    "1.3.132.1.15.0": ("mqvSinglePass-sha224kdf-scheme", "ECMQV, X9.63 KDF with SHA-224"),
    "1.3.132.1.15.1": ("mqvSinglePass-sha256kdf-scheme", "ECMQV, X9.63 KDF with SHA-256"),
    "1.3.132.1.15.2": ("mqvSinglePass-sha384kdf-scheme", "ECMQV, X9.63 KDF with SHA-384"),
    "1.3.132.1.15.3": ("mqvSinglePass-sha512kdf-scheme", "ECMQV, X9.63 KDF with SHA-512"),
    # key wrap
    "2.16.840.1.101.3.4.1.5": ("id-aes128-wrap", "AES-128 key wrap, RFC 3394"),
    "2.16.840.1.101.3.4.1.25": ("id-aes192-wrap", "AES-192 key wrap, RFC 3394"),
    "2.16.840.1.101.3.4.1.45": ("id-aes256-wrap", "AES-256 key wrap, RFC 3394"),
    "2.16.840.1.101.3.4.1.8": ("id-aes128-wrap-pad", "AES-128 key wrap with padding, RFC 5649"),
    "2.16.840.1.101.3.4.1.28": ("id-aes192-wrap-pad", "AES-192 key wrap with padding, RFC 5649"),
    "2.16.840.1.101.3.4.1.48": ("id-aes256-wrap-pad", "AES-256 key wrap with padding, RFC 5649"),
    "1.2.840.113549.1.9.16.3.6": ("id-alg-CMS3DESwrap", "Triple-DES key wrap"),
    # hashes (RFC 4055 OAEP parameters)
    "1.3.14.3.2.26": ("sha1", "SHA-1"),
    "2.16.840.1.101.3.4.2.4": ("sha224", "SHA-224"),
    "2.16.840.1.101.3.4.2.1": ("sha256", "SHA-256"),
    "2.16.840.1.101.3.4.2.2": ("sha384", "SHA-384"),
    "2.16.840.1.101.3.4.2.3": ("sha512", "SHA-512"),
    "1.2.840.113549.2.5": ("md5", "MD5"),
}


def name_of(oid: str) -> str:
    """The short name of ``oid`` (``aes-256-cbc``), or the dotted OID itself."""
    known = NAMES.get(oid)
    return known[0] if known else oid


def describe(oid: str) -> str:
    """``"AES-256-CBC, no integrity protection (aes-256-cbc, 2.16.840.1.101.3.4.1.42)"``."""
    known = NAMES.get(oid)
    if known is None:
        return f"{oid} (an OID unknown to keymgr)"
    return f"{known[1]} ({known[0]}, {oid})"
