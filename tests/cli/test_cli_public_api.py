"""The CLI is a user of the library like any other: it reaches no private name of keymgr.

A ``keymgr.cli`` module may import any public name of keymgr, and anything of ``keymgr.cli``
itself; it may not import a private name (``from keymgr.x import _y``), nor touch a
KeyManager's private token, keyring or audit helper (``km._token``, ``km._keyring``,
``km._audited``, or the manager's other private parts, whatever the object is called). The
process plumbing it shares with the library (atomic files, signal holds, terminal input) and
the audit log's repair internals still live in private modules: they are listed below, by
name, until the layout gives them a public home, and the list may only shrink.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "keymgr" / "cli"

#: KeyManager internals that callers must never reach (km.custody, km.token_info instead).
MANAGER_INTERNALS = frozenset({"_token", "_keyring", "_keyring_unchecked", "_audited", "_ts", "_audit",
                               "_protector", "_usage"})

#: Private modules the CLI still imports, each for plumbing it shares with the library.
PRIVATE_MODULES_ALLOWED = frozenset({
    "keymgr._files",          # atomic writes, never over a device or symlink
    "keymgr._signals",        # commit scopes: an interrupt waits for a commit to finish
    "keymgr._terminal",       # typed-ahead input discarded before a confirmation
    "keymgr.audit._config",   # token_log_path: a token's default log (keymgr audit verify)
    "keymgr.audit._token",    # AuditKey: keymgr audit repair
})


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def violations(source: str, where: str) -> tuple[list[str], set[str]]:
    """(uses of private keymgr names in ``source``, private modules it imports)."""
    found: list[str] = []
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "keymgr" and not node.module.startswith("keymgr."):
                continue
            if node.module == "keymgr.cli" or node.module.startswith("keymgr.cli."):
                continue
            if any(_private(p) for p in node.module.split(".")):
                modules.add(node.module)
            for alias in node.names:
                if not _private(alias.name):
                    continue
                full = f"{node.module}.{alias.name}"
                if _is_module(full):
                    modules.add(full)
                else:
                    found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keymgr.") and any(_private(p) for p in alias.name.split(".")[1:]):
                    modules.add(alias.name)
        elif isinstance(node, ast.Attribute) and node.attr in MANAGER_INTERNALS:
            found.append(f"{where}:{node.lineno}: .{node.attr}")
    return found, modules


def _cli_sources() -> list[Path]:
    return sorted(CLI.rglob("*.py"))


def test_the_cli_uses_no_private_name_of_keymgr() -> None:
    found: list[str] = []
    modules: set[str] = set()
    for path in _cli_sources():
        more, used = violations(path.read_text(), str(path.relative_to(REPO)))
        found += more
        modules |= used
    assert not found, "the CLI reaches below the public API:\n" + "\n".join(found)
    assert not modules - PRIVATE_MODULES_ALLOWED, f"private modules imported: {modules - PRIVATE_MODULES_ALLOWED}"
    assert not PRIVATE_MODULES_ALLOWED - modules, ("no longer imported by the CLI, so take them off the list: "
                                                   f"{PRIVATE_MODULES_ALLOWED - modules}")


@pytest.mark.parametrize("snippet", [
    "from keymgr.manager import _ciphertext_failure",
    "from keymgr.custody import _shares",
    "def f(km):\n    return km._keyring",
    "def f(state):\n    state.manager()._token.label",
    "def f(km):\n    with km._audited('custodian-add'):\n        pass",
    "def f(km):\n    return km._protector",
])
def test_the_check_sees_each_kind_of_back_door(snippet: str) -> None:
    found, modules = violations(snippet, "snippet")
    assert found or (modules - PRIVATE_MODULES_ALLOWED), snippet


def test_the_check_passes_public_names_and_the_clis_own() -> None:
    found, modules = violations("from keymgr import KeyManager, errors\nfrom keymgr.cli._common import CliState\n"
                                "def f(km, self):\n    return km.token_info.label, km.custody, self._manager",
                                "snippet")
    assert (found, modules) == ([], set())
