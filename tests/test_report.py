"""Model card section, HTML/Markdown report, plots and sweep (``jaxdp report``, ``jaxdp sweep``)."""
import base64
import json
import os
import re
import sys

import numpy as np
import pytest
import yaml

from jaxdp.cli import main
from jaxdp.report import build_model_privacy, guarantee_sentence, write_model_card
from jaxdp.report.modelcard import format_epsilon
from jaxdp.report import plots
from jaxdp.train import DPTrainer

from tiny import tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.filterwarnings("ignore:.*examples were clipped")


@pytest.fixture(scope="module")
def run_dir(tiny_private_run):
    """The session's shared private run, tiny_config(dir) trained once (tests/tiny.py); copy it to change it."""
    return tiny_private_run.run_dir


@pytest.fixture(scope="module")
def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Through the command line: ``jaxdp sweep --config FILE --epsilons 4 1 --out DIR --json``."""
    d = tmp_path_factory.mktemp("sweep")
    (d / "cfg.yaml").write_text(yaml.safe_dump(tiny_config(d / "unused", epochs=1)))
    assert main(["sweep", "--config", str(d / "cfg.yaml"), "--epsilons", "4", "1", "--out", str(d / "sw"),
                 "--json"]) == 0
    with open(d / "sw" / "sweep.json") as f:
        return dict(json.load(f), json_path=str(d / "sw" / "sweep.json"))


def _is_png(data: bytes) -> bool:
    return data[:8] == PNG_SIGNATURE and len(data) > 1024


def test_the_trainer_writes_metrics_json_through_run_summary(run_dir, metrics):
    from jaxdp.train import RunSummary
    record = RunSummary.read(run_dir)
    assert record.to_dict() == metrics and metrics["format_version"] == 1   # the one writer, current format
    assert record.private and record.steps == metrics["steps"] > 0 and record.epochs[-1].step == record.steps


def test_model_card_fields_equal_metrics(run_dir, metrics):
    card = build_model_privacy(run_dir)
    assert card["private"] is True
    for key in ("epsilon", "delta", "accountant", "max_grad_norm", "noise_multiplier", "sampling", "sample_rate",
                "steps", "training_set_size", "final_test_accuracy", "run_id", "config_hash"):
        assert card[key] == metrics[key], key
    assert card["library_version"] == metrics["jaxdp_version"] and card["library"] == "jaxdp"
    assert card["epochs"] == 2 and card["sampling"] == "poisson" and card["accountant"] == "rdp"
    # No audit and no ledger: nulls, each with its caveat.
    assert card["membership_inference_auc"] is None and card["ledger_dataset_epsilon"] is None
    assert any(c.startswith("Not audited") for c in card["caveats"])
    assert any("ledger" in c for c in card["caveats"])
    assert any("fine-tuning" in c for c in card["caveats"])
    assert any("per person" in c for c in card["caveats"])
    assert any("tuning" in c and "not accounted" in c for c in card["caveats"])


def test_guarantee_sentence_contains_the_numbers(run_dir, metrics):
    s = build_model_privacy(run_dir)["guarantee"]
    for v in (metrics["delta"], metrics["noise_multiplier"], metrics["sample_rate"], metrics["max_grad_norm"]):
        assert f"{v:.4g}" in s
    eps_text = format_epsilon(metrics["epsilon"])
    assert f"(ε={eps_text}, δ={metrics['delta']:.4g})" in s
    assert float(eps_text) >= metrics["epsilon"] and float(eps_text) <= metrics["epsilon"] * 1.001
    assert f"T={metrics['steps']} steps" in s and "RDP accountant" in s and "Poisson" in s
    assert "add/remove-one" in s and "differential privacy" in s


def test_non_private_run_says_no_guarantee(sweep):
    card = build_model_privacy(sweep["non_private"]["run_dir"])
    assert card["private"] is False and card["epsilon"] is None
    assert "no privacy guarantee" in card["guarantee"].lower() and "ε=" not in card["guarantee"]
    assert guarantee_sentence({"private": False}) == card["guarantee"]


@pytest.mark.parametrize("eps, text", [(2.0, "2"), (1.9999859, "2"), (2.00004, "2.001"), (0.123456, "0.1235"),
                                       (3.0000000000000004, "3.001")])
def test_epsilon_is_rounded_up(eps, text):
    assert format_epsilon(eps) == text and float(text) >= eps


def test_appending_keeps_other_keys_and_order(tmp_path, run_dir):
    original = {"model_name": "digits-logreg", "license": "apache-2.0",
                "model_privacy": {"stale": True},
                "metrics": [{"name": "accuracy", "value": 0.9}], "tags": ["dp", "jax"],
                "nested": {"b": 1, "a": {"y": [1, 2], "x": None}}, "zzz_last": "1e-5"}
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(original, sort_keys=False))
    card = build_model_privacy(run_dir)
    write_model_card(path, card)
    after = yaml.safe_load(path.read_text())
    assert list(after) == list(original)  # model_privacy replaced in place; order of all keys kept
    for k in original:
        if k != "model_privacy":
            assert after[k] == original[k] and type(after[k]) is type(original[k])
    assert list(after["nested"]) == ["b", "a"] and list(after["nested"]["a"]) == ["y", "x"]
    assert after["model_privacy"] == json.loads(json.dumps(card))
    # A card without the section gets it appended at the end; no temporary file is left behind.
    p2 = tmp_path / "card2.yaml"
    p2.write_text("name: m\nversion: 3\n")
    write_model_card(p2, card)
    assert list(yaml.safe_load(p2.read_text())) == ["name", "version", "model_privacy"]
    assert sorted(os.listdir(tmp_path)) == ["card.yaml", "card2.yaml"]
    with pytest.raises(ValueError, match="mapping"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("- a\n- b\n")
        write_model_card(bad, card)


def _fake_audit(path, auc_shift=1.0):
    from jaxdp.audit.metrics import evaluate_attack
    rng = np.random.default_rng(0)
    res = evaluate_attack(rng.normal(auc_shift, 1, 200), rng.normal(0, 1, 200), attack="loss_threshold")
    doc = {"attack": "loss_threshold", "attacks": {"loss_threshold": res.to_dict(include_roc=True)},
           "epsilon_lower_bound": {"epsilon_lower_bound": 0.3}, "passed": True}
    with open(path, "w") as f:
        json.dump(doc, f)
    return res.auc


def test_audit_auc_is_read_from_the_run_dir(tmp_path, run_dir):
    import shutil
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    os.makedirs(d / "audit")
    auc = _fake_audit(d / "audit" / "audit_loss_threshold.json")
    card = build_model_privacy(str(d))
    assert card["membership_inference_auc"] == pytest.approx(auc) and 0.6 < auc < 0.9
    assert card["membership_inference"]["attack"] == "loss_threshold"
    assert card["membership_inference"]["empirical_epsilon_lower_bound"] == 0.3
    assert not any(c.startswith("Not audited") for c in card["caveats"])


def test_ledger_absent_degrades_to_null(monkeypatch, run_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "jaxdp.ledger", None)  # import fails as if the module were absent
    card = build_model_privacy(run_dir, ledger=str(tmp_path / "l.db"), dataset_id="digits")
    assert card["ledger_dataset_epsilon"] is None
    assert any("not available" in c for c in card["caveats"])


def test_ledger_total_when_present(run_dir, tmp_path):
    ledger = pytest.importorskip("jaxdp.ledger")
    led = ledger.Ledger.open(str(tmp_path / "l.db"), create=True)
    led.register_dataset("digits", max_epsilon=8.0, delta=1e-5, accountant="rdp")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    event = {"sampling": "poisson", "noise_multiplier": m["noise_multiplier"], "sample_rate": m["sample_rate"],
             "steps": m["steps"]}
    led.reserve("digits", m["run_id"], [event], model="logreg", config_hash=m["config_hash"])
    led.commit(m["run_id"], None)
    card = build_model_privacy(run_dir, ledger=str(tmp_path / "l.db"), dataset_id="digits")
    assert card["ledger"]["dataset_id"] == "digits" and card["ledger"]["max_epsilon"] == 8.0
    # One run charged to the dataset: the ledger's composed total is this run's epsilon.
    assert card["ledger_dataset_epsilon"] == pytest.approx(m["epsilon"], rel=1e-6)
    assert not any("No privacy-ledger total" in c for c in card["caveats"])
    # Without --ledger, the ledger named in the run's config.yaml is used.
    import shutil
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["ledger"] = {"path": str(tmp_path / "l.db"), "dataset_id": "digits"}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert build_model_privacy(str(d))["ledger_dataset_epsilon"] == pytest.approx(m["epsilon"], rel=1e-6)


def test_epsilon_curve_matches_recorded_epochs(metrics):
    steps, eps = plots.epsilon_curve(metrics, points=20)
    assert steps[-1] == metrics["steps"] and len(steps) <= 21 and steps == sorted(steps)
    assert all(a <= b + 1e-12 for a, b in zip(eps, eps[1:]))  # epsilon grows with steps
    assert eps[-1] == pytest.approx(metrics["epsilon"], rel=1e-9)


def test_plots_are_valid_pngs(tmp_path, metrics, sweep):
    for name, data in [("eps", plots.plot_epsilon_vs_steps(metrics, tmp_path / "eps.png")),
                       ("clip", plots.plot_clipping(metrics)), ("train", plots.plot_training(metrics)),
                       ("sweep", plots.plot_accuracy_vs_epsilon(sweep)),
                       ("roc", plots.plot_roc({"a": {"fpr": [0, 0.5, 1], "tpr": [0, 0.7, 1]}}, aucs={"a": 0.6}))]:
        assert _is_png(data), name
    assert _is_png((tmp_path / "eps.png").read_bytes())


def test_clipping_plot_per_group_and_non_private(sweep):
    rows = [{"epoch": e, "clip_fraction": 0.5, "group_clip_fraction": {"all": 0.5, "conv": 0.4, "dense": 0.6},
             "layer_grad_norm_mean": {"conv/kernel": 0.5 / e, "dense/kernel": 3.0 / e}} for e in (1, 2, 3)]
    assert _is_png(plots.plot_clipping({"dp": True, "max_grad_norm": 1.0, "epochs": rows}))
    with open(os.path.join(sweep["non_private"]["run_dir"], "metrics.json")) as f:
        m = json.load(f)
    assert plots.epsilon_curve(m) == ([], [])
    assert _is_png(plots.plot_clipping(m)) and _is_png(plots.plot_epsilon_vs_steps(m))


def test_html_report_is_self_contained(tmp_path, run_dir, sweep):
    out = tmp_path / "r.html"
    md = tmp_path / "r.md"
    card_path = tmp_path / "card.yaml"
    card_path.write_text("name: x\n")
    assert main(["report", "--run", run_dir, "--html", str(out), "--markdown", str(md), "--model-card",
                 str(card_path), "--sweep", sweep["json_path"], "--json"]) == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?!data:)""", text), "external reference in the report"
    assert "<script" not in text and "<link" not in text
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(imgs) == 4  # epsilon, training curve, clipping, sweep (no audit here)
    assert all(_is_png(base64.b64decode(b)) for b in imgs)
    assert "differential privacy" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())  # Markdown links its plots (no base64)
    assert len(links) == 4 and all(l.startswith("r_files/") for l in links) and "base64" not in md.read_text()
    assert all(_is_png((tmp_path / l).read_bytes()) for l in links)
    assert list(yaml.safe_load(card_path.read_text())) == ["name", "model_privacy"]


