"""Adaptive (quantile) clipping: noise split, geometric update, gradient equals clipped sum at C_t."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdp
from jaxdp.adaptive import adaptive_clipping, effective_noise_multiplier


def _loss(p, b):
    return jnp.sum((b["x"] @ p["w"]) ** 2, -1)


def _data():
    p = {"w": jnp.eye(3)}
    scale = jnp.arange(1, 9, dtype=jnp.float32)[:, None]       # norms grow with the index
    b = {"x": scale * jnp.ones((8, 3)) / 10}
    return p, b


def test_effective_noise_multiplier_split():
    # sigma_eff^-2 + (2 sigma_b)^-2 = sigma^-2
    s_eff = effective_noise_multiplier(1.1, 12.8)
    assert s_eff > 1.1
    np.testing.assert_allclose(s_eff ** -2 + (2 * 12.8) ** -2, 1.1 ** -2, rtol=1e-12)
    assert effective_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="count_noise_std"):
        effective_noise_multiplier(1.0, 0.4)
    ada = adaptive_clipping(_loss, noise_multiplier=1.1, expected_batch_size=256, key=0)
    assert ada.noise_multiplier == 1.1 and ada.count_noise_std == 256 / 20


def test_noiseless_update_is_geometric_and_grad_matches_clipped_grad():
    p, b = _data()
    ada = adaptive_clipping(_loss, noise_multiplier=0.0, expected_batch_size=8, key=0, initial_clip_norm=1.0,
                            target_quantile=0.5, learning_rate=0.2, count_noise_std=0.0, method="vmap")
    state = ada.init()
    g, state2, stats = jax.jit(ada.step)(p, b, None, state)
    norms = stats["per_example_norms"]
    frac = float(jnp.sum(norms <= 1.0)) / 8
    np.testing.assert_allclose(float(state2.clip_norm), np.exp(-0.2 * (frac - 0.5)), rtol=1e-6)
    ref, _ = jaxdp.clipped_grad(_loss, 1.0, method="vmap")(p, b)
    np.testing.assert_allclose(g["w"], ref["w"] / 8, rtol=1e-6)
    # Repeated steps drive C towards the median gradient norm (between the 4th and 5th norms).
    step = jax.jit(ada.step)
    for _ in range(60):
        _, state, _ = step(p, b, None, state)
    srt = np.sort(np.asarray(norms))
    assert srt[2] <= float(state.clip_norm) <= srt[5]


def test_noisy_step_uses_sigma_eff():
    p, b = _data()
    ada = adaptive_clipping(_loss, noise_multiplier=1.0, expected_batch_size=8, key=3, count_noise_std=2.0,
                            method="auto")
    g, _, _ = jax.jit(ada.step)(p, b, None, ada.init())
    ref, _ = jaxdp.clipped_grad(_loss, 1.0)(p, b)
    noise = (np.asarray(g["w"]) * 8 - np.asarray(ref["w"])).ravel()
    # 9 N(0, sigma_eff^2) draws, sigma_eff = 1/sqrt(1 - 1/16) = 1.033: the sample std lies in
    # [0.4, 1.8] with probability > 0.99 (chi-square with 9 dof: 0.25% / 99.75% quantiles 1.7 and 25.5).
    assert 0.4 < noise.std() * np.sqrt(9 / 8) < 1.8
