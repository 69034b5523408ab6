"""Tests of keymgr/fields/ (shared fixtures: tests/conftest.py)."""