def test_sweep_structure(sweep):
    assert sweep["epsilons"] == [1.0, 4.0] and len(sweep["runs"]) == 2
    for r, target in zip(sweep["runs"], (1.0, 4.0)):
        assert r["target_epsilon"] == target and 0 < r["epsilon"] <= target * (1 + 1e-6)
        assert r["noise_multiplier"] > 0 and 0 <= r["final_test_accuracy"] <= 1
        assert os.path.isfile(os.path.join(r["run_dir"], "metrics.json"))
    # More epsilon, less noise.
    assert sweep["runs"][0]["noise_multiplier"] > sweep["runs"][1]["noise_multiplier"]
    b = sweep["non_private"]
    assert b["epsilon"] is None and b["noise_multiplier"] == 0.0 and 0 <= b["final_test_accuracy"] <= 1
    assert _is_png(open(sweep["plot"], "rb").read())


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path / "missing")]) == 2
    assert "metrics.json" in capsys.readouterr().err


# -- issue 17: the mechanism in the card, the report and the plots is the run's own --------------------------
def _combos():
    """Every sampling x accountant x relation the trainer accepts (its config check and the accountant's)."""
    from jaxdp.accounting import events_epsilon
    ev = {"poisson": {"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2},
          "shuffle": {"sampling": "shuffle", "noise_multiplier": 1.0, "batch_size": 10, "dataset_size": 100,
                      "steps": 2},
          "cyclic_poisson": {"sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": 2, "noise_multiplier": 1.0,
                             "sample_rate": 0.1, "steps": 2}}   # training.mechanism: bandmf
    out = []
    for sampling in ("poisson", "shuffle", "cyclic_poisson"):
        for acc in ("prv", "rdp", "pld"):
            for rel in ("add_remove", "replace_one"):
                if sampling == "shuffle" and rel != "replace_one":
                    continue   # refused by the trainer's config check
                try:
                    events_epsilon([ev[sampling]], 1e-5, accountant=acc, neighboring_relation=rel)
                except ValueError:
                    continue   # refused by the accountant (no analysis of that combination)
                out.append((sampling, acc, rel))
    return out


COMBOS = _combos()


def test_combos_cover_what_the_trainer_allows():
    assert len(COMBOS) == 11 and ("shuffle", "rdp", "replace_one") in COMBOS
    assert ("cyclic_poisson", "pld", "replace_one") in COMBOS
    assert ("poisson", "prv", "replace_one") in COMBOS and ("poisson", "rdp", "add_remove") in COMBOS


@pytest.mark.parametrize("sampling,accountant,relation", COMBOS)
def test_card_and_plot_take_the_mechanism_from_the_record(tmp_path, metrics, sampling, accountant, relation):
    from jaxdp.accounting import events_epsilon
    m = dict(metrics, sampling=sampling, accountant=accountant, neighboring_relation=relation, delta=1e-6,
             steps=12, noise_multiplier=1.3, mechanism="bandmf" if sampling == "cyclic_poisson" else "dpsgd",
             bands=3 if sampling == "cyclic_poisson" else None)
    m["epsilon"] = events_epsilon([plots._event(m, 12)], 1e-6, accountant=accountant, neighboring_relation=relation)
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    card = build_model_privacy(str(tmp_path))
    for k in ("sampling", "accountant", "neighboring_relation", "delta", "steps"):
        assert card[k] == m[k], k
    words = {"add_remove": "add/remove-one", "replace_one": "replace-one"}[relation]
    assert f"under {words} neighbouring datasets ({accountant.upper()} accountant)" in card["guarantee"]
    assert "T=12 steps" in card["guarantee"] and "δ=1e-06" in card["guarantee"]
    assert ("shuffled fixed-size batches" in card["guarantee"]) == (sampling == "shuffle")
    # Two curve points (the first and the last step) suffice here: what is checked is that the curve is the
    # record's mechanism; test_epsilon_curve_matches_recorded_epochs checks a full curve. (Each PRV/PLD point is
    # an accountant run: the default 12 points made this the slowest report test.)
    steps, eps = plots.epsilon_curve(m, points=2)
    assert steps == [1, 12] and eps[0] < eps[-1] and eps[-1] == pytest.approx(m["epsilon"], rel=1e-9)


def test_relation_of_an_old_record_comes_from_its_config_never_a_default(tmp_path, metrics):
    m = {k: v for k, v in metrics.items() if k != "neighboring_relation"}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    card = build_model_privacy(str(tmp_path))    # no config.yaml either: the relation is unknown, and said so
    assert card["neighboring_relation"] is None and "neighbouring datasets (relation not recorded)" in card["guarantee"]
    assert any("did not record its neighbouring relation" in c for c in card["caveats"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"training": {"dp": {"enabled": True, "neighboring_relation": "replace_one"}}}))
    assert build_model_privacy(str(tmp_path))["neighboring_relation"] == "replace_one"


