"""What every ``jaxdp`` command shares: the ``--json`` flag, the JSON rule and the error -> exit-status map.

The exit statuses are documented for users in ``docs/cli.md``:

====  =========================================================================================================
0     success
1     refused: the privacy ledger said no (budget exceeded, no reservation, integrity check failed), the privacy
      budget is spent, ``ledger verify`` found a problem, an audit FAILED, or a ``launch`` process failed
2     bad input or a store that cannot be used: one line on stderr, ``jaxdp COMMAND: error: MESSAGE``
3     ``jaxdp audit`` only: inconclusive (the claim is at or above what the audit can detect)
124   ``jaxdp launch --timeout`` ran out
130   interrupted (Ctrl-C)
141   stdout was closed by its reader (``jaxdp ledger show | head``)
====  =========================================================================================================

With ``--json`` every command prints exactly one JSON object on stdout, also when it fails: then
``{"ok": false, "error": TYPE, "message": MESSAGE, "exit_status": N}`` (plus ``details`` where the error has
them). The JSON is strict RFC 8259: an infinite number is written as the string ``"inf"`` (``"-inf"``), NaN as
``null`` (:func:`jsonable`), so any JSON parser reads it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_INCONCLUSIVE = 0, 1, 2, 3
EXIT_TIMEOUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 124, 130, 141

# jaxdp errors (by class name, anywhere in the error's class hierarchy) that mean "refused", not "bad input".
# Matched by name so that this module imports nothing heavy; every other jaxdp error is a ValueError/OSError.
_REFUSALS = frozenset({"BudgetExceededError", "ReservationRequiredError", "LedgerIntegrityError",
                       "PrivacyBudgetExhausted"})
# Errors a user can cause with input (a config, an option, a file, a store): one line and EXIT_USAGE. Anything
# else is a bug in jaxdp and keeps its traceback.
_USAGE_ERRORS = (ValueError, KeyError, OSError, OverflowError, RecursionError, MemoryError)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line to print (it names the command and what state it left, e.g. how to resume):
    exit status 130."""


def add_json_flag(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """The one definition of ``--json`` (every command that prints a result has it)."""
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON object on stdout (an error object on failure)")


def jsonable(value: Any) -> Any:
    """``value`` with every float JSON can hold: ``inf`` -> ``"inf"``, ``-inf`` -> ``"-inf"``, NaN -> ``None``;
    numpy scalars and arrays become Python numbers and lists, tuples lists, mapping keys strings.

    Example:
        >>> jsonable({"epsilon": float("inf"), "auc": float("nan"), "steps": (1, 2)})
        {'epsilon': 'inf', 'auc': None, 'steps': [1, 2]}
    """
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":  # numpy scalars and arrays
        return jsonable(value.tolist())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (RFC 8259: never ``Infinity`` or ``NaN``) after :func:`jsonable`.

    Example:
        >>> dumps({"epsilon": float("inf")})
        '{"epsilon": "inf"}'
    """
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)


def emit(args: argparse.Namespace, obj: Any, text: str | None = None) -> None:
    """Print ``obj`` as one JSON object with ``--json``, else ``text`` (nothing when ``text`` is None)."""
    if getattr(args, "json", False):
        print(dumps(obj, sort_keys=True))
    elif text is not None:
        print(text)


def one_line(x: Any) -> str:
    """``str(x)`` printable on one line: control characters (newlines, ANSI escapes) shown escaped, so that text
    from a store or an error can never forge lines of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(x))


def message(e: BaseException) -> str:
    """The user-facing text of an error (a KeyError's text without quotes; an OSError as ``PATH: reason``)."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return one_line(text)


def exit_status(e: BaseException) -> int | None:
    """The exit status for an error, or None for a bug (the traceback is shown)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if any(c.__name__ in _REFUSALS and c.__module__.startswith("jaxdp.") for c in type(e).__mro__):
        return EXIT_REFUSED
    if isinstance(e, _USAGE_ERRORS):
        return EXIT_USAGE
    return None


def fail(command: str, e: BaseException, as_json: bool) -> int | None:
    """Report ``e`` as ``jaxdp COMMAND: error: MESSAGE`` on stderr (and the JSON error object on stdout with
    ``--json``); returns the exit status, or None when ``e`` is a bug to re-raise."""
    code = exit_status(e)
    if code is None:
        return None
    text = message(e) or "interrupted"
    if as_json:
        obj = {"ok": False, "error": type(e).__name__, "message": text, "exit_status": code}
        if getattr(e, "details", None) is not None:
            obj["details"] = e.details  # type: ignore[attr-defined]
        print(dumps(obj, sort_keys=True), flush=True)
    if isinstance(e, Interrupted):  # its message is the whole line, e.g. how to resume
        line = "\n" + text
    elif code == EXIT_INTERRUPTED:
        line = f"\njaxdp {command}: interrupted"
    else:
        line = f"jaxdp {command}: error: {text}"
    print(line, file=sys.stderr)
    return code


__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "EXIT_INCONCLUSIVE", "EXIT_TIMEOUT", "EXIT_INTERRUPTED",
           "EXIT_BROKEN_PIPE", "Interrupted", "add_json_flag", "jsonable", "dumps", "emit", "one_line", "message",
           "exit_status", "fail"]
