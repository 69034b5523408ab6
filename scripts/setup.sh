#!/usr/bin/env bash
# Set up keymgr on this machine: Debian packages (when missing), a virtual
# environment in .venv, and the package itself. Safe to run again.
#   scripts/setup.sh            runtime (SoftHSM2, OpenSC tools)
#   scripts/setup.sh --dev      + test tools, the software TPM packages, chromium (headless, for tests),
#                                PostgreSQL (tests of keymgr.fields),
#                                a JDK and Bouncy Castle (interop tests)
#   scripts/setup.sh --bench    + benchmark peers (Tink, AWS Encryption SDK)
set -euo pipefail
cd "$(dirname "$0")/.."

want_dev=0; want_bench=0
for arg in "$@"; do
  case "$arg" in
    --dev) want_dev=1 ;;
    --bench) want_bench=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

packages=(softhsm2 opensc openssl)
if [ "$want_dev" = 1 ]; then
  packages+=(swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtss2-tcti-swtpm0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools dbus tmux)
  # headless browser that renders the access review's HTML in tests/audit/test_audit_report.py
  packages+=(chromium)
  # tools we did not write, for the interop tests (tests/test_interop_*.py): a JDK to compile a small
  # Bouncy Castle program, and Bouncy Castle itself (bcpkix 1.72 needs bcutil too)
  packages+=(default-jdk-headless libbcprov-java libbcpkix-java libbcutil-java)
  # a real database for keymgr.fields (tests/_postgres.py starts a throwaway server from its binaries)
  packages+=(postgresql)
fi
python="${PYTHON:-python3}"
# Debian keeps the venv module in libpython3.11-stdlib but ensurepip, which
# `python3 -m venv` needs, in python3.11-venv: `-m venv --help` works without it.
if [ ! -x .venv/bin/python ] && ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  packages+=(python3-venv)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
extras="."
if [ "$want_dev" = 1 ] && [ "$want_bench" = 1 ]; then extras=".[dev,bench]"
elif [ "$want_dev" = 1 ]; then extras=".[dev]"
elif [ "$want_bench" = 1 ]; then extras=".[bench]"; fi
stamp=".venv/.keymgr-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//[^a-z]/_}"
# the stamp names pyproject.toml's hash, so a changed pyproject (a new entry point) reinstalls; and a
# console script that does not run the entry point pyproject names (a venv installed from an older
# checkout, or by hand) is remade too: the signal handling of keymgr.__main__ must run first
entry="$(sed -n 's/^keymgr = "\([a-z_.]*\):\([a-z_]*\)"$/from \1 import \2/p' pyproject.toml | head -n 1)"
if [ -n "$entry" ] && ! grep -qsF "$entry" .venv/bin/keymgr; then rm -f "$stamp"; fi
if [ ! -f "$stamp" ]; then
  echo "setup: installing keymgr$([ "$extras" = . ] || echo " ${extras#.}") into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$extras"
  touch "$stamp"
fi
