"""Recipients: who can open an envelope's data key, bound to a token or a public key.

- :mod:`keymgr.recipients.kek`: a keyring key on the token wraps the data key (KEK).
- :mod:`keymgr.recipients.pubkey`: RSA-OAEP and ECDH recipients for a public key or certificate;
  :mod:`keymgr.recipients.token_keys` their decrypt side, key pairs on a token;
  :mod:`keymgr.recipients.identities` how recipients name a key pair;
  :mod:`keymgr.recipients.recipient_files` the files senders are given.

Layer: above :mod:`keymgr.envelope` (the token-free formats) and :mod:`keymgr.keyring`.
"""
