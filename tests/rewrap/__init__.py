"""Tests of keymgr/rewrap/ (shared fixtures: tests/conftest.py)."""
