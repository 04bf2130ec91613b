"""Issue 19 part B, a newcomer's first week: no traceback on jaxdp's own paths (one line, exit 2), clear messages,
what a YAML config can name (own module, any optax optimiser, schedules, public standardisation), model cards that
keep their formatting (and Hugging Face front matter), CLI help and polish, seeds drawn from the OS."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from jaxdp.cli import build_parser, main
from jaxdp.train import ConfigError, DPTrainer, validate_config

pytestmark = pytest.mark.filterwarnings("ignore:.*examples were clipped")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(out, **training):
    return {"model": {"name": "logreg"}, "data": {"name": "digits"},
            "optimizer": {"name": "sgd", "learning_rate": 2.0},
            "training": dict({"epochs": 1, "batch_size": 256, "seed": 7, "accountant": "rdp",
                              "dp": {"enabled": True, "epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0,
                                     "noise_multiplier": None}}, **training),
            "output": {"dir": str(out), "progress": False}}


def write_cfg(tmp_path, cfg, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def one_line_error(capsys, argv, *must):
    """``jaxdp ARGV`` exits 2 with one line on stderr (no traceback) that contains every string in ``must``."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for m in must:
        assert m in err, err
    return err


def tiny_csv(path, n=60, features=3, zero_free=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(n, features)) + (1.0 if zero_free else 0.0)
    y = (x[:, 0] > 3.0).astype(int) + (x[:, 1] > 3.0).astype(int)
    with open(path, "w") as f:
        f.write(",".join([f"f{i}" for i in range(features)] + ["label"]) + "\n")
        for row, label in zip(x, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")
    return x.astype(np.float32), y


# ------------------------------------------------------------------------------- 5. no tracebacks, exit 2
def test_fixed_sigma_too_small_for_target_prints_no_typeerror(tmp_path, capsys):
    cfg = tiny(tmp_path / "run")
    cfg["training"]["dp"].update(noise_multiplier=0.5, epsilon=0.1)  # step 1 already exceeds epsilon 0.1
    # A plan that cannot finish is refused before training (issue 19 item 8): one line, exit 2, no TypeError.
    one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, cfg), "--no-progress"], "cannot finish")
    assert not (tmp_path / "run").exists()


def _fake_run(d, **metrics):
    os.makedirs(d, exist_ok=True)
    m = dict(dp=True, epsilon=None, delta=1e-5, noise_multiplier=0.0, max_grad_norm=1.0, sampling="poisson",
             sample_rate=0.1, expected_batch_size=10.0, steps=10, training_set_size=100, dataset="digits",
             model="logreg", run_id="r", status="finished", accountant="rdp", epochs=[], jaxdp_version="0")
    m.update(metrics)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(m, f)
    return str(d)


def test_report_on_a_run_with_noise_multiplier_0(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert main(["report", "--run", run]) == 0
    card = yaml.safe_load(capsys.readouterr().out)["model_privacy"]
    assert "NO differential-privacy guarantee" in card["guarantee"] and "ε = ∞" in card["guarantee"]


def test_corrupt_npz_and_data_option_typo_and_out_is_a_file(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    cfg = tiny(tmp_path / "run")
    cfg["data"]["name"] = str(bad)
    one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, cfg)], "bad.npz is not a readable .npz file")
    cfg = tiny(tmp_path / "run")
    cfg["data"]["options"] = {"lable_column": "y"}
    one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, cfg)], "'lable_column'", "takes no options")
    tiny_csv(tmp_path / "t.csv")
    cfg = tiny(tmp_path / "run")
    cfg["data"] = {"name": str(tmp_path / "t.csv"), "options": {"lable_column": "label"}}
    one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, cfg)], "'lable_column'", "label_column")
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, tiny(tmp_path / "run")), "--out",
                            str(tmp_path / "afile")], "is a file")
    assert not (tmp_path / "run").exists()


def test_ledger_show_into_a_closed_pipe_is_quiet(tmp_path, capsys):
    led = str(tmp_path / "l.db")
    assert main(["ledger", "init", "--ledger", led, "--dataset-id", "d", "--max-epsilon", "5", "--delta", "1e-5"]) == 0
    capsys.readouterr()
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written (as after `| head -1`)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "jaxdp", "ledger", "show", "--ledger", led], stdout=w,
                       stderr=subprocess.PIPE, env=env, cwd=REPO, timeout=120)
    os.close(w)
    assert p.stderr.decode() == "" and p.returncode == 141


