"""Masking: what a display, a log line or a restricted role may see of a sensitive value.

Data-protection rules commonly allow the first six and last four digits of a card number
(PCI DSS v4.0 requirement 3.4.1: at most BIN and last four displayed) and ask that the rest
be hidden. These helpers work on plaintext the caller already holds; to give a role masked
values *only*, give it no way to decrypt (docs/fields.md, "Masked-only roles"): the masked
form is computed by a service that can decrypt, or stored beside the ciphertext as its own
column (``mask_card(card)`` at insert) that the role may read while the encrypted column
and the key stay out of its reach.

Short values are masked whole: a helper never shows more than half of what it is given
(``mask("abcde")`` shows nothing, not ``*bcde``).
"""

from __future__ import annotations

import re

from keymgr import errors
from keymgr.fields.index import digits_only

__all__ = ["mask", "mask_card", "mask_email", "mask_phone", "trailing_digits"]

#: A card number inside text: 12 to 19 digits, single spaces or dashes between them.
_CARD_RUN = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){11,18}(?![0-9])")
_CARD_MIN = 12


def mask(value: str, *, keep_start: int = 0, keep_end: int = 4, char: str = "*") -> str:
    """``value`` with all but its first ``keep_start`` and last ``keep_end`` characters replaced
    by ``char``; a value shorter than twice what would be shown is masked whole, so at most
    half of it is ever visible."""
    if keep_start < 0 or keep_end < 0:
        raise errors.ConfigurationError("keep_start and keep_end must be >= 0")
    if not isinstance(char, str) or len(char) != 1:
        raise errors.ConfigurationError("the mask character must be exactly one character")
    if len(value) < 2 * (keep_start + keep_end):
        return char * len(value)
    return _hide(value, keep_start, keep_end, char)


def _hide(value: str, keep_start: int, keep_end: int, char: str = "*") -> str:
    hidden = len(value) - keep_start - keep_end
    return value[:keep_start] + char * hidden + value[len(value) - keep_end:]


def mask_card(card: str, *, keep_start: int = 4, keep_end: int = 4) -> str:
    """A card number in groups of four with the last four a group of their own,
    ``6222 **** **** 1234`` (19 digits: ``6222 **** **** *** 1234``); first four and last four
    shown by default, never more than six and four, and never fewer than six digits hidden.
    Only the card number is read: other numbers in the text (a CVV, an expiry date) are not
    shown. Text without a 12-19 digit run is masked whole."""
    found = _CARD_RUN.search(card)
    if found is None:
        return mask(card, keep_end=0)
    digits = digits_only(found.group())
    if len(digits) < _CARD_MIN:
        return "*" * len(digits)
    # at most six first and four last digits, and at least six digits hidden (a 12-digit number)
    keep_end = max(0, min(keep_end, 4))
    masked = _hide(digits, max(0, min(keep_start, 6, len(digits) - keep_end - 6)), keep_end)
    head, tail = masked[:-4], masked[-4:]
    return " ".join([head[i:i + 4] for i in range(0, len(head), 4)] + [tail])


def mask_email(email: str) -> str:
    """``j***@example.com``: the first character of the local part (when it has three or more)
    and the domain."""
    local, at, domain = email.partition("@")
    if not at:
        return mask(email, keep_end=0)
    return (local[:1] if len(local) >= 3 else "") + "***@" + domain


def mask_phone(phone: str) -> str:
    """Every digit but the last two hidden, punctuation kept: ``+** *** *** **45`` (a number of
    fewer than six digits: every digit hidden)."""
    total = sum(ch.isdigit() for ch in phone)
    keep = 2 if total >= 6 else 0
    seen = 0
    out = []
    for ch in phone:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen > total - keep else "*")
        else:
            out.append(ch)
    return "".join(out)


def trailing_digits(value: str, count: int = 4) -> str:
    """The last ``count`` decimal digits of ``value``, as a string (for display beside a mask).
    Not :func:`keymgr.fields.last_digits`, which makes a blind-index transformation."""
    return digits_only(value)[-count:] if count > 0 else ""
