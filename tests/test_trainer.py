"""The config-driven trainer: config errors name the key, outputs, epsilon, budget stop, bit-identical resume."""
import json
import math
import os
import re

import numpy as np
import pytest

from jaxdp import accounting
from jaxdp.cli import main
from jaxdp.train import ConfigError, DPTrainer, compare, validate_config

import tiny


def tiny_config(tmp_path, **dp):
    return tiny.tiny_config(tmp_path / "run", **dp)


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["training"]["dp"].update(max_grad_nrom=1.0), "training.dp.max_grad_nrom"),
    (lambda c: c["training"].pop("epochs"), "training.epochs"),  # (training.seed may be left out: drawn from the OS)
    (lambda c: c["training"].update(seed=-1), "training.seed"),
    (lambda c: c.update(extra={}), "extra"),
    (lambda c: c["optimizer"].update(learning_rate=-1), "optimizer.learning_rate"),
    (lambda c: c["training"].update(accountant="gdp"), "training.accountant"),
    (lambda c: c["training"]["dp"].update(epsilon=None), "training.dp.epsilon"),
    (lambda c: c["training"]["dp"].update(delta=1.5), "training.dp.delta"),
    (lambda c: (c["training"].update(sampling="shuffle"), c["training"]["dp"].update(noise_multiplier=1.0)),
     "training.dp.neighboring_relation"),
])
def test_config_errors_name_the_key(tmp_path, mutate, key):
    cfg = tiny_config(tmp_path)
    mutate(cfg)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_yaml_scientific_notation_is_a_number():
    cfg = validate_config({"optimizer": {"learning_rate": "1e-3"},
                           "training": {"epochs": 1, "batch_size": 8, "seed": 0, "dp": {"delta": "1e-5"}}})
    assert cfg["training"]["dp"]["delta"] == 1e-5 and cfg["optimizer"]["learning_rate"] == 1e-3


def test_private_run_writes_outputs_and_epsilon_matches_accountant(tiny_private_run):
    trainer, s = tiny_private_run.trainer, tiny_private_run.summary     # tiny_config(...), trained once
    run = tiny_private_run.run_dir
    assert {"metrics.json", "config.yaml", "checkpoint"} <= set(os.listdir(run))
    with open(os.path.join(run, "metrics.json")) as f:
        m = json.load(f)
    q = 256 / trainer.n
    assert m["steps"] == math.ceil(2 / q)
    assert len(m["epochs"]) == 2 and m["epochs"][-1]["step"] == m["steps"]
    eps = accounting.compute_epsilon(m["noise_multiplier"], q, m["steps"], 1e-5, accountant="rdp")
    assert math.isclose(m["epsilon"], eps, rel_tol=1e-9) and eps <= 2.0
    assert trainer.get_privacy_spent() == (pytest.approx(eps), 1e-5)
    for key in ("noise_multiplier", "sampling", "accountant", "sample_rate", "final_test_accuracy"):
        assert m[key] is not None
    assert m["sampling"] == "poisson"
    row = m["epochs"][0]
    assert 0 <= row["clip_fraction"] <= 1 and row["layer_grad_norm_mean"] and "all" in row["group_clip_fraction"]
    assert s["final_test_accuracy"] > 0.5


def test_resume_is_bit_identical(tmp_path):
    cfg = tiny_config(tmp_path, noise_multiplier=1.0, epsilon=None)
    cfg["training"]["epochs"] = 3
    straight = DPTrainer(cfg, out_dir=str(tmp_path / "a"), log=False)
    straight.train()
    first = DPTrainer(cfg, out_dir=str(tmp_path / "b"), log=False)
    first.train(max_epochs=1)
    assert first.status == "running"
    resumed = DPTrainer(cfg, out_dir=str(tmp_path / "b"), log=False)
    resumed.train()
    import jax
    la, lb = jax.tree_util.tree_leaves(straight.state.params), jax.tree_util.tree_leaves(resumed.state.params)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
    assert straight.get_privacy_spent() == resumed.get_privacy_spent()
    assert resumed.engine.accountant.steps == straight.engine.accountant.steps


def test_log_prints_about_ten_epoch_lines_per_run(tmp_path, capsys):
    """25 epochs print the first, every 3rd and the last (10 lines), in the per-epoch line format; a run stopped
    by max_epochs prints where it stopped and its resumption where it resumed; metrics.json keeps every epoch."""
    cfg = tiny_config(tmp_path, noise_multiplier=1.0, epsilon=None)
    cfg["training"]["epochs"] = 25

    def printed():
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
        assert all(re.fullmatch(r"epoch +\d+  loss \d\.\d{4}  test acc \d\.\d{4}  epsilon \d+\.\d{3}  "
                                r"clipped \d+%  \(\d+\.\ds\)", ln) for ln in lines), lines
        return [int(ln.split()[1]) for ln in lines]

    first = DPTrainer(cfg, log=True)
    first.train(max_epochs=4)
    assert printed() == [1, 3, 4]
    rest = DPTrainer(cfg, log=True).train()
    assert printed() == [5, 6, 9, 12, 15, 18, 21, 24, 25]
    assert [r["epoch"] for r in rest["epochs"]] == list(range(1, 26))
    DPTrainer(cfg, out_dir=str(tmp_path / "straight"), log=True).train()
    assert printed() == [1, 3, 6, 9, 12, 15, 18, 21, 24, 25]


