"""Rewrap: move envelopes' data keys to their key's primary version, payload untouched.

- :mod:`keymgr.rewrap.message`: one envelope in memory or a stream.
- :mod:`keymgr.rewrap.file`: one file in place, crash-safely.
- :mod:`keymgr.rewrap.journal`: the write-ahead journal that makes it resumable.
- :mod:`keymgr.rewrap.bulk`: every envelope under some paths (``keymgr rewrap``).

Layer: above :mod:`keymgr.recipients` and :mod:`keymgr.keyring`.
"""
