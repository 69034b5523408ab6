"""Tests of keymgr/custody/ (shared fixtures: tests/conftest.py)."""
