"""BandMF (banded matrix-factorization noise), cyclic Poisson sampling and its accounting, and the De et al.
recipe (augmentation multiplicity, EMA)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp import accounting
from jaxdp import matrix_factorization as mf
from jaxdp.ledger import events as ledger_events
from jaxdp.recipe import augmentation_keys, augmentation_multiplicity, ema_update
from jaxdp.sampling import CyclicPoissonSampler
from noise_stream import covariance_se, step_covariance

DELTA = 1e-5

# ------------------------------------------------------------------------------------------- strategy


def test_prefix_sum_error_matches_dense_matrices_and_dpsgd():
    n = 24
    a = np.tril(np.ones((n, n)))
    for c in ([1.0], [1.0, 0.6], [1.0, -0.3, 0.4, 0.2]):
        dense = np.linalg.norm(a @ np.linalg.inv(mf.strategy_matrix(c, n))) ** 2
        assert math.isclose(mf.prefix_sum_error(c, n), dense, rel_tol=1e-10)
    assert mf.prefix_sum_error([1.0], n) == n * (n + 1) / 2        # C = I: DP-SGD
    cm = mf.strategy_matrix([1.0, -0.3, 0.4, 0.2], n)
    assert math.isclose(np.linalg.norm(cm, axis=0).max(), 1.0, rel_tol=1e-12)   # max column norm 1


def test_optimised_strategy_beats_dpsgd_and_sqrt_and_improves_with_bands():
    n = 64
    errs = [mf.prefix_sum_error(mf.optimal_banded_toeplitz(n, b), n) for b in (1, 2, 4, 8, 64)]
    assert errs[0] == n * (n + 1) / 2
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    for b in (2, 4, 8, 64):   # never worse than its starting point, the truncated (1 - x)^(-1/2) coefficients
        assert mf.prefix_sum_error(mf.optimal_banded_toeplitz(n, b), n) <= mf.prefix_sum_error(
            mf._sqrt_coefficients(b), n) * (1 + 1e-9)
    # measured: ratios to DP-SGD 0.543 (b=2), 0.323 (b=4), 0.218 (b=8), 0.146 (b=64) at n=64
    assert errs[2] / errs[0] < 0.35 and errs[4] / errs[0] < 0.16
    # a local optimum: small perturbations of the coefficients do not lower the error
    c = mf.optimal_banded_toeplitz(n, 4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = np.concatenate([[0.0], 1e-3 * rng.normal(size=3)])
        assert mf.prefix_sum_error(c + d, n) >= errs[2] * (1 - 1e-9)


def test_optimal_strategy_is_cached():
    assert mf.optimal_banded_toeplitz(50, 5) is not mf.optimal_banded_toeplitz(50, 5)   # fresh arrays...
    mf._optimal.cache_clear()
    mf.optimal_banded_toeplitz(50, 5)
    mf.optimal_banded_toeplitz(50, 5)
    assert mf._optimal.cache_info().hits >= 1                                         # ...from one solve


# ----------------------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("n, b", [(12, 3), (10, 2), (9, 4)])
def test_sensitivity_is_sqrt_k_by_brute_force_over_all_participation_patterns(n, b):
    c = mf.strategy_matrix(mf.optimal_banded_toeplitz(n, b), n)
    k = math.ceil(n / b)   # the most participations b-separated steps allow (= cyclic Poisson's ceil(T/b))
    brute = mf.brute_force_sensitivity(c, min_separation=b, max_participations=k)
    bound = mf.banded_sensitivity(c, b, k, min_separation=b)
    assert math.isclose(bound, math.sqrt(k), rel_tol=1e-12) and brute <= bound * (1 + 1e-12)
    # no cross terms: the worst pattern costs exactly the sum of its squared column norms (<= 1 each)
    col2 = np.linalg.norm(c, axis=0) ** 2
    best = max(col2[list(pat)].sum() for pat in mf.participation_patterns(n, b, k))
    assert math.isclose(brute ** 2, best, rel_tol=1e-9)
    if b * k <= n:   # some pattern meets k full (norm-1) columns: the bound sqrt(k) is attained
        assert math.isclose(brute, math.sqrt(k), rel_tol=1e-9)
    # every cyclic-sampling pattern (group j: steps j, j+b, ...) is b-separated, and the bound holds for random
    # vector-valued gradients of norm <= 1 too
    rng = np.random.default_rng(1)
    for j in range(b):
        steps = list(range(j, n, b))
        g = rng.normal(size=(len(steps), 5))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        assert np.linalg.norm(c[:, steps] @ g) <= math.sqrt(k) + 1e-9
    # without the separation the columns overlap and the sensitivity is larger: the condition matters
    assert mf.brute_force_sensitivity(c, min_separation=1, max_participations=k) > math.sqrt(k) + 0.1
    with pytest.raises(ValueError, match="apart"):
        mf.banded_sensitivity(c, b, k, min_separation=b - 1)


# ----------------------------------------------------------------------------------- noise transform

PARAMS = {"w": jnp.zeros((3, 5), jnp.float32), "b": jnp.zeros((7,), jnp.float32)}


def _run(tx, steps, updates=None):
    updates = PARAMS if updates is None else updates
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    out = []
    for _ in range(steps):
        u, state = update(updates, state)
        out.append(u)
    return out


def test_bands_1_is_add_noise_bit_for_bit():
    key = jax.random.key(42)
    g = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.25, PARAMS)
    ref = _run(jaxdp.add_noise(noise_multiplier=1.3, l2_clip_norm=0.7, expected_batch_size=32.0, key=key), 3, g)
    got = _run(jaxdp.bandmf_noise(noise_multiplier=1.3, l2_clip_norm=0.7, expected_batch_size=32.0, key=key,
                                  bands=1), 3, g)
    for a, b in zip(ref, got):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    assert jaxdp.bandmf_noise(noise_multiplier=1.3, l2_clip_norm=0.7, expected_batch_size=32.0, key=key,
                              bands=1).init(PARAMS).history == ()   # no state memory


def test_noise_covariance_matches_c_inverse_c_inverse_transpose():
    """z_t i.i.d. N(0, s^2) per coordinate => w = C^-1 z has covariance s^2 C^-1 C^-T across steps. With d
    independent coordinates the empirical covariance entry (i, j) has standard error
    s^2 sqrt((S_ii S_jj + S_ij^2) / d); we require every one of the T^2 entries within 5 standard errors
    (a false alarm has probability < 64 * 6e-7), and check that the target is >= 10 standard errors away from
    independent noise's identity somewhere (so the test can fail)."""
    t, b, d, sigma = 8, 3, 40_000, 1.5
    coef = mf.optimal_banded_toeplitz(t, b)
    tx = mf.bandmf_noise(noise_multiplier=sigma, l2_clip_norm=1.0, expected_batch_size=1.0, key=jax.random.key(7),
                         bands=b, steps=t)
    emp, state = step_covariance(tx, t, d)
    cinv = np.linalg.inv(mf.strategy_matrix(coef, t))
    true = sigma ** 2 * cinv @ cinv.T
    se = covariance_se(true, d)
    assert np.all(np.abs(emp - true) <= 5 * se), np.max(np.abs(emp - true) / se)
    assert np.max(np.abs(true - sigma ** 2 * np.eye(t)) / se) > 10
    assert state.history["p"].shape == (b - 1, d)   # memory: the last b-1 draws


