"""Module loading by RFC 7512 ``module-name`` through p11-kit's registrations, and several modules at once.

Debian's packages register their modules with p11-kit (``softhsm2-common``:
``/usr/share/p11-kit/modules/softhsm2.module`` with an absolute path;
``libtpm2-pkcs11-1``: ``tpm2_pkcs11.module`` with a bare file name, resolved in
the multiarch ``pkcs11`` directory as p11-kit does). A URI with
``module-name=softhsm2`` must reach the very module and token a
``module-path=`` URI reaches.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import keymgr
from keymgr import errors
from keymgr.cli import cli
from keymgr.hsm import modules, open_token
from keymgr.hsm.modules import load_module, resolve_module_name
from tests.conftest import TokenUnderTest


def _real(path: str) -> str:
    return os.path.realpath(path)


def test_softhsm2_module_name_resolves_to_the_installed_softhsm(softhsm: TokenUnderTest) -> None:
    registration = Path("/usr/share/p11-kit/modules/softhsm2.module")
    assert registration.is_file(), "softhsm2-common registers SoftHSM with p11-kit"
    assert _real(resolve_module_name("softhsm2")) == _real(softhsm.module_path)
    # one instance per library, whichever way it was named
    assert load_module(resolve_module_name("softhsm2")) is load_module(softhsm.module_path)


def test_key_made_by_module_path_is_found_by_module_name(softhsm: TokenUnderTest, key_name: str) -> None:
    with keymgr.KeyManager(softhsm.uri()) as by_path:
        created = by_path.create_key(key_name)
    by_name_uri = f"pkcs11:token={softhsm.label}?module-name=softhsm2&pin-value={softhsm.user_pin}"
    assert open_token(by_name_uri) is open_token(softhsm.uri())
    with keymgr.KeyManager(by_name_uri) as by_name:
        assert by_name.describe_key(key_name).primary_version.key_id == created.primary_version.key_id


def test_cli_takes_a_module_name_uri(softhsm: TokenUnderTest, key_name: str) -> None:
    uri = f"pkcs11:token={softhsm.label}?module-name=softhsm2&pin-value={softhsm.user_pin}"
    runner = CliRunner()
    made = runner.invoke(cli, ["--token", uri, "key", "create", key_name])
    assert made.exit_code == 0, made.output
    shown = runner.invoke(cli, ["--token", uri, "--json", "key", "show", key_name])
    assert shown.exit_code == 0, shown.output
    assert f'"name": "{key_name}"' in shown.output


def test_tpm_module_name_and_softhsm_in_one_process(softhsm: TokenUnderTest, tpm: TokenUnderTest) -> None:
    # tpm2_pkcs11.module names a bare file: resolved in the pkcs11 directory, as p11-kit does
    assert _real(resolve_module_name("tpm2_pkcs11")) == _real(tpm.module_path)
    on_tpm = open_token(f"pkcs11:token={tpm.label}?module-name=tpm2_pkcs11&pin-value={tpm.user_pin}")
    on_softhsm = open_token(f"pkcs11:token={softhsm.label}?module-name=softhsm2&pin-value={softhsm.user_pin}")
    assert on_tpm is open_token(tpm.uri()) and on_softhsm is open_token(softhsm.uri())
    assert on_tpm.module is not on_softhsm.module
    assert {_real(m.path) for m in modules.loaded_modules()} >= {_real(tpm.module_path), _real(softhsm.module_path)}


def test_registration_files_are_read_like_p11kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 softhsm: TokenUnderTest) -> None:
    (tmp_path / "absolute.module").write_text(f"# comment\n\nmodule: {softhsm.module_path}\ncritical: no\n")
    (tmp_path / "missing.module").write_text("module: libdoes-not-exist-keymgr.so\n")
    (tmp_path / "empty.module").write_text("# no module line\ncritical: yes\n")
    monkeypatch.setattr(modules, "P11KIT_CONFIG_DIRS", (tmp_path,))
    assert _real(resolve_module_name("absolute")) == _real(softhsm.module_path)
    with pytest.raises(errors.ModuleLoadError, match="which is not installed"):
        resolve_module_name("missing")
    with pytest.raises(errors.ModuleLoadError, match="no PKCS#11 module named 'empty'"):
        resolve_module_name("empty")
    with pytest.raises(errors.ModuleLoadError, match="no PKCS#11 module named 'no-such-module-keymgr'"):
        resolve_module_name("no-such-module-keymgr")
    for bad in ("", "../softhsm2", "/usr/lib/softhsm/libsofthsm2.so"):
        with pytest.raises(errors.ConfigurationError, match="bare name"):
            resolve_module_name(bad)


def test_unknown_module_name_is_one_cli_line() -> None:
    result = CliRunner().invoke(cli, ["--token", "pkcs11:token=x?module-name=no-such-module-keymgr&pin-value=1",
                                      "key", "list"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no PKCS#11 module named 'no-such-module-keymgr'" in lines[0], result.output
    assert "Traceback" not in result.output


def test_library_attributes_select_the_module_s_tokens(softhsm: TokenUnderTest) -> None:
    """library-manufacturer / -description / -version select by C_GetInfo (RFC 7512 section 2.3):
    SoftHSM's own values find the token, any other value finds none and says what the module is."""
    info = load_module(softhsm.module_path).lib
    major, minor = info.library_version
    query = f"?module-path={softhsm.module_path}&pin-value={softhsm.user_pin}"
    own = (f"pkcs11:token={softhsm.label};library-manufacturer={info.manufacturer_id.strip()};"
           f"library-version={major}.{minor}{query}")
    assert open_token(own) is open_token(softhsm.uri())
    for wrong in ("library-manufacturer=Nobody", "library-description=Other", f"library-version={major + 1}.{minor}"):
        with pytest.raises(errors.TokenNotFoundError, match="library-\\* attributes do not match"):
            open_token(f"pkcs11:token={softhsm.label};{wrong}{query}")
