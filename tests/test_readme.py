"""The README's Python code blocks run verbatim, in order, in one namespace (as a reader would paste them)."""
from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_verbatim(capsys):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "the README's Python API section lost its code blocks"
    ns: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)   # noqa: S102 -- our own README
    # The Python API loop: 30 epochs of private.batches() are exactly the planned steps, within the target.
    private = ns["private"]
    assert private.steps_taken == private.planned_steps == private.max_steps == 169
    assert private.get_epsilon(1e-5) <= 3.0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 30 and lines[-1].startswith("29 ")
    assert ns["trained"] is not None
    # The low-level block: one private update of a pure-JAX model.
    assert int(ns["stats"].num_examples) > 0 and set(ns["params"]) == {"w", "b"}


def test_public_errors_are_exported():
    import jaxdp
    from jaxdp.engine import PrivacyBudgetExhausted
    from jaxdp.ledger import BudgetExceededError, LedgerError
    from jaxdp.train.config import ConfigError
    assert jaxdp.PrivacyBudgetExhausted is PrivacyBudgetExhausted
    assert jaxdp.LedgerError is LedgerError and jaxdp.BudgetExceededError is BudgetExceededError
    assert jaxdp.ConfigError is ConfigError
    assert issubclass(jaxdp.ModelValidationError, ValueError)
    for name in ("PrivacyBudgetExhausted", "ModelValidationError", "ConfigError", "LedgerError"):
        assert name in jaxdp.__all__