def test_bandmf_noise_needs_a_horizon_or_coefficients_and_a_key():
    with pytest.raises(ValueError, match="steps="):
        mf.bandmf_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=8.0, key=jax.random.key(0), bands=3)
    with pytest.raises(ValueError, match="PRNG key"):
        mf.bandmf_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=8.0, key=None, bands=3, steps=10)
    tx = mf.bandmf_noise(noise_multiplier=0.0, l2_clip_norm=1.0, expected_batch_size=2.0, key=jax.random.key(0),
                         coefficients=[2.0, 1.0])   # sigma 0: (S + 0) / E
    u, _ = tx.update(PARAMS, tx.init(PARAMS))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(u))


# ------------------------------------------------------------------------- cyclic Poisson and accounting


def test_cyclic_poisson_sampler_partitions_and_separates_participations():
    n, b, p = 103, 4, 0.5
    s = CyclicPoissonSampler(n, p, b, seed=3)
    groups = [set(s.group(g).tolist()) for g in range(b)]
    assert set().union(*groups) == set(range(n)) and sum(map(len, groups)) == n
    assert {len(g) for g in groups} <= {n // b, -(-n // b)}
    last = {}
    sizes = []
    for t in range(40):
        idx, mask = s.sample(t)
        assert idx.shape == mask.shape and idx.shape[0] % s.pad_to_multiple == 0
        chosen = idx[mask]
        assert set(chosen.tolist()) <= groups[t % b]
        for i in chosen.tolist():
            assert i not in last or t - last[i] >= b and (t - last[i]) % b == 0
            last[i] = t
        sizes.append(mask.sum())
    assert s.sampling == "cyclic_poisson" and s.expected_batch_size == p * n / b
    assert abs(np.mean(sizes) - p * n / b) < 4 * math.sqrt(p * (1 - p) * n / b / 40)
    assert np.array_equal(s.sample(5)[0], CyclicPoissonSampler(n, p, b, seed=3).sample(5)[0])   # reproducible
    assert s.steps_for_epochs(2) == math.ceil(2 * b / p)
    secure = CyclicPoissonSampler(n, p, b, secure=True)
    secure.load_state_dict({"step": 0})
    with pytest.raises(ValueError, match="cannot resume"):   # a fresh partition would break the separation
        secure.load_state_dict({"step": 5})


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("pld", marks=pytest.mark.slow)])
def test_cyclic_accounting_equals_dpsgd_with_p_and_ceil_t_over_b(accountant):
    sigma, p, b, t = 1.1, 0.2, 4, 50
    event = {"sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": b, "noise_multiplier": sigma,
             "sample_rate": p, "steps": t}
    eps = accounting.events_epsilon([event], 1e-5, accountant=accountant)
    assert eps == accounting.compute_epsilon(sigma, p, math.ceil(t / b), 1e-5, accountant=accountant)
    assert eps < accounting.compute_epsilon(sigma, p, t, 1e-5, accountant=accountant)   # not T steps
    acc = accounting.Accountant(accountant)     # recorded step by step (one run): merged into T steps
    for _ in range(t):
        acc.step(sigma, p, sampling="cyclic_poisson", bands=b, mechanism="bandmf")
    assert acc.history == [event] and acc.get_epsilon(1e-5) == eps
    # two separate runs restart their cycles: ceil(25/4) + ceil(25/4) = 14 participations, not ceil(50/4) = 13
    half = dict(event, steps=25)
    eps14 = accounting.compute_epsilon(sigma, p, 14, 1e-5, accountant=accountant)
    assert math.isclose(accounting.events_epsilon([half, half], 1e-5, accountant=accountant), eps14, rel_tol=1e-9)
    led = ledger_events.normalize_events([dict(half, l2_clip_norm=1.0), half])
    assert math.isclose(ledger_events.compose(led, 1e-5, accountant), eps14, rel_tol=1e-9)
    assert eps14 > accounting.compute_epsilon(sigma, p, 13, 1e-5, accountant=accountant)
    with pytest.raises(ValueError, match="mechanism"):
        accounting.validate_event(dict(event, mechanism="blt"))


