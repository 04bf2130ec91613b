"""Issue 19 (a newcomer's first week): delta >= 1/N refused unless overridden (and then recorded); bad data
refused with the file, the column and the count; shapes checked against the model before training."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdp.train import DPTrainer


def tiny_config(tmp_path, data="digits", **dp):
    return {
        "model": {"name": "logreg"},
        "data": {"name": str(data)},
        "optimizer": {"name": "sgd", "learning_rate": 2.0},
        "training": {"epochs": 1, "batch_size": 256, "seed": 7, "accountant": "rdp",
                     "dp": dict({"enabled": True, "epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0,
                                 "noise_multiplier": None}, **dp)},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }


def test_train_refuses_delta_at_least_one_over_n_unless_overridden_and_recorded(tmp_path):
    from jaxdp.report.modelcard import build_model_privacy
    with pytest.raises(ValueError, match=r"not below 1/N = 1/1437.*training\.dp\.allow_large_delta: true"):
        DPTrainer(tiny_config(tmp_path, delta=0.01), log=False)
    assert not (tmp_path / "run").exists()
    with pytest.warns(UserWarning, match="not below 1/N"):
        trainer = DPTrainer(tiny_config(tmp_path, delta=0.01, allow_large_delta=True), log=False)
    trainer.train(max_epochs=1)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["delta"] == 0.01 and m["delta_at_least_one_over_n"] is True
    section = build_model_privacy(str(tmp_path / "run"))
    assert "not below 1/N" in section["caveats"][0]


def test_make_private_reports_a_plan_that_cannot_finish():
    import jax.numpy as jnp
    import optax

    import jaxdp
    kw = dict(loss_fn=lambda p, b: jnp.zeros(b["x"].shape[0]), params={"w": jnp.zeros(2)}, optimizer=optax.sgd(0.1),
              dataset_size=1000, batch_size=100, max_grad_norm=1.0, seed=0, target_epsilon=1.0,
              target_delta=1e-5)
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match=r"plan cannot finish: 300 steps .* epochs <= [0-9.]+ .*noise_multiplier >= "):
        private = engine.make_private(noise_multiplier=0.8, epochs=30, **kw)
    assert private.max_steps < private.planned_steps == 300
    fits = jaxdp.PrivacyEngine(accountant="rdp").make_private(noise_multiplier=5.0, epochs=1, **kw)
    assert fits.plan_shortfall() is None
