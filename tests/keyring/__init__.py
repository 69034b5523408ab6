"""Tests of keymgr/keyring/ (shared fixtures: tests/conftest.py)."""