# ----------------------------------------------------------------------------------------- the engine

N_ENGINE = 256


def _loss(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def _engine_data():
    d = jaxdp.data.load_digits()
    return {"x": d.x_train[:N_ENGINE].reshape(N_ENGINE, -1), "y": d.y_train[:N_ENGINE]}


def test_engine_bandmf_calibrates_samples_cyclically_and_accounts_participations():
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}
    b, bs, epochs = 4, 32, 2
    private = engine.make_private_with_epsilon(
        loss_fn=_loss, params=params, optimizer=optax.sgd(0.5), dataset_size=N_ENGINE, batch_size=bs,
        l2_clip_norm=1.0, seed=5, target_epsilon=3.0, target_delta=1e-5, epochs=epochs, mechanism="bandmf",
        bands=b, method="vmap")
    q = bs / N_ENGINE
    steps = math.ceil(epochs / q)
    assert isinstance(private.sampler, CyclicPoissonSampler) and private.sampler.bands == b
    assert private.expected_batch_size == bs and private.sampler.sample_rate == q * b
    sigma = accounting.calibrate_noise_multiplier(3.0, 1e-5, q * b, steps=math.ceil(steps / b), accountant="rdp")
    assert private.noise_multiplier == sigma
    state = private.init()
    assert state.opt_state[0].history["w"].shape == (b - 1, 64, 10)
    for batch, mask in private.batches(_engine_data(), 6):
        state, _ = private.step(state, batch, mask)
    assert private.accountant.history == [{"sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": b,
                                          "noise_multiplier": sigma, "sample_rate": q * b, "steps": 6}]
    assert private.get_epsilon() == accounting.compute_epsilon(sigma, q * b, 2, 1e-5, accountant="rdp")
    assert private.max_steps >= steps   # the calibrated plan fits the target
    with pytest.raises(ValueError, match="bands \\* batch_size"):
        jaxdp.PrivacyEngine().make_private(loss_fn=_loss, params=params, optimizer=optax.sgd(0.1),
                                           dataset_size=N_ENGINE, batch_size=100, noise_multiplier=1.0,
                                           l2_clip_norm=1.0, seed=0, epochs=1, mechanism="bandmf", bands=4)
    with pytest.raises(ValueError, match="fresh PrivacyEngine"):
        engine.make_private(loss_fn=_loss, params=params, optimizer=optax.sgd(0.1), dataset_size=N_ENGINE,
                            batch_size=bs, noise_multiplier=1.0, l2_clip_norm=1.0, seed=0, epochs=1,
                            mechanism="bandmf", bands=4)


