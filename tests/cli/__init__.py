"""Tests of keymgr/cli/ (shared fixtures: tests/conftest.py)."""
