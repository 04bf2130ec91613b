"""Every example in examples/ runs in its tiny mode (issue 19: examples for the main ways to use jaxdp).

The cheap ones run in the default suite; those that compile a CNN, a transformer or shadow models are
``slow`` (``make test-slow``)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"jaxdp_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # Linen modules are dataclasses: their module must be registered
    spec.loader.exec_module(module)
    return module


def test_optax_loop_example():
    r = _load("optax_loop").main(["--tiny"])
    assert r["steps"] == r["planned_steps"] == 12          # one epoch = ceil(1437 / 128) Poisson steps
    assert r["accuracy"] > 0.3 and 0 < r["epsilon"] < 10


@pytest.mark.slow
def test_cnn_images_example():
    r = _load("cnn_images").main(["--tiny"])
    assert r["steps"] == r["planned_steps"] and r["epsilon"] <= r["target_epsilon"]


@pytest.mark.slow
def test_linen_engine_example():
    r = _load("linen_engine").main(["--tiny"])
    assert r["steps"] == r["planned_steps"] and r["epsilon"] <= r["target_epsilon"]
    assert r["accuracy"] > 0.1


@pytest.mark.slow
def test_lora_gpt2_example():
    r = _load("lora_gpt2").main(["--tiny"])
    assert r["steps"] == 4 and r["epsilon"] <= r["target_epsilon"] and r["merged"] == "GPT2"


@pytest.mark.slow
def test_audit_card_report_example(tmp_path):
    r = _load("audit_card_report").main(["--tiny", "--out", str(tmp_path)])
    mp = r["model_privacy"]
    assert mp["private"] and mp["epsilon"] <= 3.0 and mp["membership_inference_auc"] is not None
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "report.md").exists()


def test_tabular_csv_example(tmp_path):
    """A user's CSV and own NNX module through the YAML trainer, then a model card (default suite, RDP)."""
    from jaxdp.train.trainer import DPTrainer
    r = _load("tabular_csv").main(["--tiny", "--out", str(tmp_path)])
    m = r["metrics"]
    assert m["steps"] == m["planned_steps"] > 0 and m["status"] == "finished"
    assert m["epsilon"] <= r["target_epsilon"] and m["accountant"] == "rdp" and m["sampling"] == "poisson"
    assert m["model"] == "tabular_model.py:WideAndDeep"      # the user's module, named without its absolute path
    assert str(tmp_path) not in (tmp_path / "run" / "model_card.yaml").read_text()
    assert m["final_test_accuracy"] > 0.45                     # 3 classes: chance is about 0.33
    reloaded = DPTrainer.load(r["run"])                        # the run directory alone rebuilds the user's model
    assert type(reloaded.model).__name__ == "WideAndDeep"
    assert abs(reloaded.evaluate() - m["final_test_accuracy"]) < 1e-9
    mp = r["model_privacy"]
    assert mp["private"] and mp["epsilon"] == m["epsilon"] and mp["model"] == m["model"]
    assert "(ε=3, δ=0.001)" in mp["guarantee"] and "add/remove" in mp["guarantee"]