def test_trainer_config_accepts_bandmf_and_names_bad_keys():
    from jaxdp.train import ConfigError, validate_config
    base = {"optimizer": {"learning_rate": 0.1}, "training": {"epochs": 1, "batch_size": 8, "seed": 0}}
    cfg = validate_config({**base, "training": {**base["training"], "mechanism": "bandmf", "bands": 4}})
    assert cfg["training"]["mechanism"] == "bandmf" and cfg["training"]["bands"] == 4
    for bad, key in ((dict(mechanism="dpftrl"), "training.mechanism"), (dict(mechanism="bandmf"), "training.bands"),
                     (dict(bands=3), "training.bands")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config({**base, "training": {**base["training"], **bad}})


def test_model_card_sentence_names_bandmf():
    from jaxdp.report.modelcard import MECHANISM_LABELS, guarantee_sentence
    mp = {"private": True, "mechanism": MECHANISM_LABELS["bandmf"], "sampling": "cyclic_poisson", "bands": 4,
          "sample_rate": 0.5, "noise_multiplier": 1.2,
          "max_grad_norm": 1.0, "steps": 40, "training_set_size": 100, "epsilon": 2.0, "delta": 1e-5,
          "accountant": "prv"}
    s = guarantee_sentence(mp)
    assert s.startswith("Trained with BandMF (banded matrix-factorization noise with b=4 bands, cyclic Poisson")


# -------------------------------------------------------------------------------------- De et al. recipe


def _shift(key, ex):
    """Random horizontal shift of an 8x8 image by -1, 0 or 1 pixel (reads only this example)."""
    s = jax.random.randint(key, (), -1, 2)
    return {"x": jnp.roll(ex["x"].reshape(8, 8), s, axis=1).reshape(-1), "y": ex["y"]}


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_augmentation_multiplicity_keeps_each_examples_contribution_below_c(k):
    data = _engine_data()
    batch = {"x": jnp.asarray(data["x"][:8]) * 20.0, "y": jnp.asarray(data["y"][:8])}   # large gradients
    params = {"w": 0.1 * jax.random.normal(jax.random.key(0), (64, 10)), "b": jnp.zeros((10,))}
    loss = augmentation_multiplicity(_loss, _shift, k)
    grad_fn = jax.jit(jaxdp.clipped_grad(loss, 0.5, method="vmap"))
    keys = augmentation_keys(jax.random.key(1), 0, 8)
    unclipped = []
    for i in range(8):
        mask = jnp.arange(8) == i
        summed, stats = grad_fn(params, (batch, keys), mask)
        norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(summed))))
        assert norm <= 0.5 * (1 + 1e-5)
        unclipped.append(float(stats.per_example_norms[i]))
    assert min(unclipped) > 0.5   # every example was clipped: the bound is not vacuous


def test_augmentation_multiplicity_k1_identity_is_plain_dpsgd_and_views_average_before_clipping():
    data = _engine_data()
    batch = {"x": jnp.asarray(data["x"][:8]), "y": jnp.asarray(data["y"][:8])}
    params = {"w": 0.1 * jax.random.normal(jax.random.key(0), (64, 10)), "b": jnp.zeros((10,))}
    mask = jnp.ones(8, bool)
    keys = augmentation_keys(jax.random.key(1), 3, 8)
    plain, _ = jaxdp.clipped_grad(_loss, 1.0, method="vmap")(params, batch, mask)
    ident, _ = jaxdp.clipped_grad(augmentation_multiplicity(_loss, lambda kk, ex: ex, 1), 1.0, method="vmap")(
        params, (batch, keys), mask)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(ident)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # K identical views: the mean loss equals the loss, so the clipped sum is unchanged (not K times larger)
    same, _ = jaxdp.clipped_grad(augmentation_multiplicity(_loss, lambda kk, ex: ex, 3), 1.0, method="vmap")(
        params, (batch, keys), mask)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(same)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_ema_update_warms_up_then_uses_decay():
    ema = {"a": jnp.zeros(2)}
    p = {"a": jnp.ones(2)}
    e1 = ema_update(ema, p, 0, decay=0.99)         # d = min(0.99, 1/10) = 0.1
    np.testing.assert_allclose(np.asarray(e1["a"]), 0.9, rtol=1e-6)
    e2 = ema_update(ema, p, 10_000, decay=0.99)    # d = 0.99
    np.testing.assert_allclose(np.asarray(e2["a"]), 0.01, rtol=1e-5)


