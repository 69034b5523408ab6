"""A parsed CMS message, and the shapes that let a repeated message skip the full parse.

:class:`ParsedMessage` is what :func:`keymgr.envelope.cms.parse_message` returns.
:class:`MessageShape` is a message that parsed with the contents of its
per-message OCTET STRINGs cut out; ``SHAPES`` keeps one per message length,
so that a service's stream of messages under one key and context (which
differ only in those contents) is read by comparing bytes. The argument for
why that gives exactly the full parse is in :class:`MessageShape`'s docstring;
tests/envelope/test_envelope_fastpaths.py holds it to the full parse on every shape
and on every single-byte edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from keymgr.envelope import _der
from keymgr.envelope._aead import COMMITMENT_SIZE, NONCE_SIZE, TAG_SIZE
from keymgr.envelope._attrs import OID_DATA, AuthAttributes
from keymgr.envelope.recipients import ParsedRecipients

__all__ = ["ParsedMessage", "MessageParts", "MessageShape", "SHAPES", "SHAPES_MAX"]

T = TypeVar("T")


@dataclass(frozen=True)
class ParsedMessage:
    """A message's parts, read without any key. ``auth_attrs`` is None for compat messages."""

    #: loaded into asn1crypto on first use; ``recipient_infos.der`` holds each one's DER
    recipient_infos: ParsedRecipients
    content_type: str
    nonce: bytes
    icv_length: int
    auth_attrs: AuthAttributes | None
    encrypted_content: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    #: the message and where each AuthEnvelopedData field sits in it, for :func:`replace_recipients`
    _layout: tuple[bytes, dict[str, _der.Tlv]] = field(repr=False, compare=False)

    @property
    def _fields(self) -> dict[str, bytes]:
        """The raw DER of each AuthEnvelopedData field (cut out only when asked: rewrap asks)."""
        data, spans = self._layout
        return {name: data[t.start:t.end] for name, t in spans.items()}

    @property
    def aad(self) -> bytes:
        return b"" if self.auth_attrs is None else self.auth_attrs.aad

    @property
    def context(self) -> dict[str, str] | None:
        return None if self.auth_attrs is None else self.auth_attrs.context

    @property
    def commitment(self) -> bytes | None:
        return None if self.auth_attrs is None else self.auth_attrs.commitment


#: (context found or None, commitment or None, each recipient's DER, nonce, ciphertext || tag, AAD);
#: the context is the shape's own dict: copy it before handing it out
MessageParts = tuple[dict[str, str] | None, bytes | None, tuple[bytes, ...], bytes, bytes, bytes]