# ------------------------------------------------------------------------------- 6. clear messages
def test_cryptic_messages_made_clear(tmp_path, capsys):
    from jaxdp import models
    from jaxdp.data import load_csv
    tiny_csv(tmp_path / "t.csv")
    cfg = tiny(tmp_path / "run", batch_size=10)
    cfg["data"] = {"name": str(tmp_path / "t.csv")}
    del cfg["model"]  # the default cnn_small on feature vectors
    one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, cfg)], "feature vector", "mlp")
    with pytest.raises(ValueError, match=r"hidden: \[128\]"):
        models.create("mlp", (4,), 3, hidden=128)
    with pytest.raises(ValueError, match="test_fraction"):
        load_csv(tmp_path / "t.csv", test_fraction=0)
    cfg = tiny(tmp_path / "run", batch_size=5000)
    one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, cfg)], "training.batch_size", "1437")


def test_model_input_shape_is_checked_before_tracing():
    from flax import nnx

    from jaxdp.models import check_model_input
    with pytest.raises(ValueError, match=r"examples have shape \(4,\).*Linear|examples have shape \(4,\)"):
        check_model_input(nnx.Linear(10, 3, rngs=nnx.Rngs(0)), (4,), 3)
    with pytest.raises(ValueError, match=r"logits of shape \[B, 3\].*\(2, 5\)"):
        check_model_input(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), (4,), 3)
    check_model_input(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), (4,), 3)


def test_scalar_loss_message_reports_the_batch_size():
    import optax
    from flax import nnx

    import jaxdp

    def mean_loss(model, batch):  # reduced over the batch: the classic mistake
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()

    p = jaxdp.PrivacyEngine(accountant="rdp").make_private(
        loss_fn=mean_loss, model=nnx.Linear(4, 3, rngs=nnx.Rngs(0)), optimizer=optax.sgd(0.1), dataset_size=100,
        batch_size=10, noise_multiplier=1.0, l2_clip_norm=1.0, seed=0)
    data = {"x": np.zeros((100, 4), np.float32), "y": np.zeros(100, np.int32)}
    batch, mask = next(p.batches(data, 1))
    rows = len(mask)
    with pytest.raises(ValueError, match=rf"shape \[B\] = \[{rows}\] for this batch of {rows} rows.*got shape \(\)"):
        p.step(p.init(), batch, mask)
    assert p.steps_taken == 0 if hasattr(p, "steps_taken") else True


# ------------------------------------------------------------------------------- 9. YAML trainer reach
def test_optimizer_by_name_with_weight_decay_and_schedule():
    import jax.numpy as jnp
    import optax

    from jaxdp.train.components import build_optimizer, build_schedule
    sched = build_schedule(0.1, {"name": "cosine_decay_schedule", "decay_steps": "total_steps"}, 50)
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(50)) == pytest.approx(0.0, abs=1e-9)
    params = {"w": jnp.ones(3)}
    zero = {"w": jnp.zeros(3)}
    for name in ("sgd", "adamw", "lion"):  # adamw takes weight_decay itself, sgd/lion get add_decayed_weights
        tx = build_optimizer({"name": name, "learning_rate": 0.1, "weight_decay": 0.5, "options": {}}, 10)
        upd, _ = tx.update(zero, tx.init(params), params)
        assert float(optax.apply_updates(params, upd)["w"][0]) < 1.0, name  # decay shrinks with zero gradient
    tx = build_optimizer({"name": "sgd", "learning_rate": 0.1, "weight_decay": 0.0}, 10)
    upd, _ = tx.update(zero, tx.init(params), params)
    assert float(optax.apply_updates(params, upd)["w"][0]) == 1.0
    for bad, key in (({"name": "adamx"}, "optimizer.name"), ({"name": "adam", "options": {"bogus": 1}}, "optimizer"),
                     ({"schedule": {"name": "cosine_decay_schedule"}}, "optimizer.schedule")):
        cfg = {"optimizer": dict({"learning_rate": 0.1}, **bad), "training": {"epochs": 1, "batch_size": 8}}
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(cfg)


