"""keymgr's public callables take no test-only parameter (issue 17: test-only code lives in tests/).

A leading-underscore parameter of a public function or method (``seal_message(_nonce=)``,
``encrypt_stream(_salt=, _prefix=)``, ``KeyManager(_clock=)``, ``transition(_shredding=)``: all
were there once) is a door any caller can open: a fixed GCM nonce, a key made to look younger,
a version marked destroyed without destroying it. Tests fix randomness and clocks from outside
(tests/_fixed_randomness.py, tests/_internals.clocked). Found by an outside review.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _public_functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(where, def) of every public function, and every public method (and ``__init__``) of a
    public class, in keymgr's public modules, read from the source."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for path in sorted((REPO / "keymgr").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in parts) or "cli" in parts:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                found.append((f"{'.'.join(parts)}.{node.name}", node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                found += [(f"{'.'.join(parts)}.{node.name}.{f.name}", f) for f in node.body
                          if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                          and (not f.name.startswith("_") or f.name == "__init__")]
    return found


def test_the_scan_sees_the_public_api() -> None:
    names = {where for where, _ in _public_functions()}
    assert {"keymgr.manager.KeyManager.__init__", "keymgr.envelope.cms.seal_message",
            "keymgr.envelope.stream.encrypt_stream", "keymgr.lifecycle.rotation.transition"} <= names


def test_no_public_callable_takes_a_test_only_parameter() -> None:
    hooks = sorted(f"{where}({arg.arg})" for where, fn in _public_functions()
                   for arg in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
                   if arg.arg.startswith("_") and not arg.arg.startswith("__"))
    assert not hooks, "test-only parameters in the public API:\n" + "\n".join(hooks)
