"""Encrypted database fields with blind indexes, on keys in the token (docs/fields.md).

* :mod:`keymgr.fields._format`: the compact field form and its AAD (the value's place).
* :mod:`keymgr.fields.keys`: the data-key table (each data key wrapped once, rewrapped in place).
* :mod:`keymgr.fields.cipher`: :class:`FieldCipher`, made by :meth:`keymgr.KeyManager.fields`.
* :mod:`keymgr.fields.index`: :class:`BlindIndex`, made by :meth:`keymgr.KeyManager.blind_index`.
* :mod:`keymgr.fields.subkeys`: the bounded cache of blind-index subkeys (:class:`SubkeyPolicy`).
* :mod:`keymgr.fields.masking`: masked forms for display and restricted roles.
* :mod:`keymgr.fields.sql` and :mod:`keymgr.fields.bulk`: the database side (extra ``[db]``).
* :mod:`keymgr.fields.django`: Django model fields on the same form and terms (extra ``[django]``).
"""

from keymgr.fields._format import OVERHEAD, Place
from keymgr.fields.cipher import FieldCipher
from keymgr.fields.index import (
    BlindIndex,
    Term,
    chain,
    collapse_spaces,
    digits_only,
    last_digits,
    lowercase,
    unicode_fold,
)
from keymgr.fields.keys import KeyStore, MemoryKeyStore, StoredKey
from keymgr.fields.masking import mask, mask_card, mask_email, mask_phone
from keymgr.fields.subkeys import SubkeyPolicy

__all__ = ["OVERHEAD", "BlindIndex", "FieldCipher", "KeyStore", "MemoryKeyStore", "Place", "StoredKey", "SubkeyPolicy",
           "Term", "chain",
           "collapse_spaces", "digits_only", "last_digits", "lowercase", "mask", "mask_card", "mask_email",
           "mask_phone", "unicode_fold"]
