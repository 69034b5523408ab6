"""Tests of keymgr/hsm/ (shared fixtures: tests/conftest.py)."""
