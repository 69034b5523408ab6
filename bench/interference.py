"""What keymgr's message format costs beside a SoftHSM call, against what it costs alone.

``python bench/interference.py`` (after ``bash scripts/setup.sh --bench``; about 30 s).
On a gcm key, in one process, interleaved round by round (like bench/envelope.py):

* the bare python-pkcs11 call of the gcm profile plus a fresh-key AESGCM (the
  floor issue 3 measures keymgr against);
* keymgr's format layer alone (``seal_message`` / ``open_message`` with a fixed
  data key and recipient, no token);
* the bare calls followed by that same format work, unrelated to them;
* keymgr itself.

Row 3 minus row 1 is what the format's work costs next to a token call; when
it is well above row 2, the token's work and the Python after it are evicting
each other from the CPU caches, and no Python-level change to keymgr's
manager removes that part (docs/performance.md, "Each target").
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _cases  # noqa: E402
from bench.envelope import make_token  # noqa: E402
from keymgr.envelope import DataKey, kek_recipient_der, open_message, parse_message, seal_message  # noqa: E402


def main(rounds: int = 9, per_round: int = 4000) -> None:
    from pkcs11 import Mechanism
    from pkcs11.mechanisms import GCMParams

    km = _cases.manager(make_token(Path(tempfile.mkdtemp(prefix="keymgr-bench-"))))
    km.create_key("interference", profile="gcm")
    key_id = km.describe_key("interference").primary_version.key_id
    kek = _cases._raw_session(km).get_key(id=key_id)
    message, context, aad = _cases.MESSAGE, _cases.CONTEXT, _cases.AAD
    blob = km.encrypt(message, key="interference", context=context)

    dek = DataKey(os.urandom(32))
    recipient = kek_recipient_der(os.urandom(16), os.urandom(48), "aes256_gcm", os.urandom(12))
    fixed = seal_message(message, dek=dek, recipient_infos=[recipient], context=context)
    wrapped_iv, dek_bytes = os.urandom(12), os.urandom(32)
    wrapped = bytes(kek.encrypt(dek_bytes, mechanism=Mechanism.AES_GCM,
                                mechanism_param=GCMParams(wrapped_iv, b"", 128)))
    sealed = AESGCM(dek_bytes).encrypt(b"n" * 12, message, aad)
    assert parse_message(blob).recipient_infos.der  # a real keymgr message

    def bare_encrypt() -> bytes:
        key = os.urandom(32)
        kek.encrypt(key, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(os.urandom(12), b"", 128))
        return AESGCM(key).encrypt(os.urandom(12), message, aad)

    def bare_decrypt() -> bytes:
        key = bytes(kek.decrypt(wrapped, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(wrapped_iv, b"", 128)))
        return AESGCM(key).decrypt(b"n" * 12, sealed, aad)

    def format_seal() -> bytes:
        return seal_message(message, dek=dek, recipient_infos=[recipient], context=context)

    def format_open() -> bytes:
        return open_message(fixed, unwrap_der=lambda _: dek, context=context)

    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "bare calls + fresh-key AESGCM": (bare_encrypt, bare_decrypt),
        "keymgr format layer alone, no token": (format_seal, format_open),
        "bare calls + the same format work, unrelated to them": (lambda: (bare_encrypt(), format_seal()),
                                                                 lambda: (bare_decrypt(), format_open())),
        "keymgr": (lambda: km.encrypt(message, key="interference", context=context),
                   lambda: km.decrypt(blob, context=context)),
    }
    times: dict[tuple[str, int], list[float]] = {(name, d): [] for name in cases for d in (0, 1)}
    for _ in range(rounds):
        for name, ops in cases.items():
            for direction, op in enumerate(ops):
                start = time.perf_counter()
                for _ in range(per_round):
                    op()
                times[(name, direction)].append((time.perf_counter() - start) / per_round * 1e6)
    print(f"gcm, µs per message (median of {rounds} rounds of {per_round}; load average "
          f"{os.getloadavg()[0]:.1f})\n\n| case | encrypt | decrypt |\n|---|---|---|")
    for name in cases:
        enc, dec = (statistics.median(times[(name, d)]) for d in (0, 1))
        print(f"| {name} | {enc:.1f} | {dec:.1f} |")
    km.close()


if __name__ == "__main__":
    main()
