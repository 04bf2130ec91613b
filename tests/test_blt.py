"""BLT (buffered linear Toeplitz) noise, the fixed-order sampler, its accounting and the engine's mechanism='blt'."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp import accounting
from jaxdp import blt
from jaxdp import matrix_factorization as mf
from jaxdp.sampling import FixedOrderSampler
from noise_stream import covariance_se, step_covariance

DELTA = 1e-5


def _random_blt(rng, d):
    """Random parameters in the class optimal_blt returns: theta in (0, 1), omega > 0, sum(omega) < 1."""
    theta = rng.uniform(0.05, 0.99, d)
    omega = rng.dirichlet(np.ones(d + 1))[:d]
    return theta, omega


# ------------------------------------------------------------------------------------------- the stream


def test_stream_equals_sens_times_c_inverse_z_on_add_noise_draws():
    """w = sens * C^{-1} z exactly (to float32 rounding), z being add_noise's own draws with the same key."""
    n, sigma, clip, sep = 12, 0.7, 1.3, 4
    theta, omega = np.array([0.9, 0.4]), np.array([0.3, 0.2])
    params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(7)}
    key = jax.random.key(11)
    tx = blt.blt_noise(noise_multiplier=sigma, l2_clip_norm=clip, expected_batch_size=1.0, key=key, steps=n,
                       theta=theta, omega=omega, min_separation=sep)
    ref = jaxdp.add_noise(noise_multiplier=sigma, l2_clip_norm=clip, expected_batch_size=1.0, key=key)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    s, r = tx.init(params), ref.init(params)
    w, z = [], []
    for _ in range(n):
        u, s = tx.update(zeros, s)
        v, r = ref.update(zeros, r)
        w.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(u)]))
        z.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(v)]))
    w, z = np.asarray(w, np.float64), np.asarray(z, np.float64)
    sens = blt.blt_sensitivity(theta, omega, n, min_separation=sep, participations=None)
    assert sens > 1.5      # 3 participations 4 apart: well above the single-participation ||c||
    expected = sens * np.linalg.solve(blt.blt_matrix(theta, omega, n), z)
    np.testing.assert_allclose(w, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    assert np.abs(w - sens * z).max() > 0.1     # the noise IS correlated (not just rescaled)
    assert s.buffers["a"].shape == (2, 3, 5)    # d x |params| state


def test_blt_noise_is_jittable_masks_frozen_leaves_and_needs_a_strategy():
    params = {"a": jnp.ones(4), "b": jnp.ones(3)}
    tx = blt.blt_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=2.0, key=0, steps=8, buffers=2,
                       trainable={"a": True, "b": False})
    s = tx.init(params)
    u, s = jax.jit(tx.update)(params, s)
    np.testing.assert_array_equal(np.asarray(u["b"]), np.full(3, 0.5))   # frozen: no noise, divided by E
    assert np.abs(np.asarray(u["a"]) - 0.5).max() > 0
    assert int(s.count) == 1
    with pytest.raises(ValueError, match="buffers="):
        blt.blt_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0, key=0, steps=8)
    with pytest.raises(ValueError, match="key"):
        blt.blt_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0, steps=8, buffers=1)
    with pytest.raises(TypeError):   # sigma, C, E and key are keyword-only
        blt.blt_noise(1.0, 1.0, 1.0, 0, steps=8, buffers=1)


