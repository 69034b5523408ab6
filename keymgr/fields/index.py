"""Blind indexes: searchable, truncated HMACs of field values, keyed by a key that stays in the token.

``K_v`` is an HMAC key generated in the token for one index name and version (template
:data:`keymgr.hsm.templates.INDEX_KEY`: sensitive, never extractable, sign/verify only, not copyable);
it never leaves the token. A term is ``version || trunc_bits(mac)``, computed one of two ways
(docs/format.md, "Blind-index terms"):

* **Host subkeys** (``host_subkeys=True``, the default), the design of AWS's Database Encryption
  SDK for beacon keys: for each (version, context) the token derives once
  ``subkey = HMAC-SHA256(K_v, 0x03-domain || LP(name) || LP(context))`` (one C_Sign, audited as an
  ``index-subkey`` operation), and the host computes
  ``mac = HMAC-SHA256(subkey, 0x04-domain || LP(name) || bits || LP(parts)...)``. Subkeys stay in a
  bounded cache (:mod:`keymgr.fields.subkeys`: 300 s, 1,000 subkeys by default, the data-key
  cache's limits), zeroed on eviction, on rotation and on :meth:`BlindIndex.close`. A term costs a
  host HMAC (~1 µs) instead of a token call (~25 µs), which is what lets an indexed insert and a
  lookup keep up with the database (bench/fields.py). The exposure is that of a cached data key:
  whoever takes over the host reads the subkeys of the contexts it used, and can compute their
  terms until the index is rotated; never ``K_v``, never another context's subkey.
* **Token only** (``host_subkeys=False``): ``mac = HMAC-SHA256(K_v, 0x05-domain || LP(name) || bits
  || LP(context) || LP(parts)...)``, one C_Sign per term, for operators who want no index key
  material on the host at all. The two modes give **different terms** (a host HMAC under a subkey
  cannot equal a token HMAC under ``K_v``): every writer of an index must use one mode, and
  switching is a rotation and a re-encryption of the table (:mod:`keymgr.fields.bulk`).

The domain bytes 0x01 and 0x02 were the one-C_Sign terms of the first fields release; nothing
computes them any more, so a term of either mode never equals such an old term (but for a
truncation collision, which a lookup drops as a false positive after decrypting). Stored in a
column beside the ciphertext with an ordinary database index on it, a term finds the row by
equality; truncation makes several distinct values share a term (false positives the caller
drops after decrypting), which is what keeps the column from being a one-to-one map of the
values (docs/fields.md, "Choosing bits").

* **Normalisation** runs before the HMAC (``normalise=``; :func:`unicode_fold`, :func:`lowercase`,
  :func:`collapse_spaces`, :func:`digits_only`, :func:`chain`), so ``Alice@Example.com`` and
  ``ａｌｉｃｅ@example.com`` find each other. Bytes parts are indexed as they are.
* **Context**: ``term(value, context=...)`` binds a term to where it is stored (table, column,
  tenant: :func:`index_context`, which :class:`keymgr.fields.sql.EncryptedTable` passes), so
  equal values in two tenants or tables get unrelated terms.
* **Partial** indexes index a transformation of the value (``transform=last_digits(4)``);
  **compound** indexes take several parts (``term(("Smith", "1234"))``), each normalised,
  length-prefixed so that ("ab", "c") and ("a", "bc") differ.
* **Rotation**: :meth:`BlindIndex.rotate` makes version n+1 in the token; new terms use the
  newest version, and :meth:`BlindIndex.terms` gives one term per live version, so lookups
  during the transition query ``column IN (terms)`` and find rows written under either.
  After a re-encryption pass has rewritten every term (:mod:`keymgr.fields.bulk`), lookups
  may set ``min_version`` to stop querying the old one.

**Term cache** (token-only mode; under host subkeys a term costs what a cache slot does): a
partial index has few distinct inputs (10,000 last-four values), so terms
are kept in a bounded LRU (``cache``, default 10,000 entries) keyed by a host HMAC of the
normalised input under a random per-process key: the cache holds no plaintext, and grants
nothing the process cannot already do (it is logged in to the token and may compute any
term). It is dropped on rotation. ``cache=0`` turns it off.

**Only keys the token made**: a PIN holder can import an HMAC key whose value they know under
an index label (C_CreateObject), and every term computed with it could then be brute-forced
offline. So a key object is used only if it shows what only the token sets (CKA_LOCAL,
ALWAYS_SENSITIVE, NEVER_EXTRACTABLE) and what keymgr set and nobody can loosen (SENSITIVE,
not EXTRACTABLE, MODIFIABLE or COPYABLE, a 32-byte generic secret, the sign/verify roles of
:data:`~keymgr.hsm.templates.INDEX_KEY`, as :mod:`keymgr.keyring.provenance` checks KEK versions);
objects that fail are ignored, and a rotation that finds only such an object refuses.

Hosts sharing a token may each create the same version (no create-if-absent in PKCS#11):
both keys stay, writers use the one with the lowest CKA_ID, and :meth:`terms` queries both.
A rotation made by another process is seen within ``REFRESH_INTERVAL`` seconds (the versions
are re-read from the token, one scan of its secret keys): until then this process still
writes and looks up with the versions it knows, so a lookup may miss a row written under the
new version for at most that long (DESIGN.md, "Bounded staleness").
"""