def test_a_plan_that_cannot_finish_is_refused_before_training(tmp_path):
    # sigma fixed at 0.6 with a target of 1.0: the budget would run out before the planned 2 epochs. Refused
    # before any step (issue 19 item 8), with what would fit; the budget stop itself is tested in test_engine.
    cfg = tiny_config(tmp_path, noise_multiplier=0.6, epsilon=1.0)
    with pytest.raises(ValueError, match=r"plan cannot finish.*training\.epochs <= [0-9.]+ \([0-9]+ steps\), or "
                                         r"training\.dp\.noise_multiplier >= [0-9.]+, or training\.dp\.epsilon >="):
        DPTrainer(cfg, log=False)
    assert not (tmp_path / "run").exists()
    cfg["training"]["dp"]["noise_multiplier"] = 5.0          # what the message says fits: accepted
    assert DPTrainer(cfg, log=False).private.plan_shortfall() is None


def test_clip_warnings(tmp_path):
    cfg = tiny_config(tmp_path, max_grad_norm=1e-4)
    cfg["training"]["epochs"] = 1
    with pytest.warns(UserWarning, match="too low"):
        DPTrainer(cfg, log=False).train()
    cfg = tiny_config(tmp_path, max_grad_norm=1e4, noise_multiplier=1e-3, epsilon=None)
    cfg["training"]["epochs"] = 1
    with pytest.warns(UserWarning, match="too high"):
        DPTrainer(cfg, out_dir=str(tmp_path / "high"), log=False).train()


def test_non_private_baseline_and_cli(tmp_path, capsys, tiny_nonprivate_run):
    s = tiny_nonprivate_run.summary                                   # tiny_config(..., enabled=False)
    assert s["epsilon"] is None and s["dp"] is False and s["final_test_accuracy"] > 0.5
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "cli"), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epsilon"] <= 2.0 and out["status"] == "finished"
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_compare_reports_both(tmp_path):
    s = compare(tiny_config(tmp_path), out_dir=str(tmp_path / "cmp"), log=False, progress=False)
    assert s["epsilon"] <= 2.0
    assert s["accuracy_difference"] == pytest.approx(s["non_private_accuracy"] - s["dp_accuracy"])
    assert os.path.exists(tmp_path / "cmp" / "comparison.json")


def test_audit_of_the_trained_checkpoint(tiny_nonprivate_run):
    from jaxdp.audit.cli import audit_trained_model
    trainer = tiny_nonprivate_run.trainer                             # tiny_config(..., enabled=False)
    res = audit_trained_model(tiny_nonprivate_run.run_dir)
    assert res["members"] == trainer.n and res["nonmembers"] == 360
    assert 0.0 <= res["auc"] <= 1.0 and "train vs test" in res["summary"]
    loaded = DPTrainer.load(tiny_nonprivate_run.run_dir)
    assert np.array_equal(loaded.per_example_losses("test"), trainer.per_example_losses("test"))


def test_ledger_enforcement(tmp_path, monkeypatch):
    from jaxdp.ledger import Ledger, ReservationRequiredError
    path = str(tmp_path / "ledger.db")
    led = Ledger.open(path, create=True)
    led.register_dataset("digits", max_epsilon=2.5, delta=1e-5, accountant="rdp")
    # A non-private run on the protected dataset is refused before any step.
    cfg = tiny_config(tmp_path, enabled=False)
    cfg["ledger"] = {"path": path}
    with pytest.raises(ReservationRequiredError, match="non-private"):
        DPTrainer(cfg, log=False).train()
    # A private run without reserving (reserve: false) is refused; with reserve it is charged and committed.
    cfg = tiny_config(tmp_path)
    cfg["ledger"] = {"path": path, "reserve": False}
    with pytest.raises(ReservationRequiredError, match="no reservation"):
        DPTrainer(cfg, out_dir=str(tmp_path / "r0"), log=False).train()
    cfg["ledger"] = {"path": path}
    trainer = DPTrainer(cfg, out_dir=str(tmp_path / "r1"), log=False)
    trainer.train()
    run = led.run(trainer.run_id)
    assert run.status == "committed"
    spent = led.spent("digits")
    assert spent.epsilon == pytest.approx(trainer.get_privacy_spent()[0], rel=1e-6)
    # A second epsilon-2 run composes (RDP) to about 2.9 > 2.5: refused, nothing is written.
    from jaxdp.ledger import BudgetExceededError
    with pytest.raises(BudgetExceededError):
        DPTrainer(cfg, out_dir=str(tmp_path / "r2"), log=False).train()
    # The engine refuses too (via $JAXDP_LEDGER) without a reservation for the run.
    monkeypatch.setenv("JAXDP_LEDGER", path)
    import jax.numpy as jnp
    import optax
    from jaxdp import PrivacyEngine
    with pytest.raises(ReservationRequiredError):
        PrivacyEngine(accountant="rdp").make_private(
            loss_fn=lambda p, b: jnp.zeros(b["x"].shape[0]), params={"w": jnp.zeros(2)}, optimizer=optax.sgd(0.1),
            dataset_size=100, batch_size=10, noise_multiplier=1.0, l2_clip_norm=1.0, seed=0,
            dataset_id="digits", run_id="unreserved")