def test_noise_covariance_across_steps_matches_sigma2_sens2_c_inverse_c_inverse_transpose():
    """Statistical test of the streamed noise (not of its formula): w = sens * C^-1 z with z_t i.i.d.
    N(0, (sigma C_clip)^2) per coordinate, so across the T steps each coordinate's noise vector is N(0, S) with

        S = sigma^2 C_clip^2 sens^2 C^-1 C^-T.

    The d coordinates (one leaf of d parameters) are d independent draws, so the empirical second moment
    ``S_hat = W W^T / d`` (mean known to be 0) is a Wishart(S, d) / d matrix: entry (i, j) is unbiased with
    variance ``(S_ii S_jj + S_ij^2) / d`` (Isserlis), and by the CLT (d = 40,000) is Gaussian to high accuracy.
    Every one of the T^2 = 100 entries must lie within 5 standard errors: a false alarm has probability
    < 100 * 5.7e-7 (union bound; the seed is fixed anyway). Power: the stated S must be >= 10 standard errors
    away from independent noise of the same per-step scale (sigma^2 C_clip^2 sens^2 I) and from the covariance
    of a nearby strategy (theta_1 0.9 -> 0.8) somewhere, so a stream with the wrong correlation would fail."""
    t, d, sigma, clip, sep = 10, 40_000, 0.8, 1.3, 3
    theta, omega = np.array([0.9, 0.4]), np.array([0.3, 0.2])
    tx = blt.blt_noise(noise_multiplier=sigma, l2_clip_norm=clip, expected_batch_size=1.0, key=jax.random.key(5),
                       steps=t, theta=theta, omega=omega, min_separation=sep)
    emp, state = step_covariance(tx, t, d)

    def cov(th):
        sens = blt.blt_sensitivity(th, omega, t, min_separation=sep, participations=None)
        cinv = np.linalg.inv(blt.blt_matrix(th, omega, t))
        return (sigma * clip * sens) ** 2 * cinv @ cinv.T, sens

    true, sens = cov(theta)
    se = covariance_se(true, d)
    z = np.abs(emp - true) / se
    assert np.all(z <= 5), (z.max(), np.unravel_index(z.argmax(), z.shape))
    assert np.max(np.abs(true - (sigma * clip * sens) ** 2 * np.eye(t)) / se) > 10       # not independent noise
    assert np.max(np.abs(true - cov(np.array([0.8, 0.4]))[0]) / se) > 10                 # nor a nearby strategy
    assert state.buffers["p"].shape == (2, d)            # memory: d buffers x |params|


