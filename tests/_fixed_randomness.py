"""Fixed randomness for format tests (golden files, determinism checks).

keymgr offers no way to choose a message's nonce or a stream's salt and nonce prefix: a
chosen nonce under a reused data key is the one mistake GCM does not survive. Tests that
need the same bytes twice replace the module's random source for one block instead; keys
still come from the real ``os.urandom`` (only ``keymgr.envelope.stream``'s reference to
``os`` and ``keymgr.envelope.cms``'s ``random_nonce`` are replaced).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import pytest

from keymgr.envelope import cms, stream


@contextlib.contextmanager
def fixed_message_nonce(nonce: bytes) -> Iterator[None]:
    """Every message sealed in the block uses ``nonce``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cms, "random_nonce", lambda: bytes(nonce))
        yield


@contextlib.contextmanager
def fixed_stream_randomness(salt: bytes, prefix: bytes) -> Iterator[None]:
    """Every stream written in the block uses ``salt`` and ``prefix``."""
    chosen = {len(salt): bytes(salt), len(prefix): bytes(prefix)}
    assert len(chosen) == 2 and set(chosen) == {stream.SALT_SIZE, stream.PREFIX_SIZE}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream, "os", types.SimpleNamespace(urandom=lambda n: chosen[n]))
        yield