# --- issue 23: per-layer and adaptive clipping from the YAML config ---------------------------------------

@pytest.mark.parametrize("dp, key", [
    ({"per_layer": "half"}, "training.dp.per_layer"),
    ({"per_layer": {"dense": -1.0}}, r"training.dp.per_layer.dense"),
    ({"per_layer": {}}, "training.dp.per_layer"),
    ({"adaptive": {"target_quantile": 1.5}}, "training.dp.adaptive.target_quantile"),
    ({"adaptive": {"lr": 0.2}}, "training.dp.adaptive.lr"),
    ({"adaptive": "yes"}, "training.dp.adaptive"),
    ({"adaptive": True, "per_layer": "equal"}, "training.dp.adaptive"),
])
def test_clipping_config_errors_name_the_key(tmp_path, dp, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(tiny_config(tmp_path, **dp))


def test_per_layer_clipping_from_config(tmp_path):
    # Unknown or missing group names are config errors that list the model's groups.
    cfg = tiny_config(tmp_path, per_layer={"dense": 0.5, "head": 1.0}, noise_multiplier=1.0, epsilon=None)
    cfg["model"] = {"name": "mlp", "options": {"hidden": [16]}}
    with pytest.raises(ConfigError, match=r"unknown group 'dense'.*\['head', 'layers'\]"):
        DPTrainer(cfg, log=False)
    cfg["training"]["dp"]["per_layer"] = {"head": 1.0}
    with pytest.raises(ConfigError, match=r"no clip norm for group\(s\) \['layers'\]"):
        DPTrainer(cfg, log=False)
    cfg["training"]["dp"]["per_layer"] = {"layers": 0.3, "head": 0.4}
    cfg["training"]["epochs"] = 1
    trainer = DPTrainer(cfg, log=False)
    m = trainer.train()
    assert m["per_layer_clip_norms"] == {"layers": 0.3, "head": 0.4}
    assert m["max_grad_norm"] == pytest.approx(0.5)                   # the sensitivity ||(0.3, 0.4)||
    assert set(m["epochs"][0]["group_clip_fraction"]) == {"layers", "head"}
    # a rule splits max_grad_norm (here 1.0) so that the sensitivity stays max_grad_norm
    from jaxdp.clip_groups import clip_norm_tree
    from jaxdp.clipping import total_clip_norm
    sizes = {"head": 16 * 10 + 10, "layers": 64 * 16 + 16}
    tree = clip_norm_tree(trainer.params0, "by_size", 1.0)
    assert total_clip_norm(tree) == pytest.approx(1.0)
    assert tree["head"] == pytest.approx((sizes["head"] / sum(sizes.values())) ** 0.5)
    assert total_clip_norm(clip_norm_tree(trainer.params0, "equal", 2.0)) == pytest.approx(2.0)


def test_adaptive_clipping_from_config(tmp_path):
    cfg = tiny_config(tmp_path, adaptive={"target_quantile": 0.5}, max_grad_norm=0.05, noise_multiplier=1.0,
                      epsilon=None)
    cfg["training"]["epochs"] = 1
    trainer = DPTrainer(cfg, log=False)
    m = trainer.train()
    a = m["adaptive_clipping"]
    assert a["target_quantile"] == 0.5 and a["learning_rate"] == 0.2 and a["normalize"] is True
    assert a["count_noise_std"] == 256 / 20 and a["effective_noise_multiplier"] > m["noise_multiplier"] == 1.0
    assert m["epochs"][0]["clip_norm"] > 0.05                       # C_t moved up from the initial 0.05
    q = 256 / trainer.n
    eps = accounting.compute_epsilon(1.0, q, m["steps"], 1e-5, accountant="rdp")
    assert math.isclose(m["epsilon"], eps, rel_tol=1e-9)
