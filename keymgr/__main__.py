"""``python -m keymgr`` and the ``keymgr`` command.

Signals are set up first, before the CLI and what it needs are imported (about
0.1 s), so that an interrupt at any moment ends in one line and status 130
(SIGTERM: 143), never a traceback (:mod:`keymgr._signals`). Only the small
``keymgr`` package (its errors) comes before.
"""

from keymgr import _signals


def main() -> None:
    _signals.install()
    try:
        from keymgr.cli import cli

        cli(prog_name="keymgr")
    except KeyboardInterrupt as exc:  # during the imports; the CLI reports later ones itself
        _signals.report(exc)
    finally:
        _signals.exiting()


if __name__ == "__main__":
    main()
