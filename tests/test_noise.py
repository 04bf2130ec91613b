"""add_noise / dp_aggregate / dpsgd: noise scale, independence, secure mode, key handling, aggregation.

Statistical bounds (all with fixed seeds, failure probability ~1e-6 per check for a correct implementation):
* Standard deviation: for n i.i.d. N(0, s0^2) draws with sample variance s^2, (n-1) s^2 / s0^2 ~ chi2(n-1), so
  s^2 / s0^2 lies in [chi2.ppf(5e-7, n-1), chi2.ppf(1 - 5e-7, n-1)] / (n-1) with probability 1 - 1e-6.
* Correlation: for independent samples the Pearson r is approximately N(0, 1/n), so |r| < z / sqrt(n) with
  z = norm.ppf(1 - 5e-7) ~ 4.89 (two-sided 1e-6).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import jaxdp
from jaxdp.clipping import CLIP_EPS
from jaxdp.noise import gaussian_like

ALPHA = 1e-6
Z = stats.norm.ppf(1 - ALPHA / 2)
N = 20_000


def assert_std(samples, expected_std):
    x = np.asarray(samples, np.float64).ravel()
    n = x.size
    lo = stats.chi2.ppf(ALPHA / 2, n - 1) / (n - 1)
    hi = stats.chi2.ppf(1 - ALPHA / 2, n - 1) / (n - 1)
    ratio = x.var(ddof=1) / expected_std ** 2
    assert lo <= ratio <= hi, (ratio, lo, hi)


def assert_uncorrelated(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    r = np.corrcoef(a, b)[0, 1]
    assert abs(r) < Z / np.sqrt(a.size), r


def _updates(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (100, N // 100)), "b": jax.random.normal(k2, (N,))}


@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_is_sigma_C_over_E(secure):
    sigma, C, E = 1.3, 0.7, 50.0
    g = _updates()
    noisy_tx = jaxdp.add_noise(noise_multiplier=sigma, l2_clip_norm=C, expected_batch_size=E,
                               key=None if secure else jax.random.key(42), secure=secure)
    clean_tx = jaxdp.add_noise(noise_multiplier=0.0, l2_clip_norm=C, expected_batch_size=E, key=jax.random.key(0))
    noisy, state = jax.jit(noisy_tx.update)(g, noisy_tx.init(g))
    clean, _ = clean_tx.update(g, clean_tx.init(g))
    for name in g:
        np.testing.assert_allclose(clean[name], g[name] / E, rtol=1e-6)
        assert_std(noisy[name] - clean[name], sigma * C / E)
    assert int(state.count) == 1
    if secure:
        assert state.key is None


def test_noise_uncorrelated_across_leaves_and_steps():
    tx = jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0, key=jax.random.key(7))
    zeros = {"a": jnp.zeros(N), "b": jnp.zeros(N)}
    update = jax.jit(tx.update)
    state = tx.init(zeros)
    n0, state = update(zeros, state)
    n1, state = update(zeros, state)
    assert int(state.count) == 2
    assert_std(n0["a"], 1.0)
    assert_uncorrelated(n0["a"], n0["b"])   # different leaves
    assert_uncorrelated(n0["a"], n1["a"])   # different steps
    assert_uncorrelated(n0["b"], n1["b"])
    # Same key and step -> same noise (reproducible, resumable); a different key -> independent noise.
    again, _ = update(zeros, tx.init(zeros))
    np.testing.assert_array_equal(again["a"], n0["a"])
    other = jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0, key=jax.random.key(8))
    o0, _ = other.update(zeros, other.init(zeros))
    assert_uncorrelated(o0["a"], n0["a"])


def test_secure_mode_draws_fresh_noise_each_call():
    tx = jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0, secure=True)
    zeros = {"a": jnp.zeros(N)}
    update = jax.jit(tx.update)
    a, _ = update(zeros, tx.init(zeros))
    b, _ = update(zeros, tx.init(zeros))  # the same state: a seeded key would repeat the noise
    assert_uncorrelated(a["a"], b["a"])
    assert_std(a["a"], 1.0)


def test_per_layer_sensitivity_in_noise():
    Cs = {"w": 0.3, "b": 0.4}  # ||(0.3, 0.4)||_2 = 0.5
    sigma, E = 2.0, 10.0
    zeros = jax.tree_util.tree_map(jnp.zeros_like, _updates())
    tx = jaxdp.add_noise(noise_multiplier=sigma, l2_clip_norm=Cs, expected_batch_size=E, key=jax.random.key(1))
    out, _ = tx.update(zeros, tx.init(zeros))
    for leaf in out.values():
        assert_std(leaf, sigma * 0.5 / E)


def test_trainable_leaves_only_get_noise():
    zeros = {"frozen": jnp.zeros(100), "train": jnp.zeros(N)}
    tx = jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=4.0, key=jax.random.key(3),
                         trainable={"frozen": False, "train": True})
    out, _ = tx.update(zeros, tx.init(zeros))
    np.testing.assert_array_equal(out["frozen"], 0.0)
    assert_std(out["train"], 0.25)


def test_missing_key_is_an_error():
    with pytest.raises(ValueError, match="PRNG key"):
        jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=10.0)
    with pytest.raises(ValueError, match="PRNG key"):
        jaxdp.dp_aggregate(l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=10.0)
    with pytest.raises(ValueError, match="PRNG key"):
        jaxdp.dpsgd(0.1, l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=10.0, key=None)
    with pytest.raises(ValueError, match="PRNG key"):
        jaxdp.dpadam(0.1, l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=10.0, key=None)
    with pytest.raises(TypeError, match="key"):
        jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=10.0, key="secret")
    # Int seeds and raw uint32[2] keys are accepted and equivalent to jax.random.key.
    zeros = {"a": jnp.zeros(10)}
    outs = []
    for key in (5, jax.random.key(5), jax.random.key_data(jax.random.key(5))):
        tx = jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0, key=key)
        outs.append(np.asarray(tx.update(zeros, tx.init(zeros))[0]["a"]))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=-0.1, l2_clip_norm=1.0, expected_batch_size=10), "noise_multiplier"),
    (dict(noise_multiplier=1.0, l2_clip_norm=0.0, expected_batch_size=10), "l2_clip_norm"),
    (dict(noise_multiplier=1.0, l2_clip_norm=-2.0, expected_batch_size=10), "l2_clip_norm"),
    (dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=0), "expected_batch_size"),
])
def test_bad_noise_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxdp.add_noise(key=jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match=match):
        jaxdp.dp_aggregate(key=jax.random.key(0), **kwargs)


def _per_example():
    k1, k2 = jax.random.split(jax.random.key(11))
    scale = jnp.logspace(-2, 1, 6)
    return {"w": scale[:, None, None] * jax.random.normal(k1, (6, 3, 2)),
            "b": scale[:, None] * jax.random.normal(k2, (6, 4))}


def test_dp_aggregate_equals_clip_sum_noise_divide():
    G = _per_example()
    mask = np.array([True, True, False, True, True, False])
    C, sigma, E = 1.0, 0.8, 4.0
    # Clip-sum by hand (numpy, float64).
    manual = {k: np.zeros(v.shape[1:]) for k, v in G.items()}
    for i in range(6):
        norm = np.sqrt(sum(np.sum(np.asarray(v[i], np.float64) ** 2) for v in G.values()))
        f = min(1.0, C / (norm + CLIP_EPS))
        if mask[i]:
            for k in G:
                manual[k] += f * np.asarray(G[k][i], np.float64)
    tx0 = jaxdp.dp_aggregate(l2_clip_norm=C, noise_multiplier=0.0, expected_batch_size=E, key=jax.random.key(0))
    out0, _ = tx0.update(G, tx0.init(None), mask=mask)
    for k in G:
        np.testing.assert_allclose(out0[k], manual[k] / E, atol=1e-6)
    # With noise: exactly add_noise applied to the clipped sum with the same key.
    key = jax.random.key(9)
    tx = jaxdp.dp_aggregate(l2_clip_norm=C, noise_multiplier=sigma, expected_batch_size=E, key=key)
    out, st = jax.jit(lambda g, s, m: tx.update(g, s, mask=m))(G, tx.init(None), mask)
    ref_tx = jaxdp.add_noise(noise_multiplier=sigma, l2_clip_norm=C, expected_batch_size=E, key=key)
    summed = {k: jnp.asarray(v, jnp.float32) for k, v in manual.items()}
    ref, _ = ref_tx.update(summed, ref_tx.init(summed))
    for k in G:
        np.testing.assert_allclose(out[k], ref[k], atol=1e-6)
    assert int(st.count) == 1
    # Padding examples holding NaN change nothing.
    G_nan = jax.tree_util.tree_map(
        lambda v: jnp.where(jnp.asarray(mask).reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.nan), G)
    out_nan, _ = tx0.update(G_nan, tx0.init(None), mask=mask)
    for k in G:
        np.testing.assert_array_equal(out_nan[k], out0[k])
    with pytest.raises(ValueError, match="mask must have shape"):
        tx0.update(G, tx0.init(None), mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="flat clipping"):
        jaxdp.dp_aggregate(l2_clip_norm={"w": 1.0, "b": 1.0}, noise_multiplier=1.0, expected_batch_size=4.0, key=key)


def test_dpsgd_and_dpadam_are_noise_then_optimizer():
    g = _updates()
    params = jax.tree_util.tree_map(jnp.zeros_like, g)
    key = jax.random.key(4)
    noise = jaxdp.add_noise(noise_multiplier=1.1, l2_clip_norm=0.5, expected_batch_size=8.0, key=key)
    noisy, _ = noise.update(g, noise.init(params))
    tx = jaxdp.dpsgd(0.1, l2_clip_norm=0.5, noise_multiplier=1.1, expected_batch_size=8.0, key=key)
    upd, _ = tx.update(g, tx.init(params), params)
    for k in g:
        np.testing.assert_allclose(upd[k], -0.1 * noisy[k], rtol=1e-5, atol=1e-7)
    adam = optax.adam(0.01)
    ref, _ = adam.update(noisy, adam.init(params), params)
    tx = jaxdp.dpadam(0.01, l2_clip_norm=0.5, noise_multiplier=1.1, expected_batch_size=8.0, key=key)
    upd, _ = tx.update(g, tx.init(params), params)
    for k in g:
        np.testing.assert_allclose(upd[k], ref[k], rtol=1e-5, atol=1e-7)
    tx = jaxdp.dpsgd(0.1, l2_clip_norm=0.5, noise_multiplier=1.1, expected_batch_size=8.0, key=key, momentum=0.9)
    upd, _ = tx.update(g, tx.init(params), params)
    for k in g:
        np.testing.assert_allclose(upd[k], -0.1 * noisy[k], rtol=1e-5, atol=1e-7)  # first step: trace = g


def test_flat_two_word_sampler_is_standard_normal():
    """jaxdp.noise._standard_normal (both threefry words, jax's uniform -> erfinv transform) against N(0, 1).

    n = 2^21 samples, every check two-sided at ALPHA = 1e-6 for a correct sampler:
    * mean: N(0, 1/n) -> |mean| < Z / sqrt(n);  variance: the chi-square bound of assert_std;
    * Kolmogorov-Smirnov p-value > ALPHA (the whole CDF, 1-sample KS);
    * tails: the count beyond |x| > 4 is Binomial(n, p4), p4 = 2 (1 - Phi(4)) = 6.3e-5 (mean 133): within
      Z standard deviations (this catches a broken erfinv tail or a mantissa/uniform mapping error);
    * the two halves (the two output words of the same threefry blocks) and neighbours are uncorrelated.
    """
    from jaxdp.noise import _standard_normal

    n = 2 ** 21
    x = np.asarray(jax.jit(lambda k: _standard_normal(k, n, jnp.float32))(jax.random.key(3)), np.float64)
    assert x.shape == (n,) and np.all(np.isfinite(x))
    assert abs(x.mean()) < Z / np.sqrt(n)
    assert_std(x, 1.0)
    assert stats.kstest(x, "norm").pvalue > ALPHA
    p4 = 2 * stats.norm.sf(4.0)
    tail = np.sum(np.abs(x) > 4.0)
    assert abs(tail - n * p4) < Z * np.sqrt(n * p4 * (1 - p4)), tail
    assert_uncorrelated(x[: n // 2], x[n // 2:])
    assert_uncorrelated(x[:-1], x[1:])
    # A different key gives independent samples; the same key the same samples.
    y = np.asarray(_standard_normal(jax.random.key(4), n, jnp.float32))
    assert_uncorrelated(x, y)
    np.testing.assert_array_equal(np.asarray(_standard_normal(jax.random.key(3), n, jnp.float32)), x)


def test_noise_leaves_come_from_one_flat_draw_with_exact_shapes_and_dtypes():
    from jaxdp.noise import gaussian_like

    leaves = [jnp.zeros((3, 5)), jnp.zeros((7,), jnp.bfloat16), jnp.zeros(()), jnp.zeros((2, 2))]
    out = gaussian_like(jax.random.key(0), leaves, 2.0, draw=[True, True, True, False])
    assert out[3] is None
    for x, z in zip(leaves[:3], out[:3]):
        assert z.shape == x.shape and z.dtype == x.dtype
    # the float32 leaves are consecutive slices of the same flat draw: no coordinate is reused
    flat = np.concatenate([np.ravel(out[0]), np.ravel(out[2])])
    assert len(np.unique(flat)) == flat.size


def test_int_seeds_keep_all_64_bits():
    """jax.random.key keeps only a seed's low 32 bits without x64 (key(2**32 + 5) == key(5)): the 63-bit seeds
    jaxdp draws from the OS gave only 2^32 noise streams. Seeds that differ only above bit 32 now give different
    noise (in add_noise and in make_private's noise stream), and seeds below 2^32 give the noise they always did."""
    from jaxdp._checks import seed_key

    zeros = {"a": jnp.zeros(64)}

    def noise(seed):
        tx = jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0, key=seed)
        return np.asarray(tx.update(zeros, tx.init(zeros))[0]["a"])

    assert np.array_equal(noise(5), noise(jax.random.key(5)))            # below 2^32: unchanged
    assert not np.allclose(noise(2**32 + 5), noise(5))
    assert not np.allclose(noise(2**62 + 5), noise(2**32 + 5))

    def data(s):
        return np.asarray(jax.random.key_data(seed_key(s)))
    assert np.array_equal(data(2**40 + 5), [256, 5])                     # jax.random.key's x64 layout [hi, lo]
    assert np.array_equal(data(-1), np.asarray(jax.random.key_data(jax.random.key(-1))))
    with pytest.raises(ValueError, match="2\\^64"):
        seed_key(2**64)
    with pytest.raises(TypeError, match="integer"):
        seed_key(1.5)

    def engine_noise(seed):
        p = {"w": jnp.zeros(4)}
        priv = jaxdp.PrivacyEngine(accountant="rdp").make_private(
            loss_fn=lambda p, b: jnp.sum((b["x"] @ p["w"]) ** 2, -1) * 0 + jnp.zeros(b["x"].shape[0]),
            params=p, optimizer=optax.sgd(1.0), dataset_size=100, batch_size=10, noise_multiplier=1.0,
            l2_clip_norm=1.0, seed=seed)
        leaves = jax.tree_util.tree_leaves(priv.tx.init(p))
        return [np.asarray(jax.random.key_data(x)).tolist() for x in leaves
                if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert engine_noise(5) and not np.array_equal(engine_noise(2**32 + 5), engine_noise(5))


def test_large_leaves_get_their_own_draw_and_small_ones_keep_the_flat_draw(monkeypatch):
    """A leaf of _LEAF_DRAW coordinates or more is drawn on its own (key ``split(key, groups + large)[groups + j]``);
    the small leaves keep the one flat draw from the group key, so their values are those of a call without
    the large leaves (split is prefix-stable with jax's partitionable threefry). Every coordinate N(0, std^2):
    the large leaves' mean and variance within their bounds, and uncorrelated with each other."""
    from jaxdp import noise
    from jaxdp.noise import _standard_normal

    monkeypatch.setattr(noise, "_LEAF_DRAW", 4096)
    key, std = jax.random.key(11), 2.0
    leaves = [jnp.zeros((300,)), jnp.zeros((5000,)), jnp.zeros((70, 100)), jnp.zeros((10,))]
    out = [np.asarray(x, np.float64) for x in gaussian_like(key, leaves, std)]
    small = [np.asarray(x) for x in gaussian_like(key, [leaves[0], leaves[3]], std)]
    np.testing.assert_array_equal(out[0], small[0])
    np.testing.assert_array_equal(out[3], small[1])
    keys = jax.random.split(key, 3)
    flat = np.asarray(_standard_normal(keys[0], 4096, jnp.float32))
    np.testing.assert_allclose(out[0], std * flat[:300], rtol=1e-6)
    np.testing.assert_allclose(out[1], std * np.asarray(_standard_normal(keys[1], 8192, jnp.float32))[:5000],
                               rtol=1e-6)
    np.testing.assert_allclose(out[2].reshape(-1),
                               std * np.asarray(_standard_normal(keys[2], 8192, jnp.float32))[:7000], rtol=1e-6)
    for z in (out[1], out[2].reshape(-1)):
        assert abs(z.mean()) < Z * std / np.sqrt(z.size)
        assert_std(z, std)
    assert_uncorrelated(out[1], out[2].reshape(-1)[:5000])


def test_noise_of_large_leaves_holds_only_their_bits():
    """XLA's temp memory for the noise of two 2^22-coordinate leaves: the flat draw held the bits, the draw and
    its slices (96 MiB, 3x the noise); per-leaf draws hold their bits (32 MiB)."""
    leaves = [jax.ShapeDtypeStruct((2 ** 22,), jnp.float32), jax.ShapeDtypeStruct((1024, 4096), jnp.float32),
              jax.ShapeDtypeStruct((300,), jnp.float32)]
    compiled = jax.jit(lambda k: gaussian_like(k, leaves, 1.0)).lower(jax.random.key(0)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 2 * 4 * 2 ** 22 + 2 ** 20, temp / 2 ** 20


def test_noise_of_many_mid_size_leaves_holds_only_their_bits():
    """Six 2^21-coordinate leaves (a looped transformer's layers): one flat draw held ~3x all the noise (144 MiB
    of XLA temp); per-leaf draws write their values into the outputs and hold their bits (48 MiB)."""
    leaves = [jax.ShapeDtypeStruct((2 ** 21,), jnp.float32) for _ in range(6)]
    compiled = jax.jit(lambda k: gaussian_like(k, leaves, 1.0)).lower(jax.random.key(0)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 1.25 * 6 * 4 * 2 ** 21 + 2 ** 20, temp / 2 ** 20
