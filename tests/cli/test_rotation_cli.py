"""``keymgr key rotate | show | due | retire | suspend | resume | compromise | activate`` through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import keymgr
from keymgr.cli import cli
from tests._internals import clocked
from tests.conftest import TokenUnderTest


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def key(softhsm: TokenUnderTest, key_name: str) -> tuple[list[str], str]:
    code, _, err = run("--token", softhsm.uri(), "key", "create", key_name)
    assert code == 0, err
    return ["--token", softhsm.uri()], key_name


@pytest.mark.slow
def test_rotate_and_show(key: tuple[list[str], str]) -> None:
    token, name = key
    code, out, err = run(*token, "key", "rotate", name)
    assert code == 0, err
    assert f"key {name!r}: primary is now version 2 (active" in out and "was version 1 (decrypt-only" in out
    code, out, _ = run(*token, "--json", "key", "rotate", name)
    shown = json.loads(out)
    assert shown["primary"] == 3
    assert [(v["version"], v["state"], v["primary"]) for v in shown["versions"]] == [
        (1, "decrypt-only", False), (2, "decrypt-only", False), (3, "active", True)]
    assert all(len(v["kcv"]) == 6 and v["uses"] == 0 for v in shown["versions"])
    code, out, _ = run(*token, "key", "show", name)
    assert code == 0
    for v in shown["versions"]:
        assert v["id"] in out and v["kcv"] in out
    assert "decrypt-only" in out and "active" in out


@pytest.mark.slow
def test_retire_then_show_and_decrypt(key: tuple[list[str], str], softhsm: TokenUnderTest) -> None:
    token, name = key
    with keymgr.KeyManager(softhsm.uri()) as km:
        old = km.encrypt(b"v1 data", key=name)
    run(*token, "key", "rotate", name)
    code, out, err = run(*token, "key", "retire", name, "--below", "2")
    assert code == 5 and "stopped being the primary" in err and "--immediately" in err  # other hosts may use v1
    code, out, err = run(*token, "key", "retire", name, "--below", "2", "--immediately")
    assert code == 0, err
    assert "versions below 2 no longer decrypt" in out
    shown = json.loads(run(*token, "--json", "key", "show", name)[1])
    assert shown["min_decryption_version"] == 2
    assert [v["decrypts"] for v in shown["versions"]] == [False, True]
    assert "(retired)" in run(*token, "key", "show", name)[1]
    with keymgr.KeyManager(softhsm.uri()) as km, pytest.raises(keymgr.PolicyError, match="retired"):
        km.decrypt(old)
    code, _, err = run(*token, "key", "retire", name, "--below", "3")
    assert code == 5 and "primary" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_suspend_resume_compromise(key: tuple[list[str], str]) -> None:
    token, name = key
    run(*token, "key", "rotate", name)
    code, out, err = run(*token, "key", "suspend", name, "--version", "1")
    assert code == 0 and "version 1 (suspended" in out, err
    code, out, err = run(*token, "--json", "key", "resume", name, "--version", "1")
    assert code == 0 and json.loads(out)["versions"][0]["state"] == "decrypt-only", err
    code, out, _ = run(*token, "key", "compromise", name, "--version", "1")
    assert code == 0 and "version 1 (compromised" in out
    code, _, err = run(*token, "key", "resume", name, "--version", "1")
    assert code == 5 and "not suspended" in err and err.startswith("keymgr: error:")
    history = json.loads(run(*token, "--json", "key", "show", name)[1])["versions"][0]["history"]
    assert [h["state"] for h in history] == ["active", "decrypt-only", "suspended", "decrypt-only", "compromised"]


@pytest.mark.slow
def test_pre_active_and_activate(key: tuple[list[str], str]) -> None:
    token, name = key
    code, out, _ = run(*token, "key", "rotate", name, "--pre-active")
    assert code == 0 and "primary stays version 1" in out
    code, out, _ = run(*token, "--json", "key", "activate", name, "--version", "2")
    assert code == 0 and json.loads(out)["primary"] == 2


@pytest.mark.slow
def test_due_lists_overdue_keys(softhsm: TokenUnderTest, key_name: str) -> None:
    stamps = iter(["2020-01-01T00:00:00Z"] * 10)
    with clocked(keymgr.KeyManager(softhsm.uri()), wall_clock=lambda: next(stamps)) as km:
        km.create_key(key_name, rotate_after_days=90)
    code, out, err = run("--token", softhsm.uri(), "--json", "key", "due")
    assert code == 0, err
    due = {d["name"]: d for d in json.loads(out)["due"]}
    assert due[key_name]["due_since"].startswith("2020-03-31") and due[key_name]["primary"] == 1
    code, out, _ = run("--token", softhsm.uri(), "key", "due")
    assert code == 0 and key_name in out
    run("--token", softhsm.uri(), "key", "rotate", key_name)
    due = {d["name"] for d in json.loads(run("--token", softhsm.uri(), "--json", "key", "due")[1])["due"]}
    assert key_name not in due


@pytest.mark.slow
def test_errors_are_one_line(key: tuple[list[str], str]) -> None:
    token, name = key
    for args in (("key", "rotate", name + "-missing"), ("key", "suspend", name, "--version", "9"),
                 ("key", "destroy", name, "--version", "1", "--yes", "--immediately")):
        code, _, err = run(*token, *args)
        assert code in (5, 6) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_rotate_writes_a_signed_transcript(key: tuple[list[str], str], tmp_path) -> None:
    token, name = key
    transcript = tmp_path / "rotate.p7s"
    code, _, err = run(*token, "key", "rotate", name, "--transcript", str(transcript))
    assert code == 0, err
    code, out, err = run(*token, "--json", "transcript", "verify", str(transcript))
    assert code == 0, err
    doc = json.loads(out)["transcript"]
    assert doc["ceremony"] == "rotate"
    assert sorted((k["version"], k["state"]) for k in doc["keys"]) == [(1, "decrypt-only"), (2, "active")]