def test_standardisation_uses_public_statistics_only(tmp_path):
    from jaxdp.data import load_csv
    x, _ = tiny_csv(tmp_path / "t.csv")
    with pytest.raises(ValueError, match="leak"):
        load_csv(tmp_path / "t.csv", standardize=True)
    raw = load_csv(tmp_path / "t.csv")
    st = load_csv(tmp_path / "t.csv", standardize={"mean": [1.0, 2.0, 3.0], "std": 2.0})
    np.testing.assert_allclose(st.x_train, (raw.x_train - np.array([1.0, 2.0, 3.0])) / 2.0, rtol=1e-6)
    pub, _ = tiny_csv(tmp_path / "public.csv", seed=1)
    st = load_csv(tmp_path / "t.csv", standardize={"public_csv": str(tmp_path / "public.csv")})
    np.testing.assert_allclose(st.x_test, (raw.x_test - pub.mean(0)) / pub.std(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="3 feature columns"):
        load_csv(tmp_path / "t.csv", standardize={"mean": [0.0, 0.0], "std": 1.0})


def test_own_flax_module_from_yaml_on_csv(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "from flax import nnx\n"
        "class Net(nnx.Module):\n"
        "    def __init__(self, input_shape, num_classes, *, width=8, rngs):\n"
        "        self.a = nnx.Linear(input_shape[0], width, rngs=rngs)\n"
        "        self.b = nnx.Linear(width, num_classes, rngs=rngs)\n"
        "    def __call__(self, x):\n"
        "        return self.b(nnx.tanh(self.a(x)))\n")
    tiny_csv(tmp_path / "t.csv", n=200)
    cfg = tiny(tmp_path / "run", batch_size=40, epochs=1)
    cfg["model"] = {"module": "mymodel.py:Net", "kwargs": {"width": 6}}
    cfg["data"] = {"name": str(tmp_path / "t.csv"), "options": {"standardize": {"mean": 4.0, "std": 2.0}}}
    cfg["optimizer"] = {"name": "adamw", "learning_rate": 0.05, "weight_decay": 1e-3,
                        "schedule": {"name": "cosine_decay_schedule", "decay_steps": "total_steps"}}
    path = write_cfg(tmp_path, cfg)
    trainer = DPTrainer(path, log=False)
    assert type(trainer.model).__name__ == "Net" and trainer.model.a.out_features == 6
    s = trainer.train()
    assert s["steps"] == s["planned_steps"] > 0 and s["model"] == "mymodel.py:Net"   # file name, not absolute path
    cfg["model"] = {"module": "mymodel.py:Nett"}
    with pytest.raises(ValueError, match="model.module.*no attribute 'Nett'"):
        DPTrainer(write_cfg(tmp_path, cfg), log=False)
    cfg["model"] = {"module": "mymodel.py:Net", "name": "mlp"}
    with pytest.raises(ConfigError, match="model.name"):
        DPTrainer(write_cfg(tmp_path, cfg), log=False)


# ------------------------------------------------------------------------------- 10. model card and report
CARD = """\
# Model card for the digits model
model_name: digits-logreg-dp   # short name
license: apache-2.0
model_privacy:
  private: false
  stale: [1, 2]

# tags, kept below
tags:
- dp
- jax
extra: {a: 1, b: "two"}
"""


def test_model_card_keeps_comments_and_formatting(tmp_path):
    from jaxdp.report import write_model_card
    p = tmp_path / "card.yaml"
    p.write_text(CARD)
    write_model_card(p, {"private": True, "epsilon": 2.5})
    text = p.read_text()
    for line in CARD.splitlines():
        if line.startswith(("model_privacy", "  private", "  stale")):
            continue
        assert line in text.splitlines(), line
    card = yaml.safe_load(text)
    assert list(card) == ["model_name", "license", "model_privacy", "tags", "extra"]
    assert card["model_privacy"] == {"private": True, "epsilon": 2.5}
    write_model_card(p, {"private": True, "epsilon": 3.0})  # replacing again keeps everything else
    assert yaml.safe_load(p.read_text())["model_privacy"]["epsilon"] == 3.0
    assert "# tags, kept below" in p.read_text() and "# short name" in p.read_text()


def test_hugging_face_readme_model_card(tmp_path):
    from jaxdp.report import write_model_card
    p = tmp_path / "README.md"
    body = "\n# My model\n\nSome *Markdown* text.\n\n---\n\nA horizontal rule above.\n"
    p.write_text("---\nlicense: mit\n# keep me\ntags: [a, b]\n---\n" + body)
    write_model_card(p, {"private": True, "epsilon": 1.0})
    text = p.read_text()
    assert text.startswith("---\nlicense: mit\n# keep me\ntags: [a, b]\nmodel_privacy:\n") and text.endswith(body)
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"license": "mit", "tags": ["a", "b"], "model_privacy": {"private": True, "epsilon": 1.0}}
    q = tmp_path / "plain.md"
    q.write_text("# Just Markdown\n")
    write_model_card(q, {"private": False})
    assert q.read_text().startswith("---\nmodel_privacy:\n  private: false\n---\n# Just Markdown\n")