# ----------------------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("n,sep", [(9, 1), (9, 2), (10, 3), (8, 4)])
def test_sensitivity_equals_brute_force_over_all_participation_patterns(n, sep):
    rng = np.random.default_rng(n * 10 + sep)
    cases = [_random_blt(rng, d) for d in (1, 2, 3)] + [blt.optimal_blt(n, 2, min_separation=sep,
                                                                        participations=None)]
    for theta, omega in cases:
        cmat = blt.blt_matrix(theta, omega, n)
        for k in (1, 2, 3, None):
            kk = -(-n // sep) if k is None else k
            brute = mf.brute_force_sensitivity(cmat, sep, kk)
            ours = blt.blt_sensitivity(theta, omega, n, min_separation=sep, participations=k)
            assert math.isclose(ours, brute, rel_tol=1e-12), (theta, omega, k, ours, brute)
    # the separation matters: participating every step costs more than every sep-th step
    theta, omega = cases[0]
    if sep > 1:
        assert blt.blt_sensitivity(theta, omega, n, min_separation=1, participations=2) > \
            blt.blt_sensitivity(theta, omega, n, min_separation=sep, participations=2)


def test_sensitivity_refuses_coefficients_outside_the_theorem():
    # sum(omega) > 1: c_1 > c_0, the worst pattern is no longer 0, b, 2b, ...
    with pytest.raises(ValueError, match="non-increasing"):
        blt.blt_sensitivity([0.5], [1.5], 10, min_separation=2, participations=2)
    with pytest.raises(ValueError, match="non-increasing"):
        blt.blt_sensitivity([0.5], [-0.2], 10, min_separation=2, participations=2)
    # single participation holds for any Toeplitz C (column 0 is the longest)
    cmat = blt.blt_matrix([0.5], [1.5], 10)
    assert math.isclose(blt.blt_sensitivity([0.5], [1.5], 10), np.linalg.norm(cmat, axis=0).max())
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        blt.blt_coefficients([1.2], [0.1], 5)


# ------------------------------------------------------------------------------- error and optimisation


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_error_and_inverse_match_dense_matrices(momentum):
    n = 20
    theta, omega = np.array([0.95, 0.5]), np.array([0.2, 0.3])
    cmat = blt.blt_matrix(theta, omega, n)
    cinv = np.linalg.inv(cmat)
    np.testing.assert_allclose(blt.inverse_coefficients(theta, omega, n), cinv[:, 0], atol=1e-13)
    a = np.zeros((n, n))
    for t in range(n):
        for s in range(t + 1):
            a[t, s] = (1 - momentum ** (t - s + 1)) / (1 - momentum) if momentum else 1.0
    assert math.isclose(blt.blt_error(theta, omega, n, momentum), np.linalg.norm(a @ cinv) ** 2, rel_tol=1e-10)
    assert blt.blt_error([], [], n) == n * (n + 1) / 2      # C = I: DP-SGD


def test_optimal_blt_beats_dpsgd_and_bandmf_improves_with_buffers_and_is_cached():
    n = 128

    def loss(theta, omega):
        return blt.blt_error(theta, omega, n) * blt.blt_sensitivity(theta, omega, n) ** 2

    losses = [loss(*blt.optimal_blt(n, d)) for d in (1, 2, 3)]
    dpsgd = n * (n + 1) / 2
    band4 = mf.prefix_sum_error(mf.optimal_banded_toeplitz(n, 4), n)   # single participation, max col norm 1
    assert losses[0] < dpsgd / 4 and losses[2] < band4
    assert losses[2] <= losses[1] <= losses[0]
    theta, omega = blt.optimal_blt(n, 3)
    assert np.all((theta > 0) & (theta < 1)) and np.all(omega > 0) and omega.sum() < 1
    assert blt._optimal.cache_info().hits >= 1      # the 2- and 3-buffer runs reused smaller optima
    info = blt._optimal.cache_info().hits
    blt.optimal_blt(n, 3)
    assert blt._optimal.cache_info().hits == info + 1
    # the momentum workload's optimum is better for momentum than the prefix-sum optimum
    tm, wm = blt.optimal_blt(n, 2, momentum=0.9)
    t0, w0 = blt.optimal_blt(n, 2)
    assert blt.blt_error(tm, wm, n, 0.9) * blt.blt_sensitivity(tm, wm, n) ** 2 < \
        blt.blt_error(t0, w0, n, 0.9) * blt.blt_sensitivity(t0, w0, n) ** 2


# ------------------------------------------------------------------------------------------ accounting


def test_blt_is_one_gaussian_mechanism_for_any_steps_within_the_horizon():
    gauss = accounting.events_epsilon([{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 1.0,
                                        "steps": 1}], DELTA, "pld")
    assert math.isclose(blt.blt_epsilon(1.0, DELTA, accountant="pld"), 4.37718, abs_tol=2e-4)  # docs/privacy.md
    for t in (1, 7, 30):
        ev = {"sampling": "fixed_order", "mechanism": "blt", "min_separation": 5, "horizon": 30,
              "noise_multiplier": 1.0, "steps": t}
        assert accounting.events_epsilon([ev], DELTA, "pld") == gauss
    # independent noise over the same order: ceil(T / b) Gaussians
    ind = {"sampling": "fixed_order", "mechanism": "dpsgd", "min_separation": 5, "horizon": 30,
           "noise_multiplier": 1.0, "steps": 11}
    three = accounting.events_epsilon([{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 1.0,
                                        "steps": 3}], DELTA, "pld")
    assert accounting.events_epsilon([ind], DELTA, "pld") == three
    # two BLT runs are two mechanisms, never merged into one
    ev = {"sampling": "fixed_order", "mechanism": "blt", "min_separation": 5, "horizon": 30,
          "noise_multiplier": 1.0, "steps": 30}
    two = accounting.events_epsilon([{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 1.0,
                                      "steps": 2}], DELTA, "pld")
    assert accounting.events_epsilon([ev, ev], DELTA, "pld") == pytest.approx(two, rel=1e-8)   # not one Gaussian
    assert two > gauss + 1


def test_fixed_order_events_past_the_horizon_or_replace_one_are_refused():
    ev = {"sampling": "fixed_order", "mechanism": "blt", "min_separation": 5, "horizon": 30,
          "noise_multiplier": 1.0, "steps": 31}
    with pytest.raises(ValueError, match="exceeds its planned horizon"):
        accounting.events_epsilon([ev], DELTA)
    acc = accounting.Accountant("rdp")
    acc.record({**ev, "steps": 30})
    with pytest.raises(ValueError, match="exceeds its planned horizon"):
        acc.record({**ev, "steps": 1})      # step by step, merged: still refused past H
    assert acc.steps == 30
    with pytest.raises(ValueError, match="zero-out"):
        accounting.Accountant("pld", neighboring_relation="replace_one").record({**ev, "steps": 1})
    with pytest.raises(ValueError, match="mechanism"):
        accounting.validate_event({**ev, "mechanism": "bandmf", "steps": 1})


def test_fixed_order_is_an_event_type_sampling_with_its_wire_format_and_one_run_merging():
    from jaxdp.accounting import Event
    from jaxdp.accounting.event import merge
    wire = {"sampling": "fixed_order", "mechanism": "blt", "min_separation": 5, "horizon": 30,
            "noise_multiplier": 1.0, "steps": 10}
    ev = Event.from_dict(wire)
    assert ev.to_dict() == wire and list(ev.to_dict()) == list(wire) and ev.epochs == 2.0
    assert FixedOrderSampler(27, 5, seed=0).event(1.0, 10, mechanism="blt", horizon=30) == ev
    assert ev.equivalent_poisson().to_dict() == {"sampling": "poisson", "noise_multiplier": 1.0,
                                                 "sample_rate": 1.0, "steps": 1}
    assert ev.replace(mechanism="dpsgd", steps=11).equivalent_poisson().steps == 3    # ceil(11 / 5) Gaussians
    assert [e.steps for e in merge([ev, ev])] == [10, 10]                  # two runs: two schemas, never merged
    assert [e.steps for e in merge([ev, ev], canonical_order=True)] == [10, 10]
    assert [e.steps for e in merge([ev, ev], one_run=True)] == [20]        # one run, step by step
    with pytest.raises(ValueError, match="exceeds its planned horizon"):
        merge([ev, ev, ev, ev], one_run=True)
    with pytest.raises(ValueError, match="zero-out"):
        accounting.Accountant("prv", neighboring_relation="replace_one").record(ev)
    assert ev.refusal("rdp", "add_remove") is None


# -------------------------------------------------------------------------------------------- sampler


def test_fixed_order_sampler_takes_each_example_once_per_epoch_exactly_b_steps_apart():
    n, bsz = 23, 5
    s = FixedOrderSampler(n, bsz, seed=3)
    b = s.min_separation
    assert b == 4 and s.steps_per_epoch == 4 and s.steps_for_epochs(2.5) == 10 and s.participations(10) == 3
    seen: dict = {}
    for t in range(3 * b):
        idx, mask = s.sample(t)
        assert idx.shape == (bsz,) and mask.all()
        for i in idx:
            seen.setdefault(int(i), []).append(t)
    assert len(seen) == b * bsz                             # N mod B = 3 examples never take part
    for steps in seen.values():
        assert np.all(np.diff(steps) == b) and len(steps) == 3
    assert [s.sample(t)[0].tolist() for t in range(b)] != [FixedOrderSampler(n, bsz, seed=4).sample(t)[0].tolist()
                                                          for t in range(b)]
    assert FixedOrderSampler(n, bsz, seed=3).sample(2)[0].tolist() == s.sample(2)[0].tolist()
    assert [len(list(s)) for _ in range(2)] == [b, b]       # iterating: one epoch at a time
    sec = FixedOrderSampler(n, bsz, secure=True)
    with pytest.raises(ValueError, match="cannot resume"):
        sec.load_state_dict({"step": 3})


# --------------------------------------------------------------------------------------------- engine


def _problem(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.arange(1, d + 1) > 0).astype(np.float32)

    def loss(p, batch):
        return (batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2

    return {"x": x, "y": y}, {"w": jnp.zeros(d), "b": jnp.zeros(())}, loss


def test_engine_blt_samples_in_fixed_order_accounts_one_gaussian_and_stops_at_the_horizon():
    data, params, loss = _problem()
    engine = jaxdp.PrivacyEngine("pld")
    private = engine.make_private(loss_fn=loss, optimizer=optax.sgd(0.1), params=params, dataset_size=40,
                                  batch_size=8, noise_multiplier=1.5, l2_clip_norm=1.0, seed=1, mechanism="blt",
                                  buffers=2, epochs=2.5)
    assert isinstance(private.sampler, FixedOrderSampler) and private.sampler.min_separation == 5
    assert private.horizon == 13 and private.expected_batch_size == 8.0
    state = private.init()
    assert state.opt_state[0].buffers["w"].shape == (2, 3)
    steps = 0
    with pytest.raises(jaxdp.PrivacyBudgetExhausted, match="horizon of 13 steps"):
        for _ in range(5):
            for batch, mask in private.batches(data):
                state, _ = private.step(state, batch, mask)
                steps += 1
    assert steps == 13 and private.steps_taken == 13
    assert "horizon of 13 steps" in private.next_step_refusal()   # the one pre-step check says why
    assert engine.accountant.history == [{"sampling": "fixed_order", "mechanism": "blt", "min_separation": 5,
                                          "horizon": 13, "noise_multiplier": 1.5, "steps": 13}]
    assert private.get_epsilon(DELTA) == pytest.approx(blt.blt_epsilon(1.5, DELTA, accountant="pld"), rel=1e-12)
    assert np.all(np.isfinite(np.asarray(state.params["w"])))


def test_engine_blt_with_epsilon_calibrates_a_single_gaussian_mechanism():
    data, params, loss = _problem()
    engine = jaxdp.PrivacyEngine("rdp")
    private = engine.make_private_with_epsilon(
        target_epsilon=3.0, target_delta=DELTA, epochs=3, dataset_size=40, batch_size=8, loss_fn=loss,
        optimizer=optax.sgd(0.1), params=params, l2_clip_norm=1.0, seed=0, mechanism="blt", buffers=2)
    sigma = private.noise_multiplier
    assert sigma == pytest.approx(accounting.calibrate_noise_multiplier(3.0, DELTA, 1.0, steps=1,
                                                                        accountant="rdp"), rel=1e-9)
    assert private.max_steps == private.horizon == 15
    assert blt.blt_epsilon(sigma, DELTA, accountant="rdp") <= 3.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(mechanism="blt", epochs=1), "buffers"),
    (dict(mechanism="blt", buffers=2), "epochs"),
    (dict(mechanism="blt", buffers=2, epochs=1, poisson_sampling=False), "fixed-order sampler"),
    (dict(mechanism="blt", buffers=2, epochs=1, bands=2), "bands is for mechanism='bandmf'"),
    (dict(mechanism="blt", buffers=2, epochs=1, batch_size=7.5), "exactly batch_size"),
    (dict(mechanism="dpsgd", buffers=2), "buffers is for mechanism='blt'"),
    (dict(mechanism="blt", buffers=2, epochs=1, momentum=1.0), "momentum"),
])
def test_engine_refuses_bad_blt_settings_with_the_reason(kwargs, match):
    data, params, loss = _problem()
    base = dict(loss_fn=loss, optimizer=optax.sgd(0.1), params=params, dataset_size=40, batch_size=8,
                noise_multiplier=1.0, l2_clip_norm=1.0, seed=0)
    with pytest.raises(ValueError, match=match):
        jaxdp.PrivacyEngine().make_private(**{**base, **kwargs})


