"""The run record (``metrics.json`` as :class:`jaxdp.train.RunSummary`), the one config hash, and the audit's
config checked with the trainer's schema (issue 16, part c)."""
import json
import math
import os
import warnings

import pytest
import yaml

from jaxdp.cli import main
from jaxdp.report import build_model_privacy
from jaxdp.train import RunSummary, RunSummaryError
from jaxdp.train.summary import EpochRecord

DATA = os.path.join(os.path.dirname(__file__), "data")
V0 = os.path.join(DATA, "metrics_v0.json")   # written by the trainer of 19cf15e (before RunSummary existed)

# The config that wrote tests/data/metrics_v0.json (its output dir aside).
V0_CONFIG = {"model": {"name": "logreg"}, "data": {"name": "digits"},
             "optimizer": {"name": "sgd", "learning_rate": 2.0},
             "training": {"epochs": 2, "batch_size": 256, "seed": 7, "accountant": "rdp",
                          "dp": {"enabled": True, "epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0}},
             "output": {"dir": "elsewhere", "progress": False}}


def _v0() -> dict:
    with open(V0) as f:
        return json.load(f)


def _run_dir(tmp_path, record: dict, name: str = "run"):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(record))
    return d


# -- reading older records -------------------------------------------------------------------------------------
def test_an_older_record_reads_field_by_field_and_round_trips():
    raw = _v0()
    s = RunSummary.read(V0)
    assert s.format_version is None   # not recorded by the old trainer
    for k, v in raw.items():
        if k != "epochs":
            assert getattr(s, k) == v, k
    assert len(s.epochs) == 2 and isinstance(s.epochs[0], EpochRecord)
    assert s.epochs[1].step == raw["epochs"][1]["step"] and s.epochs[1].epsilon == raw["epochs"][1]["epsilon"]
    assert s.epochs[0].layer_grad_norm_mean == raw["epochs"][0]["layer_grad_norm_mean"]
    out = s.to_dict()
    assert out.pop("format_version") is None and out == raw   # nothing lost, nothing invented
    assert RunSummary.from_dict(s.to_dict()) == s


def test_what_a_record_lacks_is_said_to_be_not_recorded_never_defaulted(tmp_path):
    old = {k: v for k, v in _v0().items()
           if k not in ("accountant", "neighboring_relation", "mechanism", "steps", "status")}
    d = _run_dir(tmp_path, old)
    s = RunSummary.read(d)
    assert (s.accountant, s.neighboring_relation, s.mechanism, s.steps, s.status) == (None,) * 5
    card = build_model_privacy(str(d))
    assert card["accountant"] is None and card["steps"] is None and card["neighboring_relation"] is None
    g = card["guarantee"]
    assert "accountant not recorded" in g and "relation not recorded" in g and "T=not recorded steps" in g
    assert "a mechanism that was not recorded" in g and "DP-SGD" not in g   # the mechanism is not guessed
    assert card["mechanism"] == "not recorded"
    assert any("status was not recorded" in c for c in card["caveats"])
    assert "ε=2" in g and "δ=1e-05" in g   # what IS recorded is stated


@pytest.mark.parametrize("field,value", [
    ("steps", "twelve"), ("delta", 2.0), ("sample_rate", 0.0), ("epsilon", -1.0), ("dp", "yes"),
    ("epochs", {"1": 2}), ("mechanism", "fancy"), ("training_set_size", 1.5), ("format_version", 99)])
def test_a_damaged_record_names_the_file_and_the_field(tmp_path, field, value):
    d = _run_dir(tmp_path, dict(_v0(), **{field: value}))
    with pytest.raises(RunSummaryError) as e:
        RunSummary.read(d)
    assert e.value.field == field and e.value.path == str(d / "metrics.json")
    assert str(d / "metrics.json") in str(e.value) and repr(field) in str(e.value)


def test_damage_inside_an_epoch_row_and_broken_json(tmp_path):
    m = _v0()
    m["epochs"][1]["epsilon"] = "lots"
    with pytest.raises(RunSummaryError, match=r"field 'epochs\[1\]\.epsilon' must be a number >= 0"):
        RunSummary.read(_run_dir(tmp_path, m, "a"))
    d = tmp_path / "b"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(_v0())[:200])   # a truncated file
    with pytest.raises(RunSummaryError, match="is not valid JSON"):
        RunSummary.read(d)
    (d / "metrics.json").write_text("[1, 2]")
    with pytest.raises(RunSummaryError, match="must hold a JSON object"):
        RunSummary.read(d)


