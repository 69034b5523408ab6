"""``python -m keymgr`` and the ``keymgr`` command.

Signals are set up first, before the CLI and what it needs are imported (about
0.1 s), so that an interrupt at any moment ends in one line and status 130
(SIGTERM: 143), never a traceback (:mod:`keymgr.interrupts`). Only the small
``keymgr`` package (its errors) comes before.

Whenever keymgr ends unsuccessfully (an error, an interrupt, input ended at a
prompt), the terminal's typed-ahead input is discarded first
(:mod:`keymgr.terminal`), so that a PIN typed for the next prompt never
reaches the shell.

``KEYMGR_LOG=debug`` (or ``info``, ``warning``) prints keymgr's operator log
records on stderr (:mod:`keymgr.oplog`).
"""

from keymgr import interrupts, oplog, terminal


def main() -> None:
    interrupts.install()
    oplog.from_env()  # KEYMGR_LOG=debug: operator logging on stderr (docs/deployment.md)
    try:
        try:
            from keymgr.cli import cli

            cli(prog_name="keymgr")
        except KeyboardInterrupt as exc:  # during the imports; the CLI reports later ones itself
            interrupts.report(exc)
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            terminal.discard_typed_ahead()
        raise
    finally:
        interrupts.exiting()


if __name__ == "__main__":
    main()