def test_shuffle_run_card_and_html_report(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=1, noise_multiplier=1.0, epsilon=50.0,  # a plan that finishes
                      neighboring_relation="replace_one")
    cfg["training"]["sampling"] = "shuffle"
    m = DPTrainer(cfg, log=False).train()
    assert m["sampling"] == "shuffle" and m["neighboring_relation"] == "replace_one"
    card = build_model_privacy(str(tmp_path / "run"))
    assert card["neighboring_relation"] == "replace_one" and "replace-one neighbouring" in card["guarantee"]
    assert "add/remove" not in card["guarantee"]
    out = tmp_path / "r.html"
    assert main(["report", "--run", str(tmp_path / "run"), "--html", str(out), "--json"]) == 0
    assert "replace-one neighbouring datasets" in out.read_text()


def test_audit_on_a_stand_in_model_is_a_caveat(tmp_path, run_dir):
    # issue 23: `jaxdp audit` re-trains a CNN run's recipe on an MLP; the card must say so, not a JSON footnote.
    import shutil
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    os.makedirs(d / "audit")
    _fake_audit(d / "audit" / "audit_loss_threshold.json")
    doc = json.loads((d / "audit" / "audit_loss_threshold.json").read_text())
    doc["model_note"] = "NOTE: the run trained model 'cnn_small'; this audit re-trained its recipe on a stand-in"
    (d / "audit" / "audit_loss_threshold.json").write_text(json.dumps(doc))
    card = build_model_privacy(str(d))
    assert doc["model_note"] in card["caveats"]
