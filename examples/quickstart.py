"""keymgr's main job on the local SoftHSM token, top to bottom.

Run with ``bash scripts/demo.sh`` (sets everything up first), or, once set
up, ``.venv/bin/python examples/quickstart.py``. Creates the local token if
needed (``keymgr init``), a key named ``orders``, and encrypts and decrypts
a record under it with an encryption context.
"""

from __future__ import annotations

import keymgr
from keymgr.hsm.local import LocalToken


def main() -> None:
    local = LocalToken.default()  # the token of `keymgr init` (~/.local/share/keymgr, or $KEYMGR_HOME)
    created = local.init()
    if created:
        print(f"created the local token in {local.home} (PIN file {local.pin_path}, mode 0600)")
    if created.so_pin is not None:  # generated, kept nowhere: shown once, as `keymgr init` does
        print(f"SO PIN of the local token (shown once, kept nowhere; write it down): {created.so_pin.reveal()}")
        created.so_pin.wipe()
    with keymgr.KeyManager() as km:
        key = km.create_key("orders", exist_ok=True)  # get or create: the demo runs again and again
        v = key.primary_version
        print(f"key {key.name!r}: primary version {v.version}, CKA_ID {v.key_id.hex()}, KCV {v.kcv}")
        context = {"tenant": "acme", "table": "cards"}
        blob = km.encrypt(b"4111 1111 1111 1111", key="orders", context=context)
        print(f"encrypted 19 bytes into a {len(blob)}-byte CMS message")
        if km.decrypt(blob, context=context) != b"4111 1111 1111 1111":
            raise SystemExit("round trip failed: this is a bug")
        try:
            km.decrypt(blob, context={"tenant": "someone-else", "table": "cards"})
        except keymgr.IntegrityError as exc:
            print(f"wrong context refused as expected: {exc}")
        else:
            raise SystemExit("decrypt with the wrong context succeeded: this is a bug")
        print("decrypted it back with the right context")
        print("done")


if __name__ == "__main__":
    main()
