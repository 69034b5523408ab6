#!/usr/bin/env bash
# Set everything up and run the whole test suite against real tokens:
# fresh SoftHSM2 tokens (made by the fixtures) and a software TPM 2.0
# (swtpm + tpm2-pkcs11, started by scripts/tpm2-token.sh). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# lint and types first: seconds, and a failure here is one a reviewer would stop at
.venv/bin/ruff check .
.venv/bin/mypy keymgr
.venv/bin/mypy --explicit-package-bases bench
export KEYMGR_REQUIRE_TPM="${KEYMGR_REQUIRE_TPM:-1}"
# the interop tests (OpenSSL, Bouncy Castle, pkcs11-tool, PostgreSQL for keymgr.fields) fail rather than skip
# when a tool is missing
export KEYMGR_REQUIRE_INTEROP="${KEYMGR_REQUIRE_INTEROP:-1}"
exec .venv/bin/python -m pytest "$@"