from __future__ import annotations

import hmac
import os
import re
import struct
import threading
import time
import unicodedata
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

from keymgr import errors
from keymgr.fields.subkeys import SubkeyCache, SubkeyPolicy
from keymgr.hsm import objects
from keymgr.hsm.sessions import TokenSession
from keymgr.hsm.templates import INDEX_KEY, ROLE_ATTRIBUTES

__all__ = ["BlindIndex", "Normaliser", "Term", "bits_range", "chain", "collapse_spaces", "digits_only", "last_digits",
           "index_context", "lowercase", "unicode_fold", "INDEX_LABEL_PREFIX"]

Normaliser = Callable[[str], str]
#: One part of an indexed value: text (normalised) or bytes (indexed as they are).
Part = str | bytes
INDEX_LABEL_PREFIX = "keymgr-index/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Domain bytes 0x01 (unbound) and 0x02 (bound to a context) were the terms of the first fields
# release, one C_Sign each; they are never computed again, so no new term equals an old one.
#: What the token signs to derive the subkey of one (index, version, context): docs/format.md.
_SUBKEY_DOMAIN = b"keymgr-blind-index\x03"
#: A term computed on the host under a subkey (``host_subkeys=True``, the default).
_HOST_TERM_DOMAIN = b"keymgr-blind-index\x04"
#: A term computed in the token, one C_Sign each (``host_subkeys=False``).
_TOKEN_TERM_DOMAIN = b"keymgr-blind-index\x05"
#: Characters that render as nothing: stripped by :func:`unicode_fold` (zero-width space, joiners,
#: word joiner, byte-order mark, soft hyphen), so a pasted value finds the typed one.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_MAX_VERSION = 255
_ASCII_NON_DIGITS = str.maketrans("", "", "".join(chr(c) for c in range(128) if not "0" <= chr(c) <= "9"))
_LENGTH = struct.Struct(">I").pack
#: Seconds between two re-reads of an index's versions from the token.
REFRESH_INTERVAL = 30.0


def _unchanged(value: str) -> str:
    return value


def lowercase(value: str) -> str:
    return value.lower()


def collapse_spaces(value: str) -> str:
    """Leading and trailing whitespace removed, inner runs made one space."""
    return " ".join(value.split())