def test_trainer_runs_bandmf_and_records_the_mechanism(tmp_path):
    import json
    from jaxdp.train import DPTrainer
    from tiny import tiny_config
    cfg = tiny_config(tmp_path / "run", epochs=1, training={"batch_size": 64, "mechanism": "bandmf", "bands": 4},
                      epsilon=3.0)
    trainer = DPTrainer(cfg, log=False)
    trainer.train()
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["mechanism"], m["bands"], m["sampling"]) == ("bandmf", 4, "cyclic_poisson")
    p = 4 * 64 / trainer.n
    assert math.isclose(m["sample_rate"], p) and math.isclose(m["expected_batch_size"], 64)
    eps = accounting.compute_epsilon(m["noise_multiplier"], p, math.ceil(m["steps"] / 4), 1e-5, accountant="rdp")
    assert math.isclose(m["epsilon"], eps, rel_tol=1e-9) and eps <= 3.0


def test_momentum_workload_error_matches_dense_and_its_optimum_beats_the_prefix_sum_optimum():
    n, beta = 40, 0.9
    a = np.array([[(1 - beta ** (i - j + 1)) / (1 - beta) if i >= j else 0.0 for j in range(n)] for i in range(n)])
    c = [1.0, 0.5, -0.2]
    dense = np.linalg.norm(a @ np.linalg.inv(mf.strategy_matrix(c, n))) ** 2
    assert math.isclose(mf.prefix_sum_error(c, n, momentum=beta), dense, rel_tol=1e-10)
    th = np.array([0.5, -0.2])   # analytic gradient = finite differences
    g = mf._loss_and_grad(th, n, beta)[1]
    fd = [(mf._loss_and_grad(th + 1e-6 * e, n, beta)[0] - mf._loss_and_grad(th - 1e-6 * e, n, beta)[0]) / 2e-6
          for e in np.eye(2)]
    np.testing.assert_allclose(g, fd, rtol=1e-5)
    plain, mom = mf.optimal_banded_toeplitz(n, 4), mf.optimal_banded_toeplitz(n, 4, momentum=beta)
    assert mf.prefix_sum_error(mom, n, beta) < mf.prefix_sum_error(plain, n, beta)
    assert mf.prefix_sum_error(mom, n, beta) < mf.prefix_sum_error([1.0], n, beta)


def test_select_bands_trades_strategy_error_against_lost_amplification():
    """err(b) = sigma_b^2 ||A C_b^-1||_F^2 with sigma_b calibrated for rate b B / N and ceil(T / b) steps; b = 1 is
    DP-SGD (err = sigma_1^2 T (T + 1) / 2). On the demo's data (N = 1437, B = 256, T = 169) at epsilon 1 the lost
    amplification dominates and DP-SGD is chosen; with B / N = 0.01 and T = 1000 more bands win."""
    t = 169
    b, table = mf.select_bands(t, 1437, 256, 1.0, DELTA, candidates=(1, 2, 4, 8), accountant="rdp")
    assert b == 1 and sorted(table) == [1, 2, 4]            # 8 * 256 > 1437: skipped
    sigma1 = accounting.calibrate_noise_multiplier(1.0, DELTA, 256 / 1437, steps=t, accountant="rdp")
    assert table[1]["noise_multiplier"] == pytest.approx(sigma1)
    assert table[1]["error"] == pytest.approx(sigma1 ** 2 * t * (t + 1) / 2, rel=1e-9)
    assert all(table[k]["relative"] > 1.0 for k in (2, 4))
    sigma4 = accounting.calibrate_noise_multiplier(1.0, DELTA, 4 * 256 / 1437, steps=math.ceil(t / 4),
                                                   accountant="rdp")
    assert table[4]["error"] == pytest.approx(sigma4 ** 2 * mf.prefix_sum_error(mf.optimal_banded_toeplitz(t, 4), t))
    b, table = mf.select_bands(1000, 60000, 600, 3.0, DELTA, candidates=(1, 2, 4), accountant="rdp")
    assert b == 4 and table[4]["relative"] < 0.7 and min(table, key=lambda k: table[k]["error"]) == b
    with pytest.raises(ValueError, match="candidate"):
        mf.select_bands(100, 100, 200, 3.0, 1e-3, accountant="rdp")