def test_engine_refuses_blt_under_replace_one_or_after_earlier_steps():
    data, params, loss = _problem()
    base = dict(loss_fn=loss, optimizer=optax.sgd(0.1), params=params, dataset_size=40, batch_size=8,
                noise_multiplier=1.0, l2_clip_norm=1.0, seed=0, mechanism="blt", buffers=2, epochs=1)
    with pytest.raises(ValueError, match="zero-out"):
        jaxdp.PrivacyEngine("pld", neighboring_relation="replace_one").make_private(**base)
    engine = jaxdp.PrivacyEngine()
    engine.accountant.step(1.0, 0.1, 3)
    with pytest.raises(ValueError, match="fresh PrivacyEngine"):
        engine.make_private(**base)


@pytest.mark.parametrize("mechanism,extra", [("blt", dict(buffers=2)), ("bandmf", dict(bands=2))])
def test_engine_passes_the_optimizers_momentum_to_the_correlated_noise_strategy(monkeypatch, mechanism, extra):
    seen = []
    if mechanism == "blt":
        real = blt.optimal_blt
        monkeypatch.setattr(blt, "optimal_blt", lambda *a, **k: seen.append(k["momentum"]) or real(*a, **k))
    else:
        real = mf.optimal_banded_toeplitz
        monkeypatch.setattr(mf, "optimal_banded_toeplitz",
                            lambda *a, **k: seen.append(a[2] if len(a) > 2 else k.get("momentum")) or real(*a, **k))
    data, params, loss = _problem()
    jaxdp.PrivacyEngine().make_private(
        loss_fn=loss, optimizer=optax.sgd(0.1, momentum=0.9), params=params, dataset_size=40, batch_size=8,
        noise_multiplier=1.0, l2_clip_norm=1.0, seed=0, mechanism=mechanism, epochs=2, momentum=0.9, **extra)
    assert seen == [0.9]