def unicode_fold(value: str) -> str:
    """NFKC, then case folding, zero-width characters removed: the Unicode forms a person reads
    as the same text (full-width ``ＡＬＩＣＥ``, ``ﬁ``, ``Straße``/``STRASSE``, a pasted zero-width
    space) give the same string, which :func:`lowercase` alone does not."""
    return unicodedata.normalize("NFKC", value.translate(_INVISIBLE)).casefold().translate(_INVISIBLE)


def digits_only(value: str) -> str:
    """The decimal digits of ``value`` as ASCII: full-width ``１`` and Arabic-Indic ``١`` count as
    ``1``; superscripts, circled digits and other non-decimal "digits" are dropped (``str.isdigit``
    would keep ``²``, which is no digit of a card or phone number)."""
    if value.isascii():  # the common case, 5x faster: in ASCII the decimal digits are 0-9 alone
        return value.translate(_ASCII_NON_DIGITS)
    out = []
    for ch in value:
        digit = unicodedata.decimal(ch, None)
        if digit is not None:
            out.append(str(digit))
    return "".join(out)


def last_digits(count: int) -> Normaliser:
    """A transformation for partial indexes: the last ``count`` decimal digits (card, phone),
    as :func:`digits_only` reads them."""
    if count < 1:
        raise errors.ConfigurationError("last_digits needs a count of at least 1")
    return lambda value: digits_only(value)[-count:]


def chain(*steps: Normaliser) -> Normaliser:
    """The normalisers applied in order."""
    def run(value: str) -> str:
        for step in steps:
            value = step(value)
        return value
    return run


def bits_range(distinct: int) -> tuple[int, int]:
    """(fewest, most) bits worth keeping for an index over ``distinct`` possible inputs (the rows'
    distinct values, or a partial index's input domain), per docs/fields.md "Choosing bits":
    at most the largest ``b`` with ``2**b < distinct``, so each term is expected to be shared by
    more than one value (``2**k`` values: ``k - 1`` bits, two values a term; CipherSweet's planner
    aims for at least two); at least ``ceil(log2 sqrt distinct)``, so a lookup returns fewer than
    ``sqrt(distinct)`` false positives. CipherSweet's planner gives (8, 15) for 50,000 rows; so does this."""
    if isinstance(distinct, bool) or not isinstance(distinct, int) or distinct < 4:
        raise errors.ConfigurationError("a blind index over fewer than 4 distinct values hides nothing")
    most = (distinct - 1).bit_length() - 1  # the largest b with 2^b < distinct
    least = 1
    while 4 ** least < distinct:  # smallest b with 2^b >= sqrt(distinct)
        least += 1
    return min(least, most), most


def index_key_failures(ts: TokenSession, key_id: bytes) -> list[str]:
    """Why the object under ``key_id`` is not an index key generated by the token (empty: it is)."""
    try:
        attrs = objects.key_attributes(ts, key_id).attributes
    except (errors.KeyNotFoundError, errors.PolicyError) as exc:
        return [str(exc)]
    wanted: dict[str, object] = {"LOCAL": True, "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True,
                                 "SENSITIVE": True, "EXTRACTABLE": False, "MODIFIABLE": False,
                                 "KEY_TYPE": "GENERIC_SECRET", "VALUE_LEN": 32}
    wanted.update({role: INDEX_KEY.attributes[role] for role in ROLE_ATTRIBUTES})
    if "COPYABLE" in attrs:
        wanted["COPYABLE"] = False
    return [f"CKA_{name} is {attrs.get(name)!r}, not {value!r}" for name, value in wanted.items()
            if attrs.get(name, False if isinstance(value, bool) else None) != value]


def _lp(raw: bytes) -> bytes:
    return _LENGTH(len(raw)) + raw


