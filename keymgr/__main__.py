"""``python -m keymgr``: the same as the ``keymgr`` command."""

from keymgr.cli import main

if __name__ == "__main__":
    main()
