"""Wiping secrets from host memory: the one ``zero`` every module uses.

Key bytes, Shamir shares and PINs live in ``bytearray`` buffers so that they can be
overwritten in place once used; ``bytes`` cannot be, which is why secrets are copied
into a ``bytearray`` before use. Python may still have made copies (the interpreter,
OpenSSL's cipher contexts), so this narrows the window a secret sits in memory, as
much as Python allows; it is no guarantee.
"""

from __future__ import annotations

__all__ = ["zero"]

_ZEROS = bytes(64 * 1024)


def zero(buffer: bytearray | memoryview) -> None:
    """Overwrite ``buffer`` with zeros, 64 KiB at a time (no allocation the size of the buffer)."""
    view = memoryview(buffer).cast("B")
    if len(view) <= len(_ZEROS):  # keys, shares, segments up to 64 KiB: one in-place copy
        view[:] = _ZEROS[:len(view)]
        return
    for start in range(0, len(view), len(_ZEROS)):
        chunk = view[start:start + len(_ZEROS)]
        chunk[:] = _ZEROS[:len(chunk)]