def _parts(value: object) -> list[str | bytes]:
    """A compound value's parts, each str or bytes; anything else is a :class:`ConfigurationError`
    (``term(5)`` or ``term(None)`` must not be a TypeError from deep inside)."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, (str, bytes)) for p in value):
        raise errors.ConfigurationError("a blind index takes a string or bytes, or a non-empty list or tuple of "
                                        "them (compound)")
    return list(value)


class Term(bytes):
    """A blind-index term as a :class:`BlindIndex` computed it (or a term column returned it):
    what :class:`keymgr.fields.sql.BlindIndexTerm` columns take, so plaintext written to a term
    column by mistake is refused, not stored in the clear."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Term({len(self)} bytes, version {self[0] if self else '?'})"


def _checked_context(context: object) -> bytes:
    """A term's context as bytes (what :func:`index_context` makes), or a ConfigurationError."""
    if isinstance(context, bytes | bytearray | memoryview):
        return bytes(context)
    raise errors.ConfigurationError(f"a blind index context is bytes (index_context(...)), not "
                                    f"{type(context).__name__}")


def index_context(*parts: str) -> bytes:
    """The context a term is bound to, from its parts (table, column, then extra names and values):
    length-prefixed, so no two part lists give the same bytes."""
    return b"".join(_lp(p.encode()) for p in parts)


def _label(name: str, version: int) -> str:
    return f"{INDEX_LABEL_PREFIX}{name}/v{version}"


_live_indexes: weakref.WeakSet[BlindIndex] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    """After fork, a lock another thread of the parent held stays held in the child: replace it
    (the subkeys have their own hook, :mod:`keymgr.fields.subkeys`)."""
    for index in list(_live_indexes):
        index._lock = threading.Lock()  # noqa: SLF001 - the class's own fork hook


os.register_at_fork(after_in_child=_new_locks_in_child)


