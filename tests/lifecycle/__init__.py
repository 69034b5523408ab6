"""Tests of keymgr/lifecycle/ (shared fixtures: tests/conftest.py)."""
