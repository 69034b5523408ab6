"""Masking: what a display, a log line or a restricted role may see of a sensitive value.

Data-protection rules commonly allow the first six and last four digits of a card number
(PCI DSS v4.0 requirement 3.4.1: at most BIN and last four displayed) and ask that the rest
be hidden. These helpers work on plaintext the caller already holds; to give a role masked
values *only*, give it no way to decrypt (docs/fields.md, "Masked-only roles"): the masked
form is computed by a service that can decrypt, or stored beside the ciphertext as its own
column (``mask_card(card)`` at insert) that the role may read while the encrypted column
and the key stay out of its reach.
"""

from __future__ import annotations

__all__ = ["mask", "mask_card", "mask_email", "mask_phone", "last_digits"]


def _digits(value: str) -> str:
    return "".join(ch for ch in value if ch.isdigit())


def mask(value: str, *, keep_start: int = 0, keep_end: int = 4, char: str = "*") -> str:
    """``value`` with all but its first ``keep_start`` and last ``keep_end`` characters replaced
    by ``char``; a value too short to hide anything is masked whole."""
    if keep_start < 0 or keep_end < 0:
        raise ValueError("keep_start and keep_end must be >= 0")
    if len(value) <= keep_start + keep_end:
        return char * len(value)
    hidden = len(value) - keep_start - keep_end
    return value[:keep_start] + char * hidden + value[len(value) - keep_end:]


def mask_card(card: str, *, keep_start: int = 4, keep_end: int = 4) -> str:
    """A card number in groups of four, ``6222 **** **** 1234`` (first four, last four shown by
    default; at most six first digits and four last ones are ever shown)."""
    digits = _digits(card)
    masked = mask(digits, keep_start=min(keep_start, 6), keep_end=min(keep_end, 4))
    return " ".join(masked[i:i + 4] for i in range(0, len(masked), 4))


def mask_email(email: str) -> str:
    """``j***@example.com``: the first character of the local part and the domain."""
    local, at, domain = email.partition("@")
    if not at:
        return mask(email, keep_end=0)
    return (local[:1] + "***" if local else "***") + "@" + domain


def mask_phone(phone: str) -> str:
    """Every digit but the last two hidden, punctuation kept: ``+** *** *** **45``."""
    total = sum(ch.isdigit() for ch in phone)
    seen = 0
    out = []
    for ch in phone:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen > total - 2 else "*")
        else:
            out.append(ch)
    return "".join(out)


def last_digits(value: str, count: int = 4) -> str:
    """The last ``count`` digits of ``value`` (input to a partial blind index)."""
    return _digits(value)[-count:] if count > 0 else ""