def _audits(run):
    os.makedirs(os.path.join(run, "audit"), exist_ok=True)
    roc = {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.6, 1.0]}
    with open(os.path.join(run, "audit", "audit_lira.json"), "w") as f:
        json.dump({"attack": "lira", "attacks": {"loss_threshold": {"auc": 0.61, "roc": roc},
                                                 "lira_online": {"auc": 0.66, "roc": roc}}}, f)
    with open(os.path.join(run, "audit", "audit_one_run.json"), "w") as f:
        json.dump({"attack": "one_run", "claimed_epsilon": 2.0, "epsilon_lower_bound": 0.41, "passed": True,
                   "delta": 1e-5, "beta": 0.05, "canary_type": "gradient", "num_canaries": 300,
                   "num_guesses": 80, "num_correct": 55}, f)


def test_card_and_report_one_run_audit_attack_labels_relative_paths(tmp_path):
    from jaxdp.report import build_model_privacy, write_model_card
    from jaxdp.report.html import render_markdown
    run = _fake_run(tmp_path / "runs" / "r1", epsilon=1.9, noise_multiplier=1.2)
    _audits(run)
    card = build_model_privacy(run)
    assert card["membership_inference_attack"] == "lira_online" and card["membership_inference_auc"] == 0.66
    assert card["membership_inference"]["aucs"] == {"loss_threshold (shadow models)": 0.61,
                                                    "lira_online (shadow models)": 0.66}
    assert card["one_run_audit"]["epsilon_lower_bound"] == 0.41 and card["one_run_audit"]["passed"] is True
    cp = tmp_path / "cards" / "card.yaml"
    write_model_card(cp, card)
    stored = yaml.safe_load(cp.read_text())["model_privacy"]
    assert stored["membership_inference"]["file"] == os.path.join("..", "runs", "r1", "audit", "audit_lira.json")
    assert stored["one_run_audit"]["file"] == os.path.join("..", "runs", "r1", "audit", "audit_one_run.json")
    md = render_markdown(card, {"dp": True, "epochs": []}, None, None)
    assert "| membership_inference_attack | lira_online |" in md
    assert "| one_run_audit | epsilon lower bound 0.41 vs claimed 2: PASS" in md


# ------------------------------------------------------------------------------- 11. CLI polish
def _help(argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv + ["--help"])


def test_every_command_has_a_description(capsys):
    expect = {("train",): "Re-running the same", ("compare",): "accuracy cost of privacy",
              ("sweep",): "several target epsilons", ("config",): "commented example",
              ("ledger", "init"): "Create the ledger", ("ledger", "register"): "Protect a dataset",
              ("ledger", "show"): "composed over all runs", ("ledger", "reserve"): "before the run touches",
              ("ledger", "commit"): "actually ran", ("ledger", "release"): "NEVER touched",
              ("ledger", "verify"): "hash chain", ("ledger", "export"): "Export the whole ledger"}
    for argv, text in expect.items():
        _help(list(argv))
        out = " ".join(capsys.readouterr().out.split())
        assert text in out, (argv, out[:300])
    _help(["sweep"])
    assert "model_privacy section" not in capsys.readouterr().out


def test_dataset_id_option_everywhere_with_deprecated_alias(tmp_path, capsys):
    led = str(tmp_path / "l.db")
    assert main(["ledger", "init", "--ledger", led, "--dataset-id", "a", "--max-epsilon", "5", "--delta", "1e-5"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["ledger", "register", "--ledger", led, "--dataset", "b", "--max-epsilon", "5", "--delta", "1e-5"]) == 0
    assert "--dataset is deprecated; use --dataset-id" in capsys.readouterr().err
    assert main(["ledger", "show", "--ledger", led, "--dataset-id", "b", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["datasets"]) == ["b"]


def test_warnings_are_one_line_without_source(monkeypatch, capsys):
    import warnings

    import jaxdp.accounting.cli as acli

    def warn(args):
        warnings.warn("something to know", stacklevel=2)
        return 0

    monkeypatch.setattr(acli, "_epsilon", warn)
    with warnings.catch_warnings():  # as outside pytest: the default printer, not pytest's recorder
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))  # what Python's default printer does
        assert main(["epsilon", "-N", "10", "-B", "2", "--steps", "1", "--delta", "1e-5", "-s", "1"]) == 0
    err = capsys.readouterr().err
    assert err == "jaxdp: warning: something to know\n"


