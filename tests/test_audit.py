"""Tests of jaxdp.audit: reference numbers, metrics, vmapped shadow training, LiRA, one-run audit, CLI."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import audit
from jaxdp.audit import _accounting, shadow
from jaxdp.data import load_digits


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.x_train.reshape(len(d.x_train), -1), d.y_train


# ------------------------------------------------------------------------------------------------ reference numbers

def test_clopper_pearson_reference_number():
    # docs/privacy.md: TP 500/1000, FP 10/1000, alpha 0.05 split over two tails, delta 1e-5 -> 3.2420.
    eps = audit.epsilon_lower_bound_from_counts(500, 1000, 10, 1000, delta=1e-5, alpha=0.05)
    assert eps == pytest.approx(3.2420, abs=5e-5)
    lo, hi = audit.clopper_pearson_interval(500, 1000, 0.05)
    assert lo < 0.5 < hi


def test_one_run_reference_number():
    # Reference numbers (docs/privacy.md): m 1000, r = v = 100, delta 0, beta 0.05 -> logit(0.05^(1/100)) = 3.4930.
    eps = audit.one_run_epsilon_lower_bound(1000, 100, 100, delta=0.0, beta=0.05)
    p = 0.05 ** (1 / 100)
    assert eps == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert eps == pytest.approx(3.4930, abs=5e-5)


def test_one_run_p_value_properties():
    # The p-value grows with epsilon, and delta > 0 only adds to it (so the bound can only drop).
    ps = [audit.one_run_p_value(1000, 100, 80, e, 0.0) for e in (0.5, 1.0, 2.0)]
    assert ps[0] < ps[1] < ps[2]
    assert audit.one_run_p_value(1000, 100, 80, 1.0, 1e-3) > ps[1]
    assert audit.one_run_epsilon_lower_bound(1000, 100, 80, 1e-3) < audit.one_run_epsilon_lower_bound(1000, 100, 80)
    # 50 right out of 100 is chance: no bound.
    assert audit.one_run_epsilon_lower_bound(1000, 100, 50) == 0.0
    with pytest.raises(ValueError, match="v <= r <= m"):
        audit.one_run_p_value(10, 20, 5, 1.0)
    assert audit.one_run_guesses([3.0, 2.0, 1.0, 0.0], [True, False, True, False], 1, 1) == (2, 2)


# ------------------------------------------------------------------------------------------------ metrics

def test_metrics_on_known_distributions():
    rng = np.random.default_rng(0)
    m, n = rng.normal(1.0, 1.0, 4000), rng.normal(0.0, 1.0, 4000)
    r = audit.evaluate_attack(m, n)
    # True AUC = Phi(1/sqrt(2)) = 0.7602; DeLong 95% CI half-width ~ 0.01 at this size.
    assert r.auc_ci[0] < 0.7602 < r.auc_ci[1]
    assert r.auc == pytest.approx(0.7602, abs=0.02)
    assert r.fpr[0] == 0 and r.tpr[0] == 0 and r.fpr[-1] == 1 and r.tpr[-1] == 1
    # advantage = max TPR - FPR = 2 Phi(1/2) - 1 = 0.383 for unit-variance Gaussians 1 apart.
    assert r.advantage == pytest.approx(0.383, abs=0.03)
    perfect = audit.evaluate_attack([2.0, 3.0], [0.0, 1.0])
    assert perfect.auc == 1.0 and perfect.tpr_at_fpr[0.001] == 1.0
    ties = audit.evaluate_attack([1.0, 1.0], [1.0, 1.0])
    assert ties.auc == 0.5 and ties.tpr_at_fpr[0.01] == 0.0
    lt = audit.loss_threshold_attack([0.1, 0.2], [0.5, 0.6])   # lower loss = member
    assert lt.auc == 1.0
    with pytest.raises(ValueError, match="finite"):
        audit.evaluate_attack([np.nan], [0.0])


def test_auc_interval_over_examples_covers():
    # Pooled shadow-model scores: example j's score is mu_j * member + noise, with per-example memorisation
    # mu_j ~ Exp(1) (some examples are far easier to spot). Scores of one example are dependent, so an
    # interval that treats the 800 scores as independent (DeLong) is too narrow: it covered the true mean AUC
    # in 41 of these 50 replications. The bootstrap over examples must cover it in >= 43 of 50 (a 95% interval
    # covers fewer than 43 of 50 with probability 0.003).
    n, m_models, reps = 100, 8, 50

    def sim(rng, rep):
        masks = audit.balanced_masks(m_models, n, rep)
        s = rng.exponential(1.0, n)[None] * masks + 0.5 * rng.normal(size=(m_models, n))
        return s, masks

    rng = np.random.default_rng(123)   # the estimand: the mean pooled AUC, by Monte Carlo (s.e. ~ 0.001)
    truth = np.mean([audit.auc(s[k], s[~k]) for s, k in (sim(rng, 1000 + i) for i in range(400))])
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(reps):
        s, k = sim(rng, rep)
        cols = np.broadcast_to(np.arange(n), s.shape)
        r = audit.evaluate_attack(s[k], s[~k], member_groups=cols[k], nonmember_groups=cols[~k])
        covered += r.auc_ci[0] <= truth <= r.auc_ci[1]
    assert covered >= 43, covered
    assert r.extra["auc_ci_method"].startswith("bootstrap")


def test_score_bound_corrects_threshold_search():
    rng = np.random.default_rng(1)
    same = audit.epsilon_lower_bound_from_scores(rng.normal(size=2000), rng.normal(size=2000))
    # Identical distributions: the split test certifies ~nothing (< 0.3 w.h.p.; the bound is valid at 95%).
    assert same["epsilon_lower_bound"] < 0.3
    far = audit.epsilon_lower_bound_from_scores(rng.normal(4, 1, 2000), rng.normal(0, 1, 2000),
                                                correction="bonferroni")
    assert far["epsilon_lower_bound"] > 2.0


# ------------------------------------------------------------------------------------------------ shadow training

def test_vmap_training_matches_sequential_and_ignores_excluded_rows(digits):
    x, y = digits[0][:64], digits[1][:64]
    cfg = audit.ShadowConfig(hidden=(16,), steps=5, learning_rate=0.1, sample_rate=0.5, expected_dataset_size=32,
                             dp=True, noise_multiplier=1.0)
    masks = audit.balanced_masks(3, 64, 0)
    _, pv = audit.train_models(cfg, x, y, masks, jax.random.key(0), vectorize=True)
    _, ps = audit.train_models(cfg, x, y, masks, jax.random.key(0), vectorize=False)
    for a, b in zip(jax.tree_util.tree_leaves(pv), jax.tree_util.tree_leaves(ps)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Changing an example that a model excludes must not change that model at all (same keys).
    j = int(np.flatnonzero(~masks[0])[0])
    x2 = x.copy()
    x2[j] = 1.0
    _, p2 = audit.train_models(cfg, x2, y, masks, jax.random.key(0), vectorize=True)  # cached program
    for a, b in zip(jax.tree_util.tree_leaves(pv), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(a[0], b[0])
    including = [i for i in range(1, 3) if masks[i, j]]
    assert including, "fixture: some model must include example j"
    assert any(not np.array_equal(a[including[0]], b[including[0]])   # ... while a model including it changes
               for a, b in zip(jax.tree_util.tree_leaves(pv), jax.tree_util.tree_leaves(p2)))


def test_logit_confidence_and_loss_agree(digits):
    params = shadow.init_params(jax.random.key(0), 64, audit.ShadowConfig())
    x, y = jnp.asarray(digits[0][:10]), jnp.asarray(digits[1][:10])
    logits = shadow.apply_model(params, x)
    p = jax.nn.softmax(logits)[jnp.arange(10), y]
    np.testing.assert_allclose(audit.logit_confidence(params, x, y), np.log(p / (1 - p)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(audit.per_example_losses(params, x, y), -np.log(p), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ attacks

def test_lira_and_loss_threshold_detect_an_overfit_model_fast(digits):
    # Small fast version of the slow experiment: 8 models on 100 examples, 150 Adam steps, no DP.
    x, y = digits[0][:100], digits[1][:100]
    cfg = audit.ShadowConfig(hidden=(64,), steps=150, learning_rate=0.01, optimizer="adam", momentum=None,
                             expected_dataset_size=50)
    res = audit.shadow_membership_experiment(cfg, x, y, 8, jax.random.key(0),
                                             attacks=("loss_threshold", "lira_online_fixed_variance"))
    lt, lira = res["loss_threshold"], res["lira_online_fixed_variance"]
    # 400 members / 400 non-members: DeLong CI half-width ~ 0.04, so AUC > 0.6 is far from chance.
    assert lt.auc_ci[0] > 0.55 and lt.auc > 0.6
    assert lira.auc > 0.65
    # TPR at 1% FPR (4 of 400 non-members) well above the 1% of a random guess.
    assert lira.tpr_at_fpr[0.01] > 0.03


def test_lira_from_user_train_fn(digits):
    x, y = jnp.asarray(digits[0][:60]), jnp.asarray(digits[1][:60])
    cfg = audit.ShadowConfig(hidden=(16,), steps=60, learning_rate=0.02, optimizer="adam", momentum=None,
                             expected_dataset_size=30)
    train = audit.make_train_fn(cfg, x, y)

    def user_train(mask, key):
        return train(shadow.init_params(key, 64, cfg), mask, key)

    res = audit.lira_from_train_fn(user_train, audit.logit_confidence, x, y, 6, jax.random.key(0))
    assert res["_stat"].shape == (6, 60)
    assert res["lira_online"].num_members == 180 and 0.0 <= res["lira_online"].auc <= 1.0


def _one_run_cfg(noise_multiplier):
    return audit.ShadowConfig(hidden=(16,), steps=30, learning_rate=0.1, momentum=0.9, sample_rate=0.2,
                              expected_dataset_size=200, dp=True, l2_clip_norm=1.0,
                              noise_multiplier=noise_multiplier)


def test_one_run_catches_noise_switched_off(digits):
    # Broken run: clipping but NO noise, while claiming epsilon 1. Data-free gradient canaries then separate
    # perfectly (an IN canary sampled at least once moves its coordinate; P(never sampled) = 0.8^30 = 0.001).
    x, y = digits[0][:200], digits[1][:200]
    r = audit.one_run_audit(_one_run_cfg(0.0), x, y, claimed_epsilon=1.0, delta=1e-5, key=jax.random.key(0))
    assert r.num_canaries >= 48
    assert r.epsilon_lower_bound > 1.0 and not r.passed


def test_one_run_honest_dp_run_passes(digits):
    # Honest run at epsilon 1: by Steinke et al.'s theorem the bound exceeds 1 with probability <= beta = 0.05;
    # the seed is fixed, so this is deterministic.
    x, y = digits[0][:200], digits[1][:200]
    sigma = _accounting.calibrate_noise_multiplier(1.0, 1e-5, 0.2, 30)
    assert _accounting.compute_epsilon(sigma, 0.2, 30, 1e-5) <= 1.0 + 1e-6
    r = audit.one_run_audit(_one_run_cfg(sigma), x, y, claimed_epsilon=1.0, delta=1e-5, key=jax.random.key(0))
    assert r.passed and r.epsilon_lower_bound <= 1.0
    assert r.verdict == "PASS" and "PASS" in r.summary()
    # The ceiling is printed beside the verdict, and it is above the claim (else it could not be a pass).
    assert r.ceiling > 1.0 and f"audit ceiling {r.ceiling:.4f}" in r.summary()


def _one_run_cfg_no_clipping(noise_multiplier):
    import dataclasses
    return dataclasses.replace(_one_run_cfg(noise_multiplier), clip=False)


def test_one_run_catches_clipping_switched_off(digits):
    # Broken run: the noise of an honest epsilon-1 run but NO per-example clipping. The default canaries push
    # with norm 10 C, which an honest run clips to C and this run lets through: the audit must fail it. (With
    # canaries of norm C, the old default, the broken run is indistinguishable from an honest one on the
    # canary coordinates: benchmarks/audit_verdicts.py, docs/audit.md.)
    x, y = digits[0][:200], digits[1][:200]
    sigma = _accounting.calibrate_noise_multiplier(1.0, 1e-5, 0.2, 30)
    assert audit.one_run_audit.__kwdefaults__["canary_scale"] >= 10.0
    r = audit.one_run_audit(_one_run_cfg_no_clipping(sigma), x, y, claimed_epsilon=1.0, delta=1e-5,
                            key=jax.random.key(0))
    assert r.canary_scale == 10.0 and r.to_dict()["clipping"] is False
    assert r.epsilon_lower_bound > 1.0 and r.verdict == "FAIL" and not r.passed


def test_one_run_ceiling_and_inconclusive_verdict(digits):
    # 640 canaries, 320 guesses: even 320/320 right cannot certify more than 4.649 (delta 1e-5, beta 0.05).
    assert audit.one_run_ceiling(640, 320, 1e-5, 0.05) == pytest.approx(4.6492, abs=1e-3)
    assert audit.one_run_ceiling(640, 320) == audit.one_run_epsilon_lower_bound(640, 320, 320)
    # A run with NO noise claiming epsilon 8 can never fail such an audit: it must not read PASS.
    x, y = digits[0][:200], digits[1][:200]
    r = audit.one_run_audit(_one_run_cfg(0.0), x, y, claimed_epsilon=8.0, delta=1e-5, key=jax.random.key(0))
    assert r.num_correct == r.num_guesses and r.epsilon_lower_bound == pytest.approx(r.ceiling)
    assert r.ceiling < 8.0 and r.verdict == "INCONCLUSIVE" and not r.passed
    assert "PASS" not in r.summary() and "INCONCLUSIVE" in r.summary()
    assert r.to_dict()["verdict"] == "INCONCLUSIVE" and r.to_dict()["ceiling"] == r.ceiling


def test_one_run_number_of_canaries_from_the_claim():
    # Fewest canaries (>= 200) whose ceiling is twice the claim; else the most the budget allows.
    m1 = audit.one_run_num_canaries(1.0, 640)
    assert m1 == 200 and audit.one_run_ceiling(m1, m1 // 2) >= 2.0
    m3 = audit.one_run_num_canaries(3.0, 100_000)
    assert audit.one_run_ceiling(m3, m3 // 2) >= 6.0 > audit.one_run_ceiling(m3 // 2, m3 // 4)
    assert audit.one_run_num_canaries(3.0, 640) == 640          # budget-bound: the highest ceiling it has
    # epsilon 8 is beyond any one-run audit at delta 1e-5 (the 2 m delta term caps the ceiling near 7.5).
    m8 = audit.one_run_num_canaries(8.0, 100_000)
    assert 5.0 < audit.one_run_ceiling(m8, m8 // 2) < 8.0


def test_one_delta_default_for_all_bounds():
    import inspect
    assert audit.DEFAULT_DELTA == 1e-5
    for fn in (audit.one_run_p_value, audit.one_run_epsilon_lower_bound, audit.one_run_ceiling,
               audit.epsilon_lower_bound_from_counts, audit.epsilon_lower_bound_from_scores,
               audit.one_run_audit):
        assert inspect.signature(fn).parameters["delta"].default == audit.DEFAULT_DELTA, fn.__name__


# ------------------------------------------------------------------------------------------------ command line

def test_cli_writes_json_and_png_and_flags_broken_run(tmp_path, capsys):
    from jaxdp.cli import main
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(
        "data: {name: digits}\nmodel: {name: mlp, options: {hidden: [16]}}\n"
        "optimizer: {name: adam, learning_rate: 0.01}\n"
        "training:\n  epochs: 0.89\n  batch_size: 64\n  seed: 0\n"   # 20 steps at q = 64/1437
        "  dp: {enabled: false}\naudit: {pool_size: 60, num_shadow: 2}\n")
    out = tmp_path / "out"
    assert main(["audit", "--config", str(cfg), "--attack", "loss_threshold", "--out", str(out)]) == 0
    data = json.loads((out / "audit_loss_threshold.json").read_text())
    assert 0 <= data["attacks"]["loss_threshold"]["auc"] <= 1
    assert data["claimed_epsilon"] == "inf" and data["passed"] is None and data["verdict"] == "INDICATIVE"
    assert (out / "roc_loss_threshold.png").stat().st_size > 1000
    capsys.readouterr()

    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "model: {name: mlp, options: {hidden: [16]}}\noptimizer: {name: sgd, learning_rate: 0.1}\n"
        "training:\n  epochs: 5.9\n  batch_size: 287\n  seed: 0\n"    # 30 steps at q = 287/1437
        "  dp: {enabled: true, epsilon: 1.0, delta: 1.0e-5, max_grad_norm: 1.0, noise_multiplier: 0.0}\n"
        "audit: {pool_size: 200}\n")
    rc = main(["audit", "--config", str(broken), "--attack", "one_run", "--out", str(out), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert rc == 1 and printed["passed"] is False and printed["epsilon_lower_bound"] > 1.0
    assert printed["claimed_epsilon"] == 1.0 and printed["recipe"]["noise_multiplier"] == 0.0


def test_cli_reads_a_train_run_directory(tmp_path, capsys):
    from jaxdp.cli import main
    run = tmp_path / "run"
    run.mkdir()
    # A run directory as `jaxdp train` writes it: the config YAML and metrics.json (keys it lacks: not recorded).
    (run / "config.yaml").write_text(
        "model: {name: mlp, options: {hidden: [16]}}\noptimizer: {name: sgd, learning_rate: 0.1}\n"
        "training:\n  epochs: 5.9\n  batch_size: 287\n  seed: 0\n"    # 30 steps at q = 287/1437
        "  dp: {enabled: true, epsilon: 1.0, delta: 1.0e-5, max_grad_norm: 1.0, noise_multiplier: 0.0}\n"
        "audit: {pool_size: 200}\n")
    (run / "metrics.json").write_text('{"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 0.0}')
    assert main(["audit", "--run", str(run), "--attack", "one_run"]) == 1
    data = json.loads((run / "audit" / "audit_one_run.json").read_text())
    assert data["recipe"]["run_metrics"]["epsilon"] == 1.0 and data["passed"] is False
    assert "FAIL" in capsys.readouterr().out
    assert main(["audit", "--run", str(tmp_path / "missing"), "--attack", "one_run"]) == 2


def test_cli_steps_override_changes_the_claim_consistently():
    from jaxdp.audit.cli import recipe_from_config
    sigma = _accounting.calibrate_noise_multiplier(1.0, 1e-5, 0.2, 30)
    cfg = {"model": {"name": "mlp", "options": {"hidden": [16]}}, "optimizer": {"learning_rate": 0.1},
           "training": {"epochs": 20, "batch_size": 287, "seed": 0,
                        "dp": {"enabled": True, "epsilon": 1.0, "delta": 1e-5}}}
    metrics = {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": sigma, "steps": 30, "sample_rate": 0.2}
    # metrics.json states the steps the run took: they win over the config's (as docs/audit.md says).
    _, _, _, info = recipe_from_config(cfg, "one_run", metrics)
    assert info["steps"] == 30 and info["claimed_epsilon"] == 1.0
    # --steps 60 audits a longer run of the same noise: the claim for it is that noise's epsilon at 60 steps
    # (> 1), not the run's 1.0 -- else an honest run would fail for having been audited longer.
    sc, _, _, info = recipe_from_config(cfg, "one_run", metrics, {"steps": 60})
    want = _accounting.compute_epsilon(sigma, 0.2, 60, 1e-5)
    assert sc.steps == 60 and info["claimed_epsilon"] == pytest.approx(want, rel=1e-3) and want > 1.3
    assert info["run_claimed_epsilon"] == 1.0 and any("30 steps" in n for n in info["notes"])
    # A broken run (claims epsilon 1 with no noise) keeps its claim's meaning: epsilon of the claimed noise.
    broken = {**metrics, "noise_multiplier": 0.0}
    sc, _, _, info = recipe_from_config(cfg, "one_run", broken, {"steps": 60})
    assert sc.noise_multiplier == 0.0 and info["claimed_epsilon"] == pytest.approx(want, rel=1e-3)


def test_cli_membership_attacks_are_indicative_and_model_swap_is_stated(tmp_path, capsys):
    from jaxdp.cli import main
    # A non-private-in-fact run (noise 0) claiming epsilon 0.5, trained as a CNN: the membership attacks may
    # score well, but their pooled Clopper-Pearson number is not a valid bound: never a verdict, exit 0.
    cfg = tmp_path / "cnn.yaml"
    cfg.write_text(
        "data: {name: digits}\nmodel: {name: cnn_small}\noptimizer: {name: adam, learning_rate: 0.01}\n"
        "training:\n  epochs: 0.89\n  batch_size: 64\n  seed: 0\n"   # 20 steps at q = 64/1437
        "  dp: {enabled: true, epsilon: 0.5, noise_multiplier: 0.0}\naudit: {pool_size: 60, num_shadow: 2}\n")
    rc = main(["audit", "--config", str(cfg), "--attack", "loss_threshold", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0 and printed["verdict"] == "INDICATIVE" and printed["passed"] is None
    assert "epsilon_lower_bound" not in printed and "indicative" in printed["indicative_epsilon"]["note"]
    assert "INDICATIVE ONLY" in printed["summary"]
    # issue 23: the audited model is not the run's CNN -- said first, not buried in "notes".
    assert printed["model_substituted"] is True
    assert printed["summary"].startswith("NOTE: the run trained model 'cnn_small'")
    assert printed["attacks"]["loss_threshold"]["auc_ci_method"].startswith("bootstrap")
