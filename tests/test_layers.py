"""The layer rule, read from the imports: a folder of keymgr/ imports only the layers below it.

``ls keymgr/`` shows the architecture (docs/architecture.md); this test keeps it true. Every
``import`` and ``from ... import`` of every module under keymgr/ is read with :mod:`ast`,
at module level and inside functions (lazy imports are dependencies too), ``if TYPE_CHECKING``
blocks included. A unit (a folder, or the base modules) may import itself and any unit of a
lower layer; a unit of the same layer (a peer) or of a higher one is an upward import and
fails the test, naming the file, the line and the target.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

KEYMGR = Path(__file__).resolve().parent.parent / "keymgr"

#: Bottom to top. Each layer is a tuple of peer units, each unit a tuple of top-level names
#: under keymgr/ (a folder, or a module without ``.py``). Peers do not import one another.
LAYERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    # base: the error tree, the process plumbing the CLI shares (files, interrupts, terminal) and
    # private helpers every layer may use (no token, no format)
    (("errors", "_canonical", "_certs", "_memory", "_time", "files", "interrupts", "oplog", "terminal"),),
    # the token (only hsm imports pkcs11) and the token-free envelope formats
    (("hsm",), ("envelope",)),
    # named keys and their versions, stored on the token
    (("keyring",),),
    # who can open a data key: KEKs on the token, public keys, token key pairs
    (("recipients",),),
    # the audit log (custody and the manager record into it) and rewrap, independent of each other
    (("audit",), ("rewrap",)),
    # custodians, shares, approvals, ceremonies
    (("custody",),),
    # field encryption (uses rewrap) and the lifecycle (destroy needs custody and rewrap)
    (("fields",), ("lifecycle",)),
    # the safe API
    (("manager",),),
    # the command line and its entry point
    (("cli", "__main__"),),
    # the kept ``keymgr.local`` (re-exports keymgr.hsm.local for 0.1.0 code): nothing imports it
    (("local",),),
)

#: keymgr/__init__.py is the package's face, in no layer: ``from keymgr import KeyManager`` is an
#: import of the module the name is loaded from (its ``_LAZY`` map), an error class is from errors.
FACE = "__init__"


@dataclass(frozen=True)
class Place:
    layer: int
    unit: tuple[str, ...]


def places() -> dict[str, Place]:
    return {name: Place(i, unit) for i, layer in enumerate(LAYERS) for unit in layer for name in unit}


@dataclass(frozen=True)
class Import:
    """One imported name: ``from keymgr.x import y`` is ``keymgr.x.y``."""

    file: Path
    line: int
    target: str  # dotted module (or module.attribute) name


def top_name(root: Path, path: Path) -> str:
    """The layer name of a file: its folder under keymgr/, or its module name."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports_in(root: Path, path: Path) -> list[Import]:
    """Every keymgr import in a file, at any depth (functions, ``if TYPE_CHECKING``), also the
    forms that are no import statement: ``importlib.import_module("keymgr.x")`` /
    ``__import__``, ``from keymgr import *`` (everything the face exports) and
    ``keymgr.Name`` after a bare ``import keymgr`` (the face loads ``Name`` lazily)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = list(path.relative_to(root.parent).with_suffix("").parts)
    package = module[:-1]  # what a relative import is relative to (an __init__'s own package)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # ``from keymgr import cli`` imports keymgr.cli: each name is a target
            for alias in node.names:
                if alias.name == "*" and source == "keymgr":
                    found += [Import(path, node.lineno, f"keymgr.{name}") for name in lazy_names(root)]
                else:
                    found.append(Import(path, node.lineno, f"{source}.{alias.name}"))
        elif isinstance(node, ast.Call) and _dynamic_import(node) is not None:
            found.append(Import(path, node.lineno, _dynamic_import(node) or ""))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "keymgr"
              and node.attr in lazy_names(root)):
            found.append(Import(path, node.lineno, f"keymgr.{node.attr}"))
    return [i for i in found if i.target == "keymgr" or i.target.startswith("keymgr.")]


def _dynamic_import(call: ast.Call) -> str | None:
    """The module an ``import_module("keymgr...")`` / ``__import__("keymgr...")`` call names;
    one whose name is not a literal is reported as ``keymgr.?`` (in no layer: it fails)."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if name not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value if first.value.startswith("keymgr") else None
    if (isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant)
            and str(first.values[0].value).startswith("keymgr.")):
        return str(first.values[0].value).rstrip(".")  # f"keymgr.custody.{module}": a module of that package
    return "keymgr.?"


def lazy_names(root: Path) -> dict[str, str]:
    """keymgr/__init__.py's ``_LAZY``: public name -> the module it is loaded from."""
    init = root / "__init__.py"
    tree = ast.parse(init.read_text()) if init.exists() else ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            value: dict[str, str] = ast.literal_eval(node.value)
            return value
    return {}


