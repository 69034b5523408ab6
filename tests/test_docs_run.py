"""The docs run as written: every shell block and Python snippet of README.md and docs/*.md.

Each document is read top to bottom and its ```sh / ```bash / ```shell / ```console and
```python blocks are run in order, as a reader would after ``scripts/setup.sh``: on a fresh
home (``HOME`` and the XDG directories in a temporary directory, so ``keymgr init`` makes a
new local token; documents other than README.md and getting-started.md run after ``keymgr
init``, as their readers have followed getting-started), in a working directory of their own
where ``.venv`` is the environment running the tests, with keymgr from this checkout. Shell blocks run with ``bash -euo
pipefail`` (a ```console block runs its ``$ `` lines); Python blocks with this interpreter.

A block that cannot run here (it needs hardware, a production HSM, a path that is the
reader's own, or it is a long ceremony) is marked on the line just before it with::

    <!-- docs-test: skip (needs a YubiKey) -->

and is listed, with its reason, in the output of :func:`test_doc_runs`. Any other block that
fails fails the test, with its document, line and output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

#: every test here is slow (every shell and Python block of the docs, run on a fresh HOME):
#: `pytest -m "not slow"` skips the module, CI runs it
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
RUN_LANGUAGES = SHELL_LANGUAGES | {"python"}
SKIP_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
#: Seconds one block may take (the slowest, a quickstart of a dozen commands, takes a few).
BLOCK_TIMEOUT = 60


@dataclass(frozen=True)
class Block:
    """One fenced block of a document, and whether it is marked to be skipped."""

    doc: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: str | None

    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    """The runnable blocks of ``doc`` in order (fences indented in lists included)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.group("indent"), opening.group("lang")
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if language in RUN_LANGUAGES:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[index + 1:end]]
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            mark = SKIP_MARK.match(previous)
            found.append(Block(doc, index + 1, language, "\n".join(body) + "\n",
                               mark.group("reason") if mark else None))
        index = end + 1
    return found


def _command_of(block: Block) -> tuple[list[str], str]:
    if block.language == "python":
        return [sys.executable, "-"], block.code
    code = block.code
    if block.language == "console":
        code = "".join(line[2:] + "\n" for line in code.splitlines() if line.startswith("$ "))
    return ["bash", "-euo", "pipefail", "-s"], code


def _fresh_home(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment as a new user's, and the working directory the blocks run in."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    for directory in (home, work):
        directory.mkdir()
    (work / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYMGR_", "XDG_", "SOFTHSM2_", "PYTEST_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"), XDG_STATE_HOME=str(home / ".local/state"),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               PYTHONPATH=str(REPO), PATH=os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")]))
    return env, work


#: Documents that begin from nothing (they make the local token themselves); every other one is
#: read by someone who has followed docs/getting-started.md, so it runs after ``keymgr init``.
FROM_SCRATCH = {"README.md", "getting-started.md"}


def _prepare(doc: Path, env: dict[str, str], work: Path) -> None:
    if doc.name in FROM_SCRATCH:
        return
    proc = subprocess.run([sys.executable, "-m", "keymgr", "init"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr


def _every_doc_block() -> list[Block]:
    return [block for doc in DOCS for block in blocks_of(doc)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_runs(doc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run the document's blocks in order on a fresh home; every unmarked block must succeed."""
    env, work = _fresh_home(tmp_path)
    _prepare(doc, env, work)
    failures, skipped = _run_blocks(blocks_of(doc), env, work)
    with capsys.disabled():
        for line in skipped:
            print(f"\ndocs-test skipped {line}", end="")
    assert not failures, "\n\n".join(failures)


def test_the_docs_run_in_the_order_a_reader_follows(tmp_path: Path) -> None:
    """One home, in a new reader's order: README's "Two commands" (scripts/demo.sh: its Python part,
    examples/quickstart.py, makes the local token and the key ``orders``), then README's quickstart
    and snippet, then getting-started: no block may trip on what an earlier one made."""
    env, work = _fresh_home(tmp_path)
    demo = subprocess.run([str(work / ".venv" / "bin" / "python"), str(REPO / "examples" / "quickstart.py")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, check=False)
    assert demo.returncode == 0, demo.stderr
    assert "scripts/setup.sh" in (REPO / "scripts" / "demo.sh").read_text()
    assert "examples/quickstart.py" in (REPO / "scripts" / "demo.sh").read_text()  # what the demo runs
    blocks = blocks_of(REPO / "README.md") + blocks_of(REPO / "docs" / "getting-started.md")
    failures, _ = _run_blocks(blocks, env, work)
    assert not failures, "\n\n".join(failures)


def _run_blocks(blocks: list[Block], env: dict[str, str], work: Path) -> tuple[list[str], list[str]]:
    """Run the unmarked ``blocks`` in order; what failed (with output) and what was skipped (why)."""
    failures: list[str] = []
    skipped: list[str] = []
    for block in blocks:
        if block.skip_reason is not None:
            skipped.append(f"{block.where()} ({block.language}): {block.skip_reason}")
            continue
        command, stdin = _command_of(block)
        try:
            proc = subprocess.run(command, input=stdin, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            failures.append(f"{block.where()}: still running after {BLOCK_TIMEOUT} s")
            continue
        if proc.returncode != 0:
            failures.append(f"{block.where()} ({block.language}) exited {proc.returncode}:\n{block.code}"
                            f"--- stdout:\n{proc.stdout[-2000:]}--- stderr:\n{proc.stderr[-3000:]}")
    return failures, skipped


def test_every_skip_mark_says_why_and_marks_a_block() -> None:
    """A skip mark has a reason and sits right before a runnable block (not a stray comment)."""
    marked = {(b.doc, b.line) for b in _every_doc_block() if b.skip_reason is not None}
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if "docs-test:" not in line:
                continue
            assert SKIP_MARK.match(line), f"{doc.relative_to(REPO)}:{number}: malformed docs-test mark"
            following = next(i for i in range(number, len(lines)) if lines[i].strip())
            assert (doc, following + 1) in marked, f"{doc.relative_to(REPO)}:{number}: the mark marks no block"


def test_the_extractor_finds_blocks() -> None:
    """The docs do hold runnable blocks (a broken extractor would make every doc pass)."""
    blocks = _every_doc_block()
    readme = [b for b in blocks if b.doc.name == "README.md"]
    assert any("keymgr init" in b.code for b in readme if b.skip_reason is None)
    assert any(b.language == "python" and b.skip_reason is None for b in readme)
    assert len([b for b in blocks if b.skip_reason is None]) >= 8
