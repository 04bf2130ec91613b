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