def test_ledger_charges_a_blt_run_as_one_gaussian_and_two_runs_as_two():
    from jaxdp.ledger import events as ledger_events
    ev = {"sampling": "fixed_order", "mechanism": "blt", "min_separation": 5, "horizon": 30, "noise_multiplier": 1.0,
          "steps": 30, "l2_clip_norm": 1.0}
    [clean] = ledger_events.normalize_events([ev])
    assert ledger_events.compose([clean], DELTA, "pld") == pytest.approx(blt.blt_epsilon(1.0, DELTA,
                                                                                          accountant="pld"))
    two = accounting.events_epsilon([{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 1.0,
                                      "steps": 2}], DELTA, "pld")
    assert ledger_events.compose([clean, clean], DELTA, "pld") == pytest.approx(two)
    assert ledger_events.epochs_of(clean) == 6.0
    with pytest.raises(ValueError, match="horizon"):
        ledger_events.normalize_events([{**ev, "steps": 31}])
    with pytest.raises(ValueError, match="mechanism"):
        ledger_events.normalize_events([{**ev, "mechanism": "bandmf"}])


def test_trainer_runs_blt_and_the_record_card_and_curve_state_it(tmp_path):
    import json

    from jaxdp.report.modelcard import build_model_privacy, guarantee_sentence
    from jaxdp.report.plots import epsilon_curve
    from jaxdp.train import DPTrainer
    from tiny import tiny_config
    cfg = tiny_config(tmp_path / "run", training={"batch_size": 128, "mechanism": "blt", "buffers": 2}, epsilon=3.0)
    trainer = DPTrainer(cfg, log=False)
    trainer.train()
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    b = trainer.n // 128
    assert (m["mechanism"], m["buffers"], m["sampling"], m["min_separation"]) == ("blt", 2, "fixed_order", b)
    assert m["steps"] == m["horizon"] == 2 * b
    assert m["epsilon"] == pytest.approx(blt.blt_epsilon(m["noise_multiplier"], 1e-5, accountant="rdp"), rel=1e-9)
    assert m["epsilon"] <= 3.0
    mp = build_model_privacy(tmp_path / "run", metrics=m)
    sentence = guarantee_sentence(mp)
    assert sentence.startswith("Trained with BLT (buffered linear Toeplitz noise with d=2 buffers")
    assert f"at most 2 steps {b} steps apart" in sentence and "zero-out" in sentence
    steps, eps = epsilon_curve(m)
    assert steps[-1] == m["steps"] and eps[-1] == pytest.approx(m["epsilon"], rel=1e-9)
    assert max(eps) - min(eps) < 1e-9      # one Gaussian mechanism: the same epsilon after any step
    from jaxdp.report.plots import plot_epsilon_vs_steps
    svg_or_png = plot_epsilon_vs_steps(m)
    assert len(svg_or_png) > 1000


def test_trainer_config_refuses_bad_blt_settings():
    from jaxdp.train.config import ConfigError, validate_config as validate
    base = {"model": {"name": "logreg"}, "data": {"name": "digits"}, "optimizer": {"name": "sgd", "learning_rate": 1.0},
            "training": {"epochs": 1, "batch_size": 64, "mechanism": "blt"}}
    with pytest.raises(ConfigError, match="training.buffers"):
        validate(base)
    bad = {**base, "training": {**base["training"], "buffers": 2, "sampling": "shuffle",
                                "dp": {"neighboring_relation": "replace_one", "noise_multiplier": 1.0}}}
    with pytest.raises(ConfigError, match="fixed secret batch order"):
        validate(bad)
    bad = {**base, "training": {**base["training"], "buffers": 2, "dp": {"neighboring_relation": "replace_one"}}}
    with pytest.raises(ConfigError, match="zero-out"):
        validate(bad)
    with pytest.raises(ConfigError, match="training.buffers' is for mechanism: blt"):
        validate({**base, "training": {"epochs": 1, "batch_size": 64, "buffers": 2}})