def test_config_example_is_valid_and_commented(capsys):
    assert main(["config", "--example"]) == 0
    text = capsys.readouterr().out
    assert text.count("#") > 30 and "standardize" in text and "module:" in text
    cfg = validate_config(yaml.safe_load(text))
    assert cfg["training"]["seed"] is None and cfg["optimizer"]["learning_rate"] == 0.1


def test_one_run_audit_advice_names_real_options():
    from jaxdp.audit.one_run import make_gradient_canaries
    params = [{"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}]  # shadow-MLP layout
    with pytest.raises(ValueError) as e:
        make_gradient_canaries(params, np.ones((5, 3), np.float32), None, np.random.default_rng(0))
    assert "--coordinates random" in str(e.value) and "--canary input" in str(e.value)
    args = build_parser().parse_args(["audit", "--run", "x", "--attack", "one_run", "--coordinates", "random",
                                      "--canary", "input", "--num-canaries", "4"])
    assert args.coordinates == "random"


def test_epsilon_statement(capsys):
    argv = ["epsilon", "-N", "60000", "-B", "256", "--epochs", "60", "--delta", "1e-5", "-s", "1.1",
            "--accountant", "rdp", "--statement"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "satisfies differential privacy with eps = 2.6 and delta = 1e-05" in out
    assert main(argv + ["--json"]) == 0
    assert "iterated over 14063 steps" in json.loads(capsys.readouterr().out)["statement"]


def test_ledger_refusal_leaves_no_run_directory(tmp_path, capsys):
    from jaxdp.ledger import Ledger
    led = str(tmp_path / "l.db")
    Ledger.init(led).register_dataset("digits", 0.5, 1e-5, "rdp")
    cfg = tiny(tmp_path / "run")  # epsilon 2 > the 0.5 budget
    cfg["ledger"] = {"path": led}
    rc = main(["train", "--config", write_cfg(tmp_path, cfg)])
    assert rc in (1, 2) and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- 13 + 11: OS seed, re-run
def test_seed_from_the_os_is_recorded_resumes_and_rerun_says_nothing_trained(tmp_path, capsys):
    from jaxdp.train.config import load_config
    assert load_config(os.path.join(REPO, "jaxdp", "configs", "digits_dp.yaml"))["training"]["seed"] is None
    cfg = tiny(tmp_path / "run", epochs=2, seed=None)
    a = DPTrainer(cfg, log=False)
    b = DPTrainer(tiny(tmp_path / "other", epochs=2, seed=None), log=False)
    assert a.seed_source == "os" and a.seed != b.seed  # drawn afresh per run
    a.train(max_epochs=1)
    resumed = DPTrainer(cfg, log=True)
    assert resumed.seed == a.seed  # an interrupted run resumes with the seed it drew
    s = resumed.train()
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["seed_source"] == "os" and str(a.seed) not in json.dumps(m)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["seed"] is None
    assert s["status"] == "finished" and resumed.trained_steps > 0
    capsys.readouterr()
    again = DPTrainer(cfg, log=True)
    again.train()
    assert again.trained_steps == 0 and "nothing was trained" in capsys.readouterr().err
    pinned = DPTrainer(tiny(tmp_path / "p"), log=False)
    assert pinned.seed == 7 and pinned.seed_source == "config"


# ------------------------------------------------------------------------------- 12. README figures from a script
def test_readme_demo_and_audit_figures_come_from_the_script_output():
    """The README states what `benchmarks/readme_figures.py` wrote (seed 0 and the range over seeds)."""
    with open(os.path.join(REPO, "benchmarks", "results", "readme_figures.json")) as f:
        fig = json.load(f)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    rng = {k: f"{r['min']:.3f}-{r['max']:.3f}" for k, r in fig["range"].items() if r.get("n")}
    seed0 = next(r for r in fig["runs"] if r["seed"] == 0)
    assert f"DP test\naccuracy {rng['dp_accuracy']}, non-private {rng['non_private_accuracy']}" in readme
    assert f"| DP-SGD (Adam), PRV accountant | {seed0['dp_accuracy']:.4f} | {seed0['epsilon']:.3f} | " \
           f"{seed0['noise_multiplier']:.3f} |" in readme
    assert f"{seed0['trained_model_auc']:.3f} (0.492-0.559); seeds 0-2: {rng['trained_model_auc']}" in readme
    assert f"one-run: {seed0['one_run_lower_bound']:.3f} (pass); seeds 0-2: {rng['one_run_lower_bound']}" in readme
    assert len(fig["seeds"]) >= 3 and all(r["one_run_passed"] for r in fig["runs"])
