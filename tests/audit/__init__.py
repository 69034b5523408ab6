"""Tests of keymgr/audit/ (shared fixtures: tests/conftest.py)."""
