"""Tests of keymgr/recipients/ (shared fixtures: tests/conftest.py)."""
