"""The ``jaxdp`` command line. Each feature module registers its own sub-commands.

A module listed in ``_COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its sub-commands with
``set_defaults(func=handler)``; ``handler(args) -> int`` is the exit status. Results go to stdout (one JSON
object with ``--json``), diagnostics to stderr.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"jaxdp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
