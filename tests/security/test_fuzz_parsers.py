"""The CI fuzz pass: every parser of untrusted bytes, property-based and coverage-guided.

Parsers: CMS messages (parse and open), stream headers and segments, backup
files, approval requests, approvals, transcripts, ``pkcs11:`` URIs, audit lines
(tests/fuzz/targets.py). For each:

* hypothesis feeds it mutations of real inputs (seeds made by keymgr's own
  writers, tests/fuzz/seeds.py: bit flips, byte edits, insertions, deletions,
  duplications, truncations, splices with other formats) and random bytes;
  only a ``KeymgrError`` may escape, each input must finish within
  :data:`TIME_LIMIT` seconds (a SIGALRM stops a hang), and peak memory (tracemalloc) must stay within
  :func:`memory_bound`;
* atheris runs each target for :data:`ATHERIS_RUNS` inputs in a subprocess (the
  same harness ``scripts/fuzz.sh`` runs for hours), failing on a crash, a hang
  (``-timeout``) or memory beyond ``-rss_limit_mb``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgr.envelope.stream import MAX_SEGMENT_SIZE
from tests.fuzz.seeds import seeds
from tests.fuzz.targets import TARGETS, run_target

ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT = 5.0
ATHERIS_RUNS = int(os.environ.get("KEYMGR_FUZZ_RUNS", "4000"))
EXAMPLES = int(os.environ.get("KEYMGR_FUZZ_EXAMPLES", "400"))
_INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x81", b"\x82\xff\xff", b"\x84\xff\xff\xff\xff", b"\"", b"\\",
                b"{", b"[", b"%", b"%zz", b"\xed\xa0\x80", b"1e999", b"-0", b"\x30\x80", b"null", b"\xa1\x00")


def memory_bound(target: str, data: bytes) -> int:
    """Peak bytes a parser may allocate for ``data``: proportional to the input, plus, for a stream,
    the two segment buffers its header may claim (at most MAX_SEGMENT_SIZE each, docs/format.md)."""
    bound = 8 * 1024 * 1024 + 200 * len(data)
    return bound + (2 * (MAX_SEGMENT_SIZE + 16) if target == "stream" else 0)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"a parser ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(target: str, data: bytes) -> None:
    """The fuzz contract for one input (module docstring)."""
    tracemalloc.start()
    try:
        with time_limit(TIME_LIMIT):
            run_target(target, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= memory_bound(target, data), f"{target}: {peak} bytes for a {len(data)}-byte input"


@st.composite
def mutated(draw: st.DrawFn, target: str) -> bytes:
    """A seed of ``target`` with 1-4 mutations (what libFuzzer's mutators do, in miniature). Positions
    come from a hypothesis-seeded ``Random``: uniform over the input, not biased to its first bytes."""
    rnd = draw(st.randoms(use_true_random=False))
    data = bytearray(rnd.choice(seeds()[target]))
    everything = [s for group in seeds().values() for s in group]
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randrange(len(data)) if data else 0
        kind = rnd.choice(_KINDS)
        if kind == "flip" and data:
            data[at] ^= 1 << rnd.randrange(8)
        elif kind == "set" and data:
            data[at] = rnd.randrange(256)
        elif kind == "insert":
            data[at:at] = rnd.randbytes(rnd.randint(1, 16))
        elif kind == "delete":
            del data[at:at + rnd.randint(1, 64)]
        elif kind == "duplicate":
            data[at:at] = data[at:at + rnd.randint(1, 64)]
        elif kind == "truncate":
            del data[at:]
        elif kind == "splice":
            other = rnd.choice(everything)
            data[at:] = other[rnd.randint(0, len(other)):]
        else:
            data[at:at + rnd.randint(0, 4)] = rnd.choice(_INTERESTING)
    return bytes(data)


#: Mutation kinds, weighted: in-place edits keep DER lengths and JSON syntax intact more often, so they go deeper.
_KINDS = ("flip",) * 4 + ("set",) * 3 + ("magic",) * 2 + ("insert", "delete", "duplicate", "truncate", "splice")
_JSON_FORMATS = ("backup", "request", "approval", "audit")
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=3), max_leaves=8)


@st.composite
def json_mutated(draw: st.DrawFn, target: str) -> bytes:
    """A JSON seed with one to three values replaced, keys removed or added, re-encoded canonically
    (so the bytes stay JSON and the parser's field checks, not json.loads, do the refusing)."""
    from keymgr._canonical import canonical_json as canonical

    rnd = draw(st.randoms(use_true_random=False))
    doc = json.loads(rnd.choice(seeds()[target]))
    for _ in range(rnd.randint(1, 3)):
        node = doc
        while isinstance(node, (dict, list)) and node and rnd.random() < 0.7:
            key = rnd.choice(sorted(node) if isinstance(node, dict) else range(len(node)))
            if not isinstance(node[key], (dict, list)) or not node[key]:
                break
            node = node[key]
        if isinstance(node, dict) and node:
            key = rnd.choice(sorted(node))
            action = rnd.choice(("replace", "replace", "replace", "delete", "add"))
            if action == "replace":
                node[key] = draw(_json)
            elif action == "delete":
                del node[key]
            else:
                node[draw(st.text(max_size=8))] = draw(_json)
        elif isinstance(node, list) and node:
            node[rnd.randrange(len(node))] = draw(_json)
    try:
        return canonical(doc)
    except ValueError:  # NaN / infinity: not JSON
        return json.dumps(doc).encode()


_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("target", list(TARGETS))
def test_seeds_are_valid_inputs(target: str) -> None:
    """Every seed parses (so mutations start deep inside the format), and the targets reach the end."""
    assert seeds()[target]
    for data in seeds()[target]:
        TARGETS[target](data)


def fuzz(target: str, inputs: st.SearchStrategy[bytes], examples: int = EXAMPLES) -> None:
    """Run :func:`check` on ``examples`` inputs drawn from ``inputs``."""
    @settings(_SETTINGS, max_examples=examples)
    @given(inputs)
    def property_(data: bytes) -> None:
        check(target, data)

    property_()


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_mutated_inputs_raise_only_keymgr_errors(target: str) -> None:
    fuzz(target, mutated(target))


@pytest.mark.slow
@pytest.mark.parametrize("target", _JSON_FORMATS)
def test_mutated_documents_raise_only_keymgr_errors(target: str) -> None:
    fuzz(target, json_mutated(target))


@pytest.mark.parametrize("target", list(TARGETS))
def test_random_bytes_raise_only_keymgr_errors(target: str) -> None:
    fuzz(target, st.binary(max_size=4096), max(EXAMPLES // 3, 10))


def test_the_contract_catches_a_foreign_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is live: a parser that raises KeyError, hangs or hoards memory fails the check."""
    nothing: dict[str, None] = {}
    monkeypatch.setitem(TARGETS, "audit", lambda data: nothing["missing"])
    with pytest.raises(KeyError):
        check("audit", b"{}")
    limit = TIME_LIMIT
    monkeypatch.setitem(TARGETS, "audit", lambda data: __import__("time").sleep(1.0))
    monkeypatch.setattr(sys.modules[__name__], "TIME_LIMIT", 0.2)
    with pytest.raises(TimeoutError):
        check("audit", b"{}")
    # the full limit again: allocating 64 MiB under tracemalloc can take longer than 0.2 s on a busy machine
    monkeypatch.setattr(sys.modules[__name__], "TIME_LIMIT", limit)
    monkeypatch.setitem(TARGETS, "audit", lambda data: bytearray(64 * 1024 * 1024))
    with pytest.raises(AssertionError, match="bytes for a"):
        check("audit", b"{}")


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_atheris_short_pass(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_targets", target, str(tmp_path / "corpus"), f"-runs={ATHERIS_RUNS}",
         "-max_len=8192", "-timeout=10", "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", "-seed=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    tail = "\n".join(result.stderr.splitlines()[-25:])
    assert result.returncode == 0, tail
    assert f"Done {ATHERIS_RUNS} runs" in result.stderr, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), tail
