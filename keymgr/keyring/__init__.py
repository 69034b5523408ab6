"""The keyring: named keys and their versions, stored as facts on the token.

- :mod:`keymgr.keyring.store`: :class:`~keymgr.keyring.store.Keyring`, records, policies.
- :mod:`keymgr.keyring.facts`: the MACed facts a record is folded from.
- :mod:`keymgr.keyring.provenance`: which token objects keymgr itself made.

Layer: above :mod:`keymgr.hsm`; below recipients, rewrap, custody, audit, lifecycle.
"""
