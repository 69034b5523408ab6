#!/usr/bin/env bash
# Set up keymgr and run its main job on the local SoftHSM token:
# create the token (once), create a key, encrypt a file under it, decrypt it back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the local token of `keymgr init` (~/.local/share/keymgr, or $KEYMGR_HOME): the quickstart's token
exec .venv/bin/python examples/quickstart.py