@dataclass(frozen=True)
class MessageShape:
    """A message that parsed, with the contents of its per-message OCTET STRINGs cut out:
    each recipient's body, the nonce, the ciphertext, the key commitment and the tag.

    Why a message equal to it outside those spans parses to the same structure: the
    parse reads tags and lengths, which are all in the kept bytes (a recipient's own
    header included; the parse only frames recipients, the token glue reads them),
    and compares bytes that are kept; it never looks inside the cut contents but for
    their lengths, which the kept headers fix. The commitment's place is the one the
    attribute parser found (not a search). The result takes every cut value from the
    new message; no secret is kept here (the wrapped keys and the commitment are cut).
    """

    kept: tuple[tuple[int, bytes], ...]
    recipients: tuple[tuple[int, int], ...]
    nonce_at: int
    content: tuple[int, int]
    mac_at: int
    attrs: AuthAttributes | None
    attrs_at: tuple[int, int] | None
    aad_head: bytes
    fields: dict[str, _der.Tlv]

    @classmethod
    def of(cls, parsed: ParsedMessage, *, nonce_at: int) -> MessageShape:
        """The shape of ``parsed`` (a full parse), whose content nonce starts at ``nonce_at``."""
        data, f = parsed._layout  # noqa: SLF001 - our own dataclass
        recipients, pos = [], f["recipient_infos"].body
        cut = []
        for der in parsed.recipient_infos.der:
            item = _der.read_at(data, pos, pos + len(der))
            recipients.append((item.start, item.end))
            cut.append((item.body, item.end))
            pos = item.end
        content = f["content"]
        cipher = (content.end - len(parsed.encrypted_content), content.end)
        cut += [(nonce_at, nonce_at + NONCE_SIZE), cipher, (f["mac"].body, f["mac"].end)]
        attrs, attrs_at = parsed.auth_attrs, None
        if attrs is not None:
            attrs_at = (f["auth_attrs"].body, f["auth_attrs"].end)
            if attrs.commitment_at is not None:
                cut.append((attrs.commitment_at, attrs.commitment_at + COMMITMENT_SIZE))
        kept, at = [], 0
        for start, end in sorted(cut):
            if start > at:
                kept.append((at, data[at:start]))
            at = max(at, end)
        if at < len(data):
            kept.append((at, data[at:]))
        aad_head = b"" if attrs_at is None else _der.header(_der.SET, attrs_at[1] - attrs_at[0])
        return cls(tuple(kept), tuple(recipients), nonce_at, cipher, f["mac"].body, attrs, attrs_at, aad_head, f)

    def fits(self, data: bytes) -> bool:
        """Whether ``data`` (of this shape's length: the caller checked) has this shape."""
        for at, kept in self.kept:  # noqa: SIM110 - a loop: all() over a generator costs twice as much here
            if not data.startswith(kept, at):
                return False
        return True

    def _attrs_of(self, data: bytes) -> tuple[bytes, bytes | None]:
        """The AAD and the key commitment of ``data`` (which :meth:`fits`); (b"", None) for a
        message without attributes."""
        attrs = self.attrs
        if attrs is None or self.attrs_at is None:
            return b"", None
        body, end = self.attrs_at
        commit = attrs.commitment_at
        return self.aad_head + data[body:end], None if commit is None else data[commit:commit + COMMITMENT_SIZE]

    def parts(self, data: bytes) -> MessageParts:
        """What decrypting ``data`` (which :meth:`fits`) needs, cut from it by position: the
        same values :meth:`read` puts in a :class:`ParsedMessage`, without building one."""
        aad, commitment = self._attrs_of(data)
        context = None if self.attrs is None else self.attrs.context
        start, end = self.content
        recipients = self.recipients
        if len(recipients) == 1:
            (first, last), = recipients
            ders: tuple[bytes, ...] = (data[first:last],)
        else:
            ders = tuple([data[a:b] for a, b in recipients])
        nonce, mac = self.nonce_at, self.mac_at
        sealed = data[start:end] + data[mac:mac + TAG_SIZE]
        return context, commitment, ders, data[nonce:nonce + NONCE_SIZE], sealed, aad

    def read(self, data: bytes) -> ParsedMessage | None:
        """``data`` parsed, if it has this shape (the caller checked its length); else None."""
        if not self.fits(data):
            return None
        attrs = self.attrs
        if attrs is not None and self.attrs_at is not None:
            aad, commitment = self._attrs_of(data)
            attrs = _frozen(AuthAttributes, {
                "aad": aad, "context": None if attrs.context is None else dict(attrs.context),
                "commitment": commitment, "content_type": attrs.content_type, "other": attrs.other,
                "commitment_at": attrs.commitment_at})
        return _frozen(ParsedMessage, {
            "recipient_infos": ParsedRecipients([data[start:end] for start, end in self.recipients]),
            "content_type": OID_DATA, "nonce": data[self.nonce_at:self.nonce_at + NONCE_SIZE],
            "icv_length": TAG_SIZE, "auth_attrs": attrs, "encrypted_content": data[self.content[0]:self.content[1]],
            "mac": data[self.mac_at:self.mac_at + TAG_SIZE], "_layout": (data, self.fields)})


def _frozen(cls: type[T], values: dict[str, object]) -> T:
    """An instance of the frozen dataclass ``cls`` with every field in ``values``, without the
    generated ``__init__``'s ``object.__setattr__`` per field (half of a shape read's cost)."""
    obj = object.__new__(cls)
    obj.__dict__.update(values)
    return obj


#: Shapes of messages read before, one per message length (see :class:`MessageShape`).
SHAPES: dict[int, MessageShape] = {}
SHAPES_MAX = 256