def test_the_clis_refuse_a_damaged_record_with_one_line_and_exit_2(tmp_path, capsys):
    d = _run_dir(tmp_path, dict(_v0(), steps="twelve"))
    (d / "config.yaml").write_text(yaml.safe_dump(V0_CONFIG))
    for argv in (["report", "--run", str(d)], ["audit", "--run", str(d), "--attack", "one_run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "metrics.json: field 'steps' must be an integer" in err, err


def test_a_blt_run_can_be_recorded_and_is_named_on_the_card(tmp_path):
    s = RunSummary.from_dict(dict(_v0(), mechanism="blt", buffers=2, sampling="fixed_order", bands=None,
                                  expected_batch_size=256.0))
    assert RunSummary.from_dict(s.to_dict()) == s and s.to_dict()["buffers"] == 2
    s.write(tmp_path)
    card = build_model_privacy(str(tmp_path))
    assert card["mechanism"].startswith("BLT") and card["buffers"] == 2
    assert card["guarantee"].startswith("Trained with BLT (buffered linear Toeplitz noise with d=2 buffers, one "
                                        "fixed secret order of batches of 256")
    assert "at most not recorded steps" in card["guarantee"]   # min_separation / horizon absent: never guessed


def test_write_is_atomic_and_read_back_equal(tmp_path):
    s = RunSummary.read(V0)
    path = s.write(tmp_path)
    assert RunSummary.read(path) == s.replace(format_version=1)   # the writer writes the current format
    assert [p for p in os.listdir(tmp_path) if p != "metrics.json"] == []   # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="jaxdp train"):
        RunSummary.read(tmp_path / "nothing")


def test_non_finite_numbers_are_written_as_strict_json_and_read_back(tmp_path):
    """A diverged run (NaN loss) or a non-private one (epsilon inf) used to write NaN / Infinity literals, which
    strict JSON readers (jq, browsers, most languages) refuse. They are spelled "nan" / "inf" now, and read back as
    the numbers -- not as "not recorded"."""
    s = RunSummary.read(V0).replace(epsilon=math.inf,
                                    epochs=[EpochRecord(epoch=1, train_loss=math.nan,
                                                        layer_grad_norm_mean={"w": math.inf}).to_dict()])
    path = s.write(tmp_path)
    text = open(path).read()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in metrics.json"))
    back = RunSummary.read(path)
    assert back.epsilon == math.inf
    assert math.isnan(back.epochs[0].train_loss) and back.epochs[0].layer_grad_norm_mean == {"w": math.inf}
    old = tmp_path / "old"                                   # files written before: NaN literals still read
    old.mkdir()
    (old / "metrics.json").write_text(text.replace('"nan"', "NaN").replace('"inf"', "Infinity"))
    assert math.isnan(RunSummary.read(old / "metrics.json").epochs[0].train_loss)


# -- one config hash -------------------------------------------------------------------------------------------
def test_one_config_hash_and_the_ledger_alias_warns():
    import jaxdp.ledger
    from jaxdp.train import config_hash, validate_config
    recorded = _v0()["config_hash"]   # what the trainer recorded for this config
    assert config_hash(V0_CONFIG) == config_hash(validate_config(V0_CONFIG)) == recorded
    with pytest.warns(DeprecationWarning, match="jaxdp.train.config_hash"):
        assert jaxdp.ledger.config_hash(V0_CONFIG) == recorded


def test_a_reservation_made_as_docs_ledger_md_shows_is_adopted_by_the_trainer(tmp_path):
    """docs/ledger.md reserves with ``config_hash=config_hash(cfg)``; the trainer used to refuse that run as
    "reserved for another config" because the ledger hashed the config differently."""
    import jaxdp.ledger as ledger
    from jaxdp.train import DPTrainer
    led = ledger.Ledger.open(str(tmp_path / "l.db"), create=True)
    led.register_dataset("digits", max_epsilon=8.0, delta=1e-5, accountant="rdp")
    cfg = json.loads(json.dumps(V0_CONFIG))
    cfg["training"]["epochs"] = 1
    cfg["output"]["dir"] = str(tmp_path / "run")
    cfg["ledger"] = {"path": str(tmp_path / "l.db"), "dataset_id": "digits", "run_id": "docs-run"}
    trainer = DPTrainer(cfg, log=False)
    events = [{"sampling": "poisson", "noise_multiplier": trainer.noise_multiplier,
               "sample_rate": trainer.sampler.sample_rate, "steps": trainer.total_steps, "l2_clip_norm": 1.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        led.reserve("digits", "docs-run", events, model="logreg", config_hash=ledger.config_hash(cfg),
                    code_version=ledger.code_version())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*examples were clipped")
        result = trainer.train()
    assert result["status"] == "finished" and result["run_id"] == "docs-run"
    assert led.run("docs-run").status == "committed"


# -- one name each; the old ones warn --------------------------------------------------------------------------
def test_old_names_are_deprecated_aliases(tmp_path):
    from jaxdp.audit import plot as audit_plot
    from jaxdp.audit import shadow
    from jaxdp.audit.cli import load_config as old_load_config
    from jaxdp.report import plots
    from jaxdp.train import trainer, validate_config
    assert plots.plot_roc is audit_plot.plot_roc   # one ROC plot
    cfg = validate_config(V0_CONFIG)
    with pytest.warns(DeprecationWarning, match="build_optimizer"):
        trainer._optimizer(cfg, 10)
    with pytest.warns(DeprecationWarning, match="build_optimizer"):
        shadow._optimizer(shadow.ShadowConfig(optimizer="adam"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(V0_CONFIG))
    with pytest.warns(DeprecationWarning, match="load_audit_config"):
        assert old_load_config(str(tmp_path / "c.yaml"))["optimizer"]["learning_rate"] == 2.0


def test_the_audit_builds_the_same_optimiser_as_before():
    import jax.numpy as jnp
    import optax
    from jaxdp.audit.shadow import ShadowConfig, _build_optimizer
    g, p = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.5, 0.5])}
    for sc, ref in ((ShadowConfig(optimizer="adam", learning_rate=0.01), optax.adam(0.01)),
                    (ShadowConfig(optimizer="sgd", momentum=0.9), optax.sgd(0.1, momentum=0.9)),
                    (ShadowConfig(optimizer="sgd", momentum=None), optax.sgd(0.1))):
        tx = _build_optimizer(sc)
        s1, s2 = tx.init(p), ref.init(p)
        for _ in range(3):
            u1, s1 = tx.update(g, s1, p)
            u2, s2 = ref.update(g, s2, p)
            assert jnp.allclose(u1["w"], u2["w"], rtol=1e-6), sc


# -- the audit reads configs by the trainer's rules ------------------------------------------------------------
AUDIT_CFG = {"model": {"name": "mlp", "options": {"hidden": [16]}}, "optimizer": {"learning_rate": 0.1},
             "training": {"epochs": 6, "batch_size": 287, "seed": 0,
                          "dp": {"enabled": True, "epsilon": 1.0, "delta": 1e-5}}}


def test_a_typo_in_the_audit_config_is_an_error_not_a_default(tmp_path, capsys):
    from jaxdp.audit.cli import recipe_from_config
    from jaxdp.train import ConfigError
    typo = json.loads(json.dumps(AUDIT_CFG))
    typo["optimizer"] = {"learning_rte": 0.5}
    with pytest.raises(ConfigError, match="optimizer.learning_rte"):
        recipe_from_config(typo, "one_run")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    assert main(["audit", "--config", str(tmp_path / "typo.yaml"), "--attack", "one_run"]) == 2
    assert "unknown config key 'optimizer.learning_rte'" in capsys.readouterr().err
    old = dict(AUDIT_CFG, training=dict(AUDIT_CFG["training"], steps=30))   # the former audit format
    with pytest.raises(ConfigError, match="'training.steps' is not read any more: write training.epochs"):
        recipe_from_config(old, "one_run")
    with pytest.raises(ConfigError, match="audit.pool_sise"):
        recipe_from_config(dict(AUDIT_CFG, audit={"pool_sise": 10}), "one_run")


def test_a_fixed_sigma_run_is_audited_against_its_own_accounted_epsilon():
    from jaxdp.audit import _accounting
    from jaxdp.audit.cli import recipe_from_config
    from jaxdp.train import validate_config
    fixed = json.loads(json.dumps(AUDIT_CFG))
    fixed["training"]["dp"] = {"enabled": True, "noise_multiplier": 1.5, "delta": 1e-5}   # no target epsilon
    # A config alone: the accountant's epsilon of the noise, not the trainer's default target (3).
    _, _, _, info = recipe_from_config(fixed, "one_run")
    want = _accounting.compute_epsilon(1.5, info["sample_rate"], info["steps"], 1e-5)
    assert info["claimed_epsilon"] == pytest.approx(want) and abs(info["claimed_epsilon"] - 3.0) > 0.1
    # A run: the config.yaml the trainer wrote holds the default target 3; the record's accounted epsilon wins.
    written = validate_config(fixed)
    assert written["training"]["dp"]["epsilon"] == 3.0
    record = {"dp": True, "epsilon": 0.7, "delta": 1e-5, "noise_multiplier": 1.5, "steps": 30, "sample_rate": 0.2}
    _, _, _, info = recipe_from_config(written, "one_run", record)
    assert info["claimed_epsilon"] == 0.7 and info["steps"] == 30
    # A run whose record holds no finite epsilon (noise 0) claims none: never the config's default target.
    zero = dict(record, epsilon=None, noise_multiplier=0.0)
    _, _, _, info = recipe_from_config(written, "one_run", zero)
    assert math.isinf(info["claimed_epsilon"]) and info["noise_multiplier"] == 0.0


def test_the_audit_reads_a_runs_record_typed(tmp_path):
    from jaxdp.audit.cli import _run_dir_config
    d = _run_dir(tmp_path, _v0())
    (d / "config.yaml").write_text(yaml.safe_dump(V0_CONFIG))
    raw, record = _run_dir_config(str(d))
    assert isinstance(record, RunSummary) and record == RunSummary.read(V0) and raw["training"]["seed"] == 7
    os.remove(d / "metrics.json")
    assert _run_dir_config(str(d))[1] is None   # an interrupted run without a record: the config alone


def test_the_shipped_audit_configs_keep_their_recipes():
    """jaxdp/configs/audit_*.yaml, moved to the trainer's schema, describe the same recipes as before."""
    from jaxdp.audit.cli import recipe_from_config
    from jaxdp.audit.config import load_audit_config
    here = os.path.join(os.path.dirname(__file__), "..", "jaxdp", "configs")
    want = {"audit_broken_noise": (100, 0.0, True, "one_run"), "audit_broken_clipping": (100, None, False, "one_run"),
            "audit_digits_lira": (300, 0.0, True, "lira")}
    for name, (steps, sigma, clip, attack) in want.items():
        sc, _, _, info = recipe_from_config(load_audit_config(os.path.join(here, name + ".yaml")), attack)
        assert sc.steps == steps and sc.clip is clip, name
        assert sigma is None or sc.noise_multiplier == sigma, name
        assert info["claimed_epsilon"] == (1.0 if sc.dp else math.inf), name
    assert sc.optimizer == "adam" and sc.sample_rate == 1.0 and sc.hidden == (128,)
