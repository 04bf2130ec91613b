"""The ``jaxdp`` command line. Each feature module registers its own sub-commands.

A module listed in ``_COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its sub-commands with
``set_defaults(func=handler)``; ``handler(args) -> int`` is the exit status. Results go to stdout (one JSON
object with ``--json``), diagnostics to stderr. A handler raises on failure; :func:`main` turns the error into
one line on stderr, the JSON error object and the exit status (:mod:`jaxdp._cli`, docs/cli.md).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from jaxdp import _cli

_COMMAND_MODULES = (
    "jaxdp.accounting.cli",   # epsilon, calibrate
    "jaxdp.train.cli",        # train, compare
    "jaxdp.audit.cli",        # audit
    "jaxdp.ledger.cli",       # ledger
    "jaxdp.report.cli",       # report, sweep
    "jaxdp.launch",           # launch (local multi-process jobs)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdp", description="Differentially private training for JAX.")
    parser.add_argument("--version", action="version", version=f"jaxdp {__import__('jaxdp').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # feature not present in this build
            raise
        module.register(sub)
    return parser


@contextlib.contextmanager
def _plain_warnings():
    """Warnings as one line ``jaxdp: warning: MESSAGE`` on stderr, without the source line that raised them
    (a user of the command line has no use for ``trainer.py:301: UserWarning`` and the code below it). Only the
    format changes: filters and recorders (``pytest.warns``, ``-W error``) see the warnings as before."""
    def fmt(message, category, filename, lineno, line=None):
        kind = "" if category is UserWarning else f" ({category.__name__})"
        return f"jaxdp: warning{kind}: {message}\n"

    old = warnings.formatwarning
    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = old


def _stdout_gone() -> int:
    """The reader of stdout went away (``jaxdp ledger show | head``): stop quietly, as ``cat`` would.

    stdout is pointed at /dev/null so that the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return _cli.EXIT_BROKEN_PIPE  # 128 + SIGPIPE, the status of a command killed by a broken pipe


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (the map is in :mod:`jaxdp._cli` and docs/cli.md)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return _cli.EXIT_USAGE
    command = " ".join(filter(None, (args.command, getattr(args, "ledger_command", None))))
    try:
        with _plain_warnings():
            status = int(args.func(args) or 0)
        sys.stdout.flush()  # a broken pipe shows here for output still in the buffer
        return status
    except BrokenPipeError:
        return _stdout_gone()
    except (Exception, KeyboardInterrupt) as e:
        try:
            code = _cli.fail(command, e, getattr(args, "json", False))
        except BrokenPipeError:
            return _stdout_gone()
        if code is None:
            raise  # a bug in jaxdp: keep the traceback
        return code


if __name__ == "__main__":
    sys.exit(main())
