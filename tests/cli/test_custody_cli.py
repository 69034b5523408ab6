"""The dual-control commands end to end: register, request, approve, back up, restore, verify.

Everything non-interactive (``--custodian NAME=URI`` with pin-value, ``--so-pin-source
env:``) through click's runner; the interactive restore at a real terminal is in
``test_custody_terminal.py``.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from keymgr.cli import cli
from keymgr.hsm import asym, objects, open_token
from tests._internals import keyring_of
from tests.conftest import SO_PIN, softhsm_token

#: the custodians' key pairs (``people``) stay on the shared tokens, each label with a random part
pytestmark = pytest.mark.leaves_objects("cli-")


def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env, input=input)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def people() -> list[tuple[str, str, str]]:
    """Three fresh custodians: (name, token URI with PIN, key label), keys on custodian-1..3."""
    out = []
    for n, kind in ((1, "ec-p256"), (2, "rsa-2048"), (3, "ec-p384")):
        token = softhsm_token(f"custodian-{n}")
        label = f"cli-{uuid.uuid4().hex[:8]}"
        asym.generate_keypair(open_token(token.uri()), kind, label=label)
        out.append((f"cli{n}-{label[4:]}", token.uri(), label))
    return out


@pytest.mark.slow
def test_full_ceremony_through_the_cli(people: list, tmp_path: Path, key_name: str) -> None:
    a, b = softhsm_token("keymgr-A").uri(), softhsm_token("keymgr-B").uri()
    for name, uri, label in people:
        code, out, err = run("--token", a, "custodian", "add", name, "--token", uri,
                             "--key-label", label)
        assert code == 0, err
        assert "fingerprint" in out
    names = ",".join(name for name, _, _ in people)
    assert run("--token", a, "key", "create", key_name, "--backup")[0] == 0
    code, _, err = run("--token", a, "custodian", "policy", "2", "--key", key_name, "--custodians", names)
    assert code == 0, err
    code, out, _ = run("--token", a, "--json", "custodian", "list")
    listed = json.loads(out)
    assert listed["policies"][key_name] == {"threshold": 2, "custodians": names.split(",")}
    assert {c["name"] for c in listed["custodians"]} >= set(names.split(","))

    req = tmp_path / "backup.req"
    code, out, err = run("--token", a, "request", "backup", key_name, "-o", str(req), "--by", "ops")
    assert code == 0, err
    digest = out.split("request digest: ")[1].split()[0]
    assert len(digest) == 64
    approvals = []
    for name, uri, label in (people[0], people[2]):
        out_path = tmp_path / f"{name}.approval"
        code, out, err = run("approve", str(req), "--custodian", name, "--token", uri,
                             "--key-label", label, "--yes", "-o", str(out_path))
        assert code == 0, err
        # the same full digest in what is shown before signing and in the result
        assert f"request digest: {digest}" in err and f"back up key {key_name!r}" in err
        assert out.strip().endswith(f"approval by {name!r} of request {digest}")
        approvals += ["--approval", str(out_path)]

    backup = tmp_path / "orders.backup"
    env = {"TEST_SO_PIN": SO_PIN}
    code, _, err = run("--token", a, "backup", key_name, "-o", str(backup), "--request", str(req),
                       "--so-pin-source", "env:TEST_SO_PIN", approvals[0], approvals[1], env=env)
    assert code == 5 and "needs approvals by 2 of 3" in err and len(err.strip().splitlines()) == 1
    code, out, err = run("--token", a, "backup", key_name, "-o", str(backup), "--request", str(req),
                         "--so-pin-source", "env:TEST_SO_PIN", *approvals, env=env)
    assert code == 0, err
    assert (backup.stat().st_mode & 0o077) == 0
    transcript = Path(str(backup) + ".transcript.p7s")
    code, out, err = run("--token", a, "transcript", "verify", str(transcript))
    assert code == 0 and "transcript OK: backup" in out, err

    restore_transcript = tmp_path / "restore.p7s"
    custodians = ["--custodian", f"{people[0][0]}={people[0][1]}",
                  "--custodian", f"{people[1][0]}={people[1][1]}"]
    code, out, err = run("restore", str(backup), "--token", b, *custodians[:2],
                         "--transcript", str(restore_transcript))
    assert code == 5 and "only 1 took part" in err
    code, out, err = run("restore", str(backup), "--token", b, *custodians, "--transcript", str(restore_transcript))
    assert code == 0, err
    assert f"restored key {key_name!r} versions 1 into token 'keymgr-B'" in out
    check = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(restore_transcript),
                            "-noverify", "-out", "/dev/null"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    code, out, _ = run("--token", b, "--json", "transcript", "verify", str(restore_transcript))
    signers = {s["custodian"] for s in json.loads(out)["signers"]}
    assert {people[0][0], people[1][0]} <= signers
    record = json.loads(run("--token", b, "--json", "key", "show", key_name)[1])
    key_id = bytes.fromhex(record["versions"][0]["id"])
    attrs = objects.key_attributes(open_token(b), key_id).attributes
    assert attrs["SENSITIVE"] is True and attrs["EXTRACTABLE"] is False


def test_garbage_files_are_one_line_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\xffnot json")
    a = softhsm_token("keymgr-A").uri()
    for args in (("restore", str(junk), "--token", a), ("transcript", "verify", str(junk)),
                 ("approve", str(junk), "--custodian", "x", "--yes"),
                 ("backup", "nokey", "-o", str(tmp_path / "o"), "--request", str(junk), "--so-pin-source", "env:X")):
        code, out, err = run("--token", a, *args, env={"X": "5678"})
        assert code == 7, (args, err)
        # the one notice a token's first audited command prints (where its audit log is) aside
        err = "".join(line for line in err.splitlines(keepends=True) if "audit log of token" not in line)
        assert err.startswith("keymgr: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_key_that_never_leaves_the_token_is_refused_by_backup(tmp_path: Path, key_name: str) -> None:
    a = softhsm_token("keymgr-A").uri()
    assert run("--token", a, "key", "create", key_name)[0] == 0
    code, _, err = run("--token", a, "backup", key_name, "-o", str(tmp_path / "b"), "--so-pin-source", "env:X",
                       env={"X": SO_PIN})
    assert code == 5 and ("no quorum policy" in err or "never to leave" in err)
    assert not (tmp_path / "b").exists()


def test_key_create_writes_a_signed_transcript(tmp_path: Path, key_name: str) -> None:
    a = softhsm_token("keymgr-A").uri()
    path = tmp_path / "create.p7s"
    code, out, err = run("--token", a, "key", "create", key_name, "--backup", "--transcript", str(path))
    assert code == 0, err
    code, out, err = run("--token", a, "--json", "transcript", "verify", str(path))
    assert code == 0, err
    doc = json.loads(out)["transcript"]
    assert doc["ceremony"] == "create" and doc["keys"][0]["name"] == key_name and doc["details"]["backup"] is True


# -- what approve shows and checks; transcripts never overwritten (issue 14, parts 5 and 6) ----------

def _destroy_request(tmp_path: Path, key_name: str) -> tuple[Path, str]:
    from tests.custody_helpers import guarded_key, hsm

    km = hsm("keymgr-A")
    guarded_key(km, key_name)
    km.rotate(key_name)
    req = tmp_path / "destroy.req"
    code, out, err = run("--token", softhsm_token("keymgr-A").uri(), "request", "destroy", key_name, "--version",
                         "1", "-o", str(req))
    assert code == 0, err
    return req, out.split("request digest: ")[1].split()[0]


def test_approve_shows_a_destroy_in_full(tmp_path: Path, key_name: str) -> None:
    from tests.custody_helpers import hsm, party

    req, digest = _destroy_request(tmp_path, key_name)
    version = hsm("keymgr-A").describe_key(key_name).version(1)
    p = party(2)
    code, out, err = run("approve", str(req), "--custodian", p.name, "--token", p.uri(), "--yes")
    assert code == 0, err
    assert f"request digest: {digest}" in err
    assert f"DESTROY key {key_name!r} version(s) 1: irreversible" in err
    assert f"version 1: CKA_ID {version.key_id.hex()}, KCV {version.kcv or '-'}" in err
    assert f"on the HSM: token 'keymgr-A', serial {hsm('keymgr-A').token_info.serial}" in err
    assert "to be approved by 2 of 3 custodians:" in err and party(1).name in err and party(3).name in err
    assert out.strip().endswith(f"of request {digest}")


def test_approve_shows_a_policy_change_in_full(tmp_path: Path, key_name: str) -> None:
    from tests.custody_helpers import guarded_key, hsm, party

    guarded_key(hsm("keymgr-A"), key_name)
    names = ",".join(party(n).name for n in (1, 2, 3))
    req = tmp_path / "policy.req"
    code, out, err = run("--token", softhsm_token("keymgr-A").uri(), "request", "policy", "3", "--key", key_name,
                         "--custodians", names, "-o", str(req))
    assert code == 0, err
    digest = out.split("request digest: ")[1].split()[0]
    p = party(1)
    code, _, err = run("approve", str(req), "--custodian", p.name, "--token", p.uri(), "--yes")
    assert code == 0, err
    assert f"set the quorum policy of key {key_name!r} to 3 of 3 custodians: {names.replace(',', ', ')}" in err
    assert "to be approved by 2 of 3 custodians:" in err and f"request digest: {digest}" in err


def test_approve_refuses_the_wrong_token_before_the_pin(tmp_path: Path, key_name: str) -> None:
    """``--custodian carol --token bob-usb`` fails at approve, before any PIN is asked (the URI has
    none: a PIN prompt would meet the runner's empty input and cancel, exit 130)."""
    from tests.custody_helpers import party

    req, _ = _destroy_request(tmp_path, key_name)
    carol, bob = party(3), party(2)
    code, _, err = run("approve", str(req), "--custodian", carol.name, "--token", bob.uri(pin=False), "--yes")
    assert code == 5, err
    assert f"token 'custodian-2' does not hold the registered key of custodian {carol.name!r}" in err
    assert "PIN" not in err and not list(tmp_path.glob("*.approval"))
    code, _, err = run("approve", str(req), "--custodian", "mallory", "--token", bob.uri(pin=False), "--yes")
    assert code == 5 and "'mallory' is not one of those who approve this request" in err


def test_a_request_is_void_once_the_key_changed(tmp_path: Path, key_name: str) -> None:
    """A backup of every version, approved before a rotation added one: the approvers did not see it."""
    from keymgr import errors
    from keymgr.custody.authorize import authorize
    from tests.custody_helpers import approvals, guarded_key, hsm, request

    km = hsm("keymgr-A")
    guarded_key(km, key_name)
    req = request(km, "backup", key_name, versions=None)
    signed = approvals(km, req, 1, 2)
    km.rotate(key_name)
    with pytest.raises(errors.PolicyError, match="changed since the request was written"):
        authorize(keyring_of(km), "backup", key=key_name, params={"versions": None}, request=req, approvals=signed,
                  consume=False)


def test_a_second_restore_never_overwrites_a_transcript(tmp_path: Path, key_name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from keymgr.custody.backup_file import BackupFile
    from tests.custody_helpers import backup_file, party

    path = backup_file(tmp_path / "b.backup", key_name)
    monkeypatch.chdir(tmp_path)
    default = tmp_path / f"restore-{BackupFile.parse(path.read_bytes()).id.hex()[:8]}.transcript.p7s"
    default.write_bytes(b"the transcript of an earlier restore of this backup")
    b = softhsm_token("keymgr-B").uri()
    custodians = [arg for n in (1, 3) for arg in ("--custodian", f"{party(n).name}={party(n).uri()}")]
    code, _, err = run("restore", str(path), "--token", b, *custodians, "--transcript", str(default))
    assert code == 2 and "never overwrites a transcript" in err
    assert run("--token", b, "key", "show", key_name)[0] == 6  # refused before anything was restored
    code, out, err = run("restore", str(path), "--token", b, *custodians)
    assert code == 0, err
    second = default.with_name(default.name.replace(".transcript.p7s", "-2.transcript.p7s"))
    assert f"signed transcript: {second.name}" in out
    assert default.read_bytes() == b"the transcript of an earlier restore of this backup"
    assert run("--token", b, "transcript", "verify", str(second))[0] == 0


# -- issue 14 (the outside tester): backups spend nothing unless written, replace nothing ----------

def _approved_backup_args(tmp_path: Path, key_name: str) -> list[str]:
    """``--request R --approval A1 --approval A2`` for a backup of a new 2-of-3 guarded key on keymgr-A."""
    from tests.custody_helpers import approvals, guarded_key, hsm, request

    km = hsm("keymgr-A")
    guarded_key(km, key_name)
    req = request(km, "backup", key_name, versions=None)
    (tmp_path / "b.req").write_bytes(req.to_bytes())
    args = ["--request", str(tmp_path / "b.req"), "--so-pin-source", "env:TEST_SO_PIN"]
    for number, approval in enumerate(approvals(km, req, 1, 2)):
        path = tmp_path / f"{number}.approval"
        path.write_bytes(approval.to_bytes())
        args += ["--approval", str(path)]
    return args


def test_a_backup_that_cannot_be_written_spends_no_approval(tmp_path: Path, key_name: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from keymgr import errors
    from keymgr.cli import ceremony

    a, env = softhsm_token("keymgr-A").uri(), {"TEST_SO_PIN": SO_PIN}
    approved = _approved_backup_args(tmp_path, key_name)
    code, _, err = run("--token", a, "backup", key_name, "-o", str(tmp_path / "missing" / "b.backup"), *approved,
                       env=env)
    assert code == 2 and "does not exist" in err, err
    existing = tmp_path / "old.backup"
    existing.write_bytes(b"the only backup holding a destroyed version")
    code, _, err = run("--token", a, "backup", key_name, "-o", str(existing), *approved, env=env)
    assert code == 2 and "exists already" in err, err
    assert existing.read_bytes() == b"the only backup holding a destroyed version"

    def full_disk(*args: object, **kwargs: object) -> None:
        raise errors.StorageError("cannot write b.backup: the disk is full; nothing was changed")

    with monkeypatch.context() as patch:  # a failure while writing, after every check passed
        patch.setattr(ceremony, "write_output", full_disk)
        code, _, err = run("--token", a, "backup", key_name, "-o", str(tmp_path / "b.backup"), *approved, env=env)
    assert code == 8 and "nothing was changed" in err
    assert not (tmp_path / "b.backup").exists()
    with monkeypatch.context() as patch:  # the file written, then its transcript fails: the file is taken back
        patch.setattr(ceremony, "write_transcript", full_disk)
        code, _, err = run("--token", a, "backup", key_name, "-o", str(tmp_path / "b.backup"), *approved, env=env)
    assert code == 8 and "nothing was changed" in err
    assert not (tmp_path / "b.backup").exists()
    code, out, err = run("--token", a, "backup", key_name, "-o", str(tmp_path / "b.backup"), *approved, env=env)
    assert code == 0, err  # the approvals were not spent by any of the failures: no second meeting
    assert (tmp_path / "b.backup.transcript.p7s").exists()
    code, _, err = run("--token", a, "backup", key_name, "-o", str(tmp_path / "c.backup"), *approved, env=env)
    assert code == 5 and "already carried out" in err  # spent by the backup that was written


def test_key_transcripts_are_never_overwritten_and_checked_before_the_change(
        tmp_path: Path, key_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from keymgr import errors
    from keymgr.cli import _custody_common

    a = softhsm_token("keymgr-A").uri()
    old = tmp_path / "rotate.p7s"
    old.write_bytes(b"last month's rotation transcript")
    assert run("--token", a, "key", "create", key_name, "--transcript", str(old))[0] == 2
    assert run("--token", a, "key", "show", key_name)[0] == 6  # refused before the key was made
    assert run("--token", a, "key", "create", key_name)[0] == 0
    for path in (old, tmp_path / "missing" / "x.p7s"):
        code, _, err = run("--token", a, "key", "rotate", key_name, "--transcript", str(path))
        assert code == 2 and ("exists already" in err or "does not exist" in err), err
        code, _, err = run("--token", a, "key", "destroy", key_name, "--version", "1", "--yes", "--immediately",
                           "--transcript", str(path))
        assert code == 2, err
    assert old.read_bytes() == b"last month's rotation transcript"
    record = json.loads(run("--token", a, "--json", "key", "show", key_name)[1])
    assert [v["version"] for v in record["versions"]] == [1] and record["versions"][0]["state"] == "active"

    def full_disk(path: object, data: bytes) -> None:
        raise errors.StorageError(f"cannot write {path}: the disk is full; nothing was changed")

    monkeypatch.setattr(_custody_common, "write_new", full_disk)  # the change made, then the write fails
    code, _, err = run("--token", a, "key", "rotate", key_name, "--transcript", str(tmp_path / "r2.p7s"))
    assert code == 9 and "was rotated" in err and "nothing was changed" not in err, err
    assert len(err.strip().splitlines()) == 1
    record = json.loads(run("--token", a, "--json", "key", "show", key_name)[1])
    assert record["primary"] == 2


def run_bytes(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env)
    return result.exit_code, result.stdout_bytes, result.stderr


def test_outputs_to_stdout_hold_only_the_data(people: list, tmp_path: Path, key_name: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``-o -`` puts the request, the approval, the backup and quorum-encrypted data on stdout
    and every report line on stderr: each reads back whole (a status line in a backup made it
    unrestorable after its approvals were spent)."""
    from keymgr.custody.approvals import Approval, Request
    from keymgr.custody.backup_file import BackupFile

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where the backup's transcript goes (never the repository)
    a = softhsm_token("keymgr-A").uri()
    for name, uri, label in people:
        run("--token", a, "custodian", "add", name, "--token", uri, "--key-label", label)
    names = ",".join(name for name, _, _ in people)
    assert run("--token", a, "key", "create", key_name, "--backup")[0] == 0
    assert run("--token", a, "custodian", "policy", "2", "--key", key_name, "--custodians", names)[0] == 0

    code, data, err = run_bytes("--token", a, "request", "backup", key_name, "-o", "-", "--by", "ops")
    assert code == 0 and "request digest:" in err, err
    request = Request.parse(data)
    (tmp_path / "r.req").write_bytes(data)
    approvals = []
    for n, (name, uri, label) in enumerate((people[0], people[2])):
        code, data, err = run_bytes("approve", str(tmp_path / "r.req"), "--custodian", name, "--token", uri,
                                    "--key-label", label, "--yes", "-o", "-")
        assert code == 0 and "wrote -" in err, err
        assert Approval.parse(data).request_digest == request.digest
        (tmp_path / f"{n}.approval").write_bytes(data)
        approvals += ["--approval", str(tmp_path / f"{n}.approval")]
    code, data, err = run_bytes("--token", a, "backup", key_name, "-o", "-", "--request", str(tmp_path / "r.req"),
                                "--so-pin-source", "env:TEST_SO_PIN", *approvals, env={"TEST_SO_PIN": SO_PIN})
    assert code == 0 and "signed transcript:" in err, err
    assert [k.record.name for k in BackupFile.parse(data).keys] == [key_name]
    # a backup on stdout gets its transcript under a name of its own, in the working directory
    assert (Path.cwd() / f"backup-{key_name}.transcript.p7s").is_file()

    (tmp_path / "secret").write_bytes(b"pay 100 to alice")
    code, data, err = run_bytes("--token", a, "quorum", "encrypt", "--key", key_name, str(tmp_path / "secret"),
                                "-o", "-")
    assert code == 0 and "wrote -" in err, err
    (tmp_path / "q.kmg").write_bytes(data)
    code, data, err = run_bytes("--token", a, "decrypt", str(tmp_path / "q.kmg"), "-o", "-")
    assert code == 0 and data == b"pay 100 to alice", err


def test_requests_and_approvals_never_replace_a_file_and_name_an_unknown_custodian(people: list, tmp_path: Path,
                                                                                  key_name: str) -> None:
    a = softhsm_token("keymgr-A").uri()
    name, uri, label = people[0]
    run("--token", a, "custodian", "add", name, "--token", uri, "--key-label", label)
    assert run("--token", a, "key", "create", key_name, "--backup")[0] == 0
    code, _, err = run("--token", a, "request", "policy", "2", "--key", key_name, "--custodians", f"{name},zed",
                       "-o", str(tmp_path / "p.req"))
    assert code == 2 and "no custodian named 'zed' is registered" in err, err
    req = tmp_path / "r.req"
    req.write_bytes(b"an earlier request, approvals pending")
    code, _, err = run("--token", a, "request", "backup", key_name, "-o", str(req))
    assert code != 0 and "exists" in err and req.read_bytes() == b"an earlier request, approvals pending", err
    req.unlink()
    assert run("--token", a, "request", "backup", key_name, "-o", str(req))[0] == 0
    before = req.read_bytes()
    code, _, err = run("approve", str(req), "--custodian", name, "--token", uri, "--key-label", label, "--yes",
                       "-o", str(req))
    assert code != 0 and "exists" in err and req.read_bytes() == before, err


def test_a_restore_onto_a_key_of_the_same_name_is_refused_before_any_pin(tmp_path: Path, key_name: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's own key named like the backup's is found before the custodians are asked for
    anything (no terminal here: asking would fail differently), and nothing is restored; a second
    backup of the same key, restored over the first, is finished, and said so truly."""
    from tests.custody_helpers import backup_file, party

    monkeypatch.chdir(tmp_path)
    path = backup_file(tmp_path / "b.backup", key_name)
    b = softhsm_token("keymgr-B").uri()
    assert run("--token", b, "key", "create", key_name)[0] == 0
    code, _, err = run("restore", str(path), "--token", b)
    assert code == 5 and f"already has a key named {key_name!r}" in err, err
    assert "custodian" not in err.lower() and "PIN" not in err
    other = f"{key_name}-2"
    first, second = backup_file(tmp_path / "1.backup", other), tmp_path / "2.backup"
    custodians = [arg for n in (1, 3) for arg in ("--custodian", f"{party(n).name}={party(n).uri()}")]
    assert run("restore", str(first), "--token", b, *custodians)[0] == 0
    second.write_bytes(first.read_bytes())  # the same key's versions, as a later backup of it holds them
    code, out, err = run("restore", str(second), "--token", b, *custodians, "--transcript", str(tmp_path / "t2"))
    assert code == 0, err
    assert f"key {other!r}: token 'keymgr-B' held every version of it already" in err
    assert "from this backup by an earlier run" not in err
