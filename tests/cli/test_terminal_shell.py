"""keymgr's prompts under an interactive shell, as custodians meet them (issue 14, parts 4 and 8).

Each test runs ``bash`` in a pty (:class:`tests._pty.Shell`) and types into it:

* Ctrl-C at each prompt of ``restore``, ``approve`` and ``backup``: one line,
  ``keymgr: interrupted``, and the shell sees status 130;
* Ctrl-D at a prompt: one line, status 130;
* input typed ahead while keymgr works (the next custodian's PIN, here a
  harmless ``echo LEAKED-$((6*7))``) never reaches the shell when keymgr stops on
  an error or a cancellation: the shell would print ``LEAKED-42`` if it ran it.
  The terminal echoes what is typed, so the typed text itself shows; only its
  *result* proves the shell read it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._pty import Shell, keymgr_command
from tests.conftest import USER_PIN, softhsm_token
from tests.custody_helpers import approvals, backup_file, guarded_key, hsm, party, request

TYPED_AHEAD = "echo LEAKED-$((6*7))\n"
LEAKED = "LEAKED-42"


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    sh = Shell(tmp_path)
    try:
        yield sh
    finally:
        sh.close()


def _interrupt(shell: Shell) -> None:
    """Ctrl-C: what the terminal shows after it is the one line, apart from its own echo ``^C``
    (none at a PIN prompt, whose echo is off)."""
    shell.child.sendintr()
    shown = shell.wait_prompt()
    lines = [line.strip() for line in shown.splitlines() if line.strip()]
    assert [line for line in lines if line != "^C"] == ["keymgr: interrupted"], shown
    assert shell.status() == 130


def _to_restore_prompt(shell: Shell, path: Path, prompt: str) -> None:
    """Start an interactive restore of ``path`` into keymgr-B and answer up to ``prompt``."""
    first = party(1)
    shell.type(keymgr_command(["--token", softhsm_token("keymgr-B").uri(), "restore", str(path)]) + "\n")
    shell.child.expect(r"Custodian 1 of 2, name \(empty to stop\): ")
    if prompt != "name":
        shell.child.sendline(first.name)
        shell.child.expect(rf"Token of custodian '{first.name}'.*: ")
    if prompt == "pin":
        shell.child.sendline("custodian-1")
        shell.child.expect(r"PIN for token 'custodian-1'.*: ")


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["name", "token", "pin"])
def test_ctrl_c_at_each_restore_prompt(shell: Shell, tmp_path: Path, key_name: str, prompt: str) -> None:
    path = backup_file(tmp_path / "b.backup", key_name)
    _to_restore_prompt(shell, path, prompt)
    _interrupt(shell)
    assert not list(tmp_path.glob("restore-*"))


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["name", "token", "pin"])
def test_ctrl_d_at_each_restore_prompt(shell: Shell, tmp_path: Path, key_name: str, prompt: str) -> None:
    path = backup_file(tmp_path / "b.backup", key_name)
    _to_restore_prompt(shell, path, prompt)
    shell.child.sendeof()
    shown = shell.wait_prompt()
    lines = [line.strip() for line in shown.splitlines() if line.strip() and line.strip() != "^D"]
    assert lines == ["keymgr: cancelled: input ended at a prompt"], shown
    assert shell.status() == 130
    assert not list(tmp_path.glob("restore-*"))


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["confirm", "token", "pin"])
def test_ctrl_c_at_each_approve_prompt(shell: Shell, tmp_path: Path, key_name: str, prompt: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name)
    req = tmp_path / "backup.req"
    req.write_bytes(request(a, "backup", key_name, versions=None).to_bytes())
    p = party(1)
    shell.type(keymgr_command(["approve", str(req), "--custodian", p.name, "--key-label", p.key_label]) + "\n")
    shell.child.expect(rf"Approve it as custodian '{p.name}'\? \[y/N\]: ")
    if prompt != "confirm":
        shell.child.sendline("y")
        shell.child.expect(r"Your token \(token label or pkcs11: URI\): ")
    if prompt == "pin":
        shell.child.sendline(f"{p.uri(pin=False)}")
        shell.child.expect(r"PIN for token 'custodian-1'.*: ")
    _interrupt(shell)
    assert not list(tmp_path.glob("*.approval"))


@pytest.mark.slow
def test_ctrl_c_at_the_so_pin_prompt_of_backup(shell: Shell, tmp_path: Path, key_name: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name)
    req = request(a, "backup", key_name, versions=None)
    (tmp_path / "b.req").write_bytes(req.to_bytes())
    files = []
    for n, approval in zip((1, 2), approvals(a, req, 1, 2), strict=True):
        (tmp_path / f"{n}.approval").write_bytes(approval.to_bytes())
        files += ["--approval", str(tmp_path / f"{n}.approval")]
    shell.type(keymgr_command(["--token", softhsm_token("keymgr-A").uri(), "backup", key_name, "-o",
                               str(tmp_path / "b.backup"), "--request", str(tmp_path / "b.req"), *files]) + "\n")
    shell.child.expect(r"SO PIN for token 'keymgr-A': ")
    _interrupt(shell)
    assert not (tmp_path / "b.backup").exists()


@pytest.mark.slow
def test_backup_checks_approvals_before_the_so_pin(shell: Shell, tmp_path: Path, key_name: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name)
    req = request(a, "backup", key_name, versions=None)
    (tmp_path / "b.req").write_bytes(req.to_bytes())
    (tmp_path / "1.approval").write_bytes(approvals(a, req, 1)[0].to_bytes())
    shell.type(keymgr_command(["--token", softhsm_token("keymgr-A").uri(), "backup", key_name, "-o",
                               str(tmp_path / "b.backup"), "--request", str(tmp_path / "b.req"),
                               "--approval", str(tmp_path / "1.approval")]) + "\n")
    shown = shell.wait_prompt()
    assert "SO PIN" not in shown
    assert re.search(r"keymgr: error: backup needs approvals by 2 of 3 .*valid distinct approvals: 1", shown)
    assert shell.status() == 5


@pytest.mark.slow
def test_ctrl_d_at_a_prompt_ends_cleanly_and_drops_typed_ahead_input(shell: Shell, tmp_path: Path,
                                                                      key_name: str) -> None:
    path = backup_file(tmp_path / "b.backup", key_name)
    shell.type(keymgr_command(["--token", softhsm_token("keymgr-B").uri(), "restore", str(path)]) + "\n")
    shell.child.expect(r"Custodian 1 of 2, name \(empty to stop\): ")
    shell.type("\x04" + TYPED_AHEAD)  # Ctrl-D, and the next line typed at once
    shown = shell.wait_prompt()
    assert "keymgr: cancelled: input ended at a prompt" in shown and "Traceback" not in shown
    assert "Aborted" not in shown
    assert shell.status() == 130
    assert LEAKED not in shell.seen, "input typed ahead of keymgr reached the shell"


@pytest.mark.slow
def test_input_typed_ahead_during_a_failing_login_does_not_reach_the_shell(shell: Shell, tmp_path: Path,
                                                                           key_name: str) -> None:
    """The issue's case: keymgr stops on an error while the next PIN is being typed. The login reads
    its PIN from a FIFO, so the test types ahead exactly while keymgr waits there, then makes it fail."""
    path = backup_file(tmp_path / "b.backup", key_name)
    fifo = tmp_path / "pin.fifo"
    os.mkfifo(fifo, 0o600)
    first, second = party(1), party(3)
    uri = f"{first.uri(pin=False)}&pin-source=file:{fifo}"
    shell.type(keymgr_command(["--token", softhsm_token("keymgr-B").uri(), "restore", str(path),
                               "--custodian", f"{first.name}={uri}",
                               "--custodian", f"{second.name}={second.uri()}"]) + "\n")
    shell.child.expect("Target: token 'keymgr-B'")
    shell.type(TYPED_AHEAD)  # typed while keymgr waits for the PIN file: it sits in the terminal's queue
    shell.child.expect_exact(TYPED_AHEAD.strip())  # echoed by the terminal: it is in the queue now
    with open(fifo, "w") as pin:
        pin.write("99999\n")  # a wrong PIN: the restore stops
    shown = shell.wait_prompt()
    assert "keymgr: error: wrong PIN for token 'custodian-1'" in shown, shown
    assert shell.status() == 3
    assert LEAKED not in shell.seen, "input typed ahead of keymgr reached the shell"
    assert USER_PIN not in shown


# -- typed-ahead input is never an answer it was not meant for (issue 14, the outside tester) ------

def test_a_reasked_prompt_drops_what_was_typed_ahead(shell: Shell, tmp_path: Path, key_name: str) -> None:
    """A wrong custodian name, and the PIN typed ahead for later: the PIN must not be taken as the
    next name (and echoed back in "'PIN5555' is not one of the custodians")."""
    path = backup_file(tmp_path / "b.backup", key_name)
    shell.type(keymgr_command(["--token", softhsm_token("keymgr-B").uri(), "restore", str(path)]) + "\n")
    shell.child.expect(r"Custodian 1 of 2, name \(empty to stop\): ")
    shell.type("nosuch\nPIN5555\n")  # one write: both lines wait in the terminal before keymgr reads one
    shell.child.expect("'nosuch' is not one of the custodians")
    shell.child.expect(r"Custodian 1 of 2, name \(empty to stop\): ")
    _interrupt(shell)
    assert "'PIN5555' is not one of" not in shell.seen + str(shell.child.before)


def test_a_pasted_next_line_does_not_confirm_a_destroy(shell: Shell, tmp_path: Path, key_name: str) -> None:
    """``key destroy`` and the key's name pasted as the next line: the name was there before the
    warning was printed, so it confirms nothing; only Enter typed now answers (and stops)."""
    uri = softhsm_token().uri()
    shell.type(keymgr_command(["--token", uri, "key", "create", key_name]) + "\n")
    shell.wait_prompt()
    shell.type(keymgr_command(["--token", uri, "key", "rotate", key_name]) + "\n")
    shell.wait_prompt()
    destroy = keymgr_command(["--token", uri, "key", "destroy", key_name, "--version", "1", "--immediately"])
    shell.type(f"{destroy}\n{key_name}\n")  # pasted: the command and the confirmation at once
    shell.child.expect(r"Type the key name .* to destroy it anyway, or press Enter to stop.*: ")
    shell.type("\n")
    shown = shell.wait_prompt()
    assert "was not destroyed" in shown, shown
    assert shell.status() == 5
    shell.type(keymgr_command(["--token", uri, "--json", "key", "show", key_name]) + "\n")
    assert '"state": "destroyed"' not in shell.wait_prompt()


def test_a_pasted_yes_does_not_approve(shell: Shell, tmp_path: Path, key_name: str) -> None:
    a = hsm("keymgr-A")
    guarded_key(a, key_name)
    req = tmp_path / "backup.req"
    req.write_bytes(request(a, "backup", key_name, versions=None).to_bytes())
    p = party(1)
    approve = keymgr_command(["approve", str(req), "--custodian", p.name, "--key-label", p.key_label])
    shell.type(f"{approve}\ny\n")
    shell.child.expect(rf"Approve it as custodian '{p.name}'\? \[y/N\]: ")
    shell.type("\n")  # Enter now: the default, no
    shown = shell.wait_prompt()
    assert "not approved" in shown and "Your token" not in shown, shown
    assert shell.status() == 5
    assert not list(tmp_path.glob("*.approval"))
