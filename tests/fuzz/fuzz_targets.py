"""Coverage-guided fuzzing of keymgr's parsers with atheris (libFuzzer for Python).

::

    python -m tests.fuzz.fuzz_targets TARGET [CORPUS_DIR ...] [libFuzzer flags]
    python -m tests.fuzz.fuzz_targets --list

TARGET is one of :data:`tests.fuzz.targets.TARGETS` (cms, stream, backup, request,
approval, transcript, uri, audit). keymgr is instrumented on import, the first
corpus directory (a temporary one if none is given) is filled with the seeds
keymgr's own writers produce (tests/fuzz/seeds.py), and every input goes
through :func:`tests.fuzz.targets.run_target`: an exception other than a
``KeymgrError`` is a crash, written to ``crash-*`` (``-artifact_prefix=``).
Useful flags: ``-runs=N``, ``-max_total_time=SECONDS``, ``-max_len=8192``,
``-timeout=10`` (a hang), ``-rss_limit_mb=1024`` (memory), ``-jobs=2``.
``scripts/fuzz.sh`` runs every target for a long time; the CI pass
(tests/security/test_fuzz_parsers.py) runs each for a bounded number of inputs.
"""

from __future__ import annotations

import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["keymgr", "asn1crypto"]):
    from tests.fuzz.seeds import write_corpus
    from tests.fuzz.targets import TARGETS, run_target


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        if len(argv) > 1 and argv[1] == "--list":
            print("\n".join(TARGETS))
            return
        sys.exit("usage: python -m tests.fuzz.fuzz_targets TARGET [CORPUS_DIR ...] [flags]; "
                 f"TARGET in {', '.join(TARGETS)}")
    name, rest = argv[1], argv[2:]
    corpora = [a for a in rest if not a.startswith("-")]
    if not corpora:
        corpora = [tempfile.mkdtemp(prefix=f"keymgr-fuzz-{name}-")]
        rest = [*rest, corpora[0]]
    write_corpus(name, corpora[0])

    def one_input(data: bytes) -> None:
        run_target(name, data)

    atheris.Setup([argv[0], *rest], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