def target_name(root: Path, target: str) -> str:
    """The top-level name under keymgr/ an import reaches; a name of the package's face is
    followed to where it is defined (``from keymgr import KeyRecord`` reaches keyring/)."""
    parts = target.split(".")
    if len(parts) == 1:
        return "errors"  # ``import keymgr`` alone loads the face and the error tree, nothing else
    name = parts[1]
    if (root / name / "__init__.py").exists() or (root / f"{name}.py").exists():
        return name
    defined_in = lazy_names(root).get(name)
    if defined_in:
        return defined_in.split(".")[1]
    if _face_defines(root, name):
        return "errors"  # the error classes and __version__, which the face itself holds
    return f"? ({name} is no module of keymgr and no name its face exports)"


def _face_defines(root: Path, name: str) -> bool:
    """Whether keymgr/__init__.py itself binds ``name`` (an import into it, or an assignment)."""
    init = root / "__init__.py"
    if not init.exists():
        return False
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom | ast.Import) and any((a.asname or a.name) == name for a in node.names):
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def upward_imports(root: Path = KEYMGR) -> list[str]:
    where = places()
    problems = []
    for path in sorted(root.rglob("*.py")):
        if path == root / f"{FACE}.py":
            continue
        here = where[top_name(root, path)]
        for imp in imports_in(root, path):
            there = where.get(target_name(root, imp.target))
            file = f"{path.relative_to(root.parent)}:{imp.line}"
            if there is None:
                problems.append(f"{file}: imports {imp.target}, which is in no layer")
            elif there.unit != here.unit and there.layer >= here.layer:
                kind = "a peer" if there.layer == here.layer else "a higher layer"
                problems.append(f"{file}: imports {imp.target} ({kind}: {'/'.join(there.unit)} is layer "
                                f"{there.layer}, {'/'.join(here.unit)} is layer {here.layer})")
    return problems


def test_every_folder_and_module_of_keymgr_has_a_layer() -> None:
    where = places()
    entries = {p.stem if p.is_file() else p.name for p in KEYMGR.iterdir()
               if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert sorted(entries - where.keys()) == [FACE]
    assert sorted(where.keys() - entries) == []  # the list names nothing that is gone


def test_no_module_imports_a_peer_or_a_higher_layer() -> None:
    problems = upward_imports()
    assert not problems, "upward imports (docs/architecture.md):\n" + "\n".join(problems)


@pytest.mark.parametrize(("code", "expected"), [
    ("def f():\n    from keymgr.manager import KeyManager\n", "imports keymgr.manager.KeyManager (a higher layer"),
    ("from keymgr import KeyManager\n", "imports keymgr.KeyManager (a higher layer"),
    ("from keymgr import errors, KeyRecord\n", "imports keymgr.KeyRecord (a peer"),
    ("import keymgr.cli\n", "imports keymgr.cli (a higher layer"),
    ("from keymgr import fields\n", "imports keymgr.fields (a higher layer"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from keymgr.custody import ceremony\n",
     "imports keymgr.custody.ceremony (a higher layer"),
    ("from keymgr import *\n", "imports keymgr.KeyManager (a higher layer"),
    ("import keymgr\ndef f():\n    return keymgr.KeyManager\n", "imports keymgr.KeyManager (a higher layer"),
    ("import importlib\nimportlib.import_module('keymgr.cli')\n", "imports keymgr.cli (a higher layer"),
    ("__import__('keymgr.fields')\n", "imports keymgr.fields (a higher layer"),
    ("import importlib\nimportlib.import_module(name)\n", "imports keymgr.?, which is in no layer"),
    ("from keymgr.newthing import mod\n", "imports keymgr.newthing.mod, which is in no layer"),
])
def test_an_upward_import_is_found_at_any_depth(tmp_path: Path, code: str, expected: str) -> None:
    """The checker itself, on a small tree: audit (layer 4) with one bad import added; the face's
    ``_LAZY`` says KeyRecord comes from rewrap (audit's peer) here."""
    root = tmp_path / "keymgr"
    for unit in ("custody", "audit", "rewrap", "cli", "fields"):
        (root / unit).mkdir(parents=True)
        (root / unit / "__init__.py").write_text('"""A package."""\n')
    (root / "__init__.py").write_text('_LAZY = {"KeyManager": "keymgr.manager", "KeyRecord": "keymgr.rewrap.x"}\n')
    (root / "manager.py").write_text('"""The manager."""\n')
    (root / "errors.py").write_text('"""The error tree."""\n')
    (root / "audit" / "bad.py").write_text(code)
    problems = upward_imports(root)
    assert problems and all(p.startswith("keymgr/audit/bad.py:") for p in problems), problems
    assert any(p.startswith(f"keymgr/audit/bad.py:{code.count(chr(10))}: {expected}") for p in problems), problems