class BlindIndex:
    """One named blind index on one token (made by :meth:`keymgr.KeyManager.blind_index`)."""

    def __init__(self, ts: TokenSession, *, name: str, bits: int, audited: Callable[..., AbstractContextManager[Any]],
                 normalise: Normaliser | None = None, transform: Normaliser | None = None,
                 min_version: int = 1, cache: int = 10_000, host_subkeys: bool = True,
                 subkeys: SubkeyPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not _NAME.match(name):
            raise errors.ConfigurationError(f"invalid blind index name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 256:
            raise errors.ConfigurationError("a blind index keeps 1 to 256 bits of its HMAC (an int)")
        if subkeys is not None and not isinstance(subkeys, SubkeyPolicy):
            raise errors.ConfigurationError(f"subkeys is a SubkeyPolicy, not {type(subkeys).__name__}")
        self._ts = ts
        self.name = name
        self.bits = bits
        self._audited = audited
        self._normalise = normalise or _unchanged
        self._transform = transform or _unchanged
        whole, rest = divmod(bits, 8)
        self._whole = whole
        #: The last kept byte of a MAC, masked to its leading ``rest`` bits, by its value.
        self._masked = tuple(bytes((b & (0xFF << (8 - rest)) & 0xFF,)) for b in range(256)) if rest else ()
        if isinstance(min_version, bool) or not isinstance(min_version, int) or min_version < 1:
            raise errors.ConfigurationError("min_version is a version number, at least 1")
        self._min_version = min_version
        self._lock = threading.Lock()
        _live_indexes.add(self)
        self._keys: dict[int, list[bytes]] = {}
        self._verdicts: dict[bytes, bool] = {}
        self._refreshed = 0.0
        self._named = _lp(name.encode()) + struct.pack(">H", bits)
        self.host_subkeys = bool(host_subkeys)
        self._subkeys = SubkeyCache(subkeys, clock=clock)
        self._cache_size = max(0, cache) if not self.host_subkeys else 0  # a host term costs what a slot does
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_key = os.urandom(32)
        self.refresh()
        if not self._keys:
            self._ensure(1)
        if min_version > self.version:  # every lookup would query no version and find nothing
            raise errors.ConfigurationError(f"blind index {name!r} has no version {min_version} "
                                            f"(newest: {self.version}); rotate it first")

    def __repr__(self) -> str:
        mode = "host subkeys" if self.host_subkeys else "token only"
        return f"BlindIndex({self.name!r}, bits={self.bits}, versions={sorted(self._keys)}, {mode})"

    @property
    def held_subkeys(self) -> int:
        """How many subkeys this index holds on the host now (0 in token-only mode)."""
        return len(self._subkeys)

    def expire(self) -> None:
        """Zero and drop the subkeys older than ``max_age`` now (every use of the index does so
        too): for a long-lived process that stops using an index for a while."""
        self._subkeys.expire()

    def close(self) -> None:
        """Zero and drop the subkeys held on the host (:meth:`keymgr.KeyManager.close` calls it);
        a later term derives them again."""
        self._subkeys.clear()
        with self._lock:
            self._cache.clear()

    def _forget_derived(self) -> None:
        """A rotation: no subkey or term of the old state stays on the host."""
        self._subkeys.clear()
        with self._lock:
            self._cache.clear()

    # -- keys ------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read which versions exist on the token (one scan of its secret keys)."""
        found: dict[int, list[bytes]] = {}
        prefix = f"{INDEX_LABEL_PREFIX}{self.name}/v"
        for label, key_id in objects.list_secret_keys(self._ts):
            if label.startswith(prefix) and label[len(prefix):].isdigit() and self._made_here(key_id):
                found.setdefault(int(label[len(prefix):]), []).append(key_id)
        with self._lock:
            if found or not self._keys:
                self._keys = {v: sorted(ids) for v, ids in found.items()}
            self._refreshed = time.monotonic()

    def _fresh(self) -> None:
        if time.monotonic() - self._refreshed > REFRESH_INTERVAL:
            before = self.version
            self.refresh()
            if self.version != before:
                self._forget_derived()

    def _made_here(self, key_id: bytes) -> bool:
        """Whether the object under ``key_id`` is an index key the token generated (checked once)."""
        verdict = self._verdicts.get(key_id)
        if verdict is None:
            verdict = self._verdicts[key_id] = not index_key_failures(self._ts, key_id)
        return verdict

    def _sound(self, ids: list[bytes], version: int) -> list[bytes]:
        sound = [key_id for key_id in ids if self._made_here(key_id)]
        if not sound:
            failures = "; ".join(index_key_failures(self._ts, ids[0])) if ids else "no key object"
            raise errors.PolicyError(f"blind index {self.name!r} version {version}: the key object under its label "
                                     f"was not generated by the token ({failures}); remove it and rotate again")
        return sound

    def _ensure(self, version: int) -> None:
        with self._audited("create", key=self.name, version=version, detail={"kind": "blind-index"}):
            ids = self._sound(objects.ensure_singleton_key(self._ts, INDEX_KEY, label=_label(self.name, version),
                                                           id_prefix=b"bidx"), version)
        with self._lock:
            self._keys[version] = ids

    @property
    def version(self) -> int:
        """The version new terms are computed with (the highest)."""
        return max(self._keys)

    @property
    def versions(self) -> list[int]:
        return sorted(v for v in self._keys if v >= self._min_version)

    def key_ids(self, version: int | None = None) -> list[bytes]:
        """CKA_IDs of a version's key objects (public; for `pkcs11-tool` checks and audits)."""
        return list(self._keys[self.version if version is None else version])

    def rotate(self) -> int:
        """Make version n+1 in the token and compute new terms with it; returns it."""
        self.refresh()
        new = self.version + 1
        if new > _MAX_VERSION:
            raise errors.PolicyError(f"blind index {self.name!r} has used all {_MAX_VERSION} versions")
        with self._audited("rotate", key=self.name, version=new, detail={"kind": "blind-index"}):
            ids = self._sound(objects.ensure_singleton_key(self._ts, INDEX_KEY, label=_label(self.name, new),
                                                           id_prefix=b"bidx"), new)
        with self._lock:
            self._keys[new] = ids
        self._forget_derived()
        return new

    # -- terms -----------------------------------------------------------------

    def normalised(self, value: Part | Sequence[Part]) -> tuple[str | bytes, ...]:
        """What the HMAC covers (transformed, normalised parts): equal for values that find each
        other, which is how a lookup drops the false positives truncation lets through. Text is
        transformed and normalised; bytes (an :class:`~keymgr.fields.sql.EncryptedBytes`
        column) are indexed as they are."""
        parts = [value] if isinstance(value, (str, bytes)) else _parts(value)
        return tuple(p if isinstance(p, bytes) else self._prepared(p) for p in parts)

    def _prepared(self, part: str) -> str:
        out = self._normalise(self._transform(part))
        if not isinstance(out, str):
            raise errors.ConfigurationError(f"blind index {self.name!r}: a normaliser returned "
                                            f"{type(out).__name__}, not str")
        return out

    def _message(self, value: Part | Sequence[Part], context: bytes = b"") -> bytes:
        """What the HMAC of a term covers: under a host subkey (already bound to the context)
        ``domain || LP(name) || bits || parts``; in the token ``domain || LP(name) || bits ||
        LP(context) || parts`` (docs/format.md, "Blind-index terms")."""
        try:
            if isinstance(value, str):  # the common case, without the tuple of parts
                parts = _lp(self._prepared(value).encode())
            else:
                parts = b"".join(_lp(p if isinstance(p, bytes) else p.encode()) for p in self.normalised(value))
        except UnicodeEncodeError:  # a lone surrogate; the error would carry the whole value
            raise errors.ConfigurationError(f"blind index {self.name!r}: a value is not valid Unicode "
                                            "(a lone surrogate)") from None
        if self.host_subkeys:
            return _HOST_TERM_DOMAIN + self._named + parts
        return _TOKEN_TERM_DOMAIN + self._named + _lp(context) + parts

    def _truncate(self, version: int, mac: bytes) -> bytes:
        return self._cut(version, [mac], bytes)[0]

    def _cut(self, version: int, macs: Sequence[bytes], marker: type[bytes]) -> list[bytes]:
        """Terms from whole MACs, as ``marker`` (:class:`Term`, or ``bytes``): the version byte,
        then the MAC's first ``bits`` bits (the last byte masked by a table lookup: a bulk insert
        cuts two terms a row)."""
        head, whole, masked = bytes((version,)), self._whole, self._masked
        if marker is bytes:
            if not masked:
                return [head + mac[:whole] for mac in macs]
            return [head + mac[:whole] + masked[mac[whole]] for mac in macs]
        if not masked:
            return [marker(head + mac[:whole]) for mac in macs]
        return [marker(head + mac[:whole] + masked[mac[whole]]) for mac in macs]

    def _term(self, version: int, key_id: bytes, message: bytes) -> bytes:
        return self._truncate(version, objects.hmac_sha256(self._ts, key_id, message))

    def _host_terms(self, version: int, key_id: bytes, context: bytes, messages: Sequence[bytes],
                    marker: type[bytes] = Term) -> list[bytes]:
        """Terms computed on the host under the subkey of (version, key, context)."""
        def derive() -> bytearray:
            with self._audited("index-subkey", key=self.name, version=version):
                return bytearray(objects.hmac_sha256(self._ts, key_id, _SUBKEY_DOMAIN + _lp(self.name.encode())
                                                     + _lp(context)))

        return self._cut(version, self._subkeys.macs((version, key_id, context), derive, messages), marker)

    def term(self, value: Part | Sequence[Part], *, context: bytes = b"") -> bytes:
        """The term to store for ``value`` (newest version). ``context`` binds the term to where
        it is stored (:func:`index_context`): equal values in two contexts get unrelated terms."""
        if value is None:
            raise errors.ConfigurationError(f"blind index {self.name!r}: no term for None (store NULL instead)")
        term = self.term_many([value], context=context)[0]
        if term is None:
            raise errors.ConfigurationError(f"blind index {self.name!r}: no term")
        return term

    def term_many(self, values: Sequence[Part | Sequence[Part] | None], *, context: bytes = b"",
                  marked: bool = True) -> list[bytes | None]:
        """:meth:`term` of each value (None for None), as one audited operation: what a bulk
        insert computes for a batch of rows. ``marked=False``: plain ``bytes``, not :class:`Term`
        (which a :class:`~keymgr.fields.sql.BlindIndexTerm` column refuses): what
        :meth:`~keymgr.fields.sql.EncryptedTable.insert_many` writes, through a copy of the table
        whose term columns take only what the codec computed itself."""
        context = _checked_context(context)
        self._fresh()
        messages = self._messages(values, context)
        version = self.version
        key_id = self._keys[version][0]
        with self._audited("index", key=self.name, version=version):
            marker = Term if marked else bytes
            if not self.host_subkeys:
                return [None if m is None else marker(self._cached_term(version, key_id, m)) for m in messages]
            if None not in messages:
                return list(self._host_terms(version, key_id, context, cast(list[bytes], messages), marker))
            computed = iter(self._host_terms(version, key_id, context, [m for m in messages if m is not None],
                                             marker))
            return [None if m is None else next(computed) for m in messages]

    def _messages(self, values: Sequence[Part | Sequence[Part] | None], context: bytes) -> list[bytes | None]:
        """:meth:`_message` of each value (None for None), the common case (one text part)
        written out: a bulk insert makes two a row."""
        start = (_HOST_TERM_DOMAIN + self._named if self.host_subkeys
                 else _TOKEN_TERM_DOMAIN + self._named + _lp(context))
        normalise, transform = self._normalise, self._transform
        out: list[bytes | None] = []
        try:
            for value in values:
                if value.__class__ is str:
                    part = normalise(value) if transform is _unchanged else normalise(transform(value))
                    if part.__class__ is str:
                        raw = part.encode()
                        out.append(start + _LENGTH(len(raw)) + raw)
                        continue
                out.append(None if value is None else self._message(value, context))
        except UnicodeEncodeError:  # a lone surrogate; the error would carry the whole value
            raise errors.ConfigurationError(f"blind index {self.name!r}: a value is not valid Unicode "
                                            "(a lone surrogate)") from None
        return out

    def _cached_term(self, version: int, key_id: bytes, message: bytes) -> bytes:
        if not self._cache_size:
            return self._term(version, key_id, message)
        slot = hmac.digest(self._cache_key, bytes((version,)) + message, "sha256")
        with self._lock:
            term = self._cache.get(slot)
        if term is None:
            term = self._term(version, key_id, message)
            with self._lock:
                self._cache[slot] = term
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return term

    def terms(self, value: Part | Sequence[Part], *, context: bytes = b"") -> list[bytes]:
        """Every term ``value`` may be stored under: one per live version (and per key, should two
        hosts have made the same version); query ``column IN (...)`` with them."""
        if value is None:
            raise errors.ConfigurationError(f"blind index {self.name!r}: no lookup for None (query IS NULL)")
        context = _checked_context(context)
        self._fresh()
        message = self._message(value, context)
        with self._audited("index", key=self.name, version=self.version):
            if not self.host_subkeys:
                return [Term(self._term(v, key_id, message)) for v in self.versions for key_id in self._keys[v]]
            return [self._host_terms(v, key_id, context, [message])[0]
                    for v in self.versions for key_id in self._keys[v]]

    def matches(self, term: bytes, value: Part | Sequence[Part], *, context: bytes = b"") -> bool:
        """Whether ``term`` is one of :meth:`terms` of ``value`` (constant-time comparison)."""
        if not isinstance(term, bytes | bytearray):
            raise errors.ConfigurationError(f"a blind index term is bytes, not {type(term).__name__}")
        return any(hmac.compare_digest(term, t) for t in self.terms(value, context=context))

