"""Tests of keymgr/envelope/ (shared fixtures: tests/conftest.py)."""
