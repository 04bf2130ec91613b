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


def _readme_figures_module():
    import importlib.util
    path = README.parent / "benchmarks" / "readme_figures.py"
    spec = importlib.util.spec_from_file_location("readme_figures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_audit_and_lm_figures_equal_the_committed_json():
    """The README's LiRA rows and LM exposure table are the text `benchmarks/readme_figures.py` derives from its
    committed JSON (ranges over seeds): editing either side alone fails."""
    mod = _readme_figures_module()
    snippets = mod.readme_snippets()
    assert {"lira_non_private", "lira_dp", "lm_table"} <= set(snippets), "benchmarks/results lost a README section"
    readme = README.read_text()
    for name, text in snippets.items():
        assert text in readme, f"README.md does not state what benchmarks/results holds ({name}): {text}"


def test_readme_snippets_follow_the_json():
    """The snippet generator reads the numbers (a changed number changes the text), so the test above can fail."""
    import copy
    import json
    mod = _readme_figures_module()
    with open(mod.JSON["lira"]) as f:
        lira = json.load(f)
    with open(mod.JSON["lm"]) as f:
        lm = json.load(f)
    base = mod.readme_snippets({"lira": lira, "lm": lm})
    lira2, lm2 = copy.deepcopy(lira), copy.deepcopy(lm)
    lira2["runs"][0]["dp_epsilon_3"]["loss_threshold"]["auc"] = 0.999
    lm2["runs"][0]["exposure"]["DP LoRA (eps=8)"]["never inserted"] = 15.0
    changed = mod.readme_snippets({"lira": lira2, "lm": lm2})
    assert changed["lira_dp"] != base["lira_dp"] and "0.999" in changed["lira_dp"]
    assert changed["lm_table"] != base["lm_table"] and "15.00" in changed["lm_table"]
