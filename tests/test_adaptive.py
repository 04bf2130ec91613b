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


# --- issue 23: centred count (sensitivity 1/2), normalised update, convergence, engine and accountant -------

def _lin_loss(p, b):
    return b["x"] @ p["w"]          # per-example gradient = x_i, so ||g_i|| = ||x_i||


def _lin_data(norms):
    x = np.zeros((len(norms), 3), np.float32)
    x[:, 0] = norms
    return {"w": jnp.zeros(3)}, {"x": jnp.asarray(x)}


def test_each_example_moves_the_gradient_by_at_most_c_and_the_count_by_one_half():
    # Noiseless releases with and without example j (mask False): the clipped sum moves by <= C_t (here C_t is
    # reached after a few geometric updates, not 1), the centred count by exactly 1/2 -- the sensitivity the
    # noise split (2 sigma_b) assumes. An uncentred count would move by 1 for unclipped examples.
    norms = np.array([0.05, 0.2, 0.4, 0.9, 3.0, 40.0, 1e4, 0.6], np.float32)
    p, b = _lin_data(norms)
    ada = adaptive_clipping(_lin_loss, noise_multiplier=0.0, expected_batch_size=8.0, key=0, initial_clip_norm=2.0,
                            count_noise_std=0.0, normalize=False, method="vmap")
    step = jax.jit(ada.step)
    state = ada.init()
    for _ in range(3):
        _, state, _ = step(p, b, None, state)
    C = float(state.clip_norm)
    assert abs(C - 2.0) > 0.05
    full, _, st_full = step(p, b, jnp.ones(8, bool), state)
    for j in range(8):
        mask = jnp.ones(8, bool).at[j].set(False)
        part, _, st = step(p, b, mask, state)
        moved = 8.0 * np.linalg.norm(np.asarray(full["w"]) - np.asarray(part["w"]))
        assert moved <= C * (1 + 1e-5), (j, moved, C)
        np.testing.assert_allclose(moved, min(norms[j], C), rtol=1e-4)
        dcount = 8.0 * (float(st_full["unclipped_fraction"]) - float(st["unclipped_fraction"]))
        np.testing.assert_allclose(abs(dcount), 0.5, atol=1e-5)


def test_normalised_update_size_does_not_grow_with_the_clip_norm():
    # The issue-23 collapse: with plain SGD the un-normalised update G/E grows with C. normalize=True (default)
    # divides by E C_t: without noise every example contributes at most 1/E, whatever C.
    norms = np.array([5.0, 50.0, 500.0, 5000.0], np.float32)
    p, b = _lin_data(norms)
    for c0 in (0.01, 1.0, 100.0):
        ada = adaptive_clipping(_lin_loss, noise_multiplier=0.0, expected_batch_size=4.0, key=0,
                                initial_clip_norm=c0, count_noise_std=0.0, method="vmap")
        g, _, _ = jax.jit(ada.step)(p, b, None, ada.init())
        assert float(jnp.linalg.norm(g["w"])) <= 1.0 + 1e-5
        np.testing.assert_allclose(float(jnp.linalg.norm(g["w"])),
                                   float(np.sum(np.minimum(norms, c0) / c0)) / 4.0, rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.3, 0.7])
def test_clip_norm_converges_to_the_target_quantile_with_noise(gamma):
    # 200 examples with log-uniform gradient norms on [0.01, 100]; full batch (E = 200), sigma = 1,
    # sigma_b = E / 20 = 10 (the released fraction has std 0.05 per step). After 150 steps C_t wanders around
    # the gamma-quantile; its geometric mean over the next 150 steps must lie between the (gamma - 0.1)- and
    # (gamma + 0.1)-quantiles (a factor ~2.5 each way; the stationary spread of log C_t from the count noise is
    # about eta * 0.05 / sqrt(2 * eta * density) ~ 0.1, far inside).
    norms = np.logspace(-2, 2, 200).astype(np.float32)
    p, b = _lin_data(norms)
    ada = adaptive_clipping(_lin_loss, noise_multiplier=1.0, expected_batch_size=200.0, key=7, initial_clip_norm=1.0,
                            target_quantile=gamma, learning_rate=0.2, method="vmap")
    step = jax.jit(ada.step)
    state, cs, fracs = ada.init(), [], []
    for t in range(300):
        _, state, st = step(p, b, None, state)
        if t >= 150:
            cs.append(float(st["clip_norm"]))
            fracs.append(float(st["unclipped_fraction"]) - float(np.mean(norms <= float(st["clip_norm"]))))
    geo = float(np.exp(np.mean(np.log(cs))))
    lo, hi = np.quantile(norms, [gamma - 0.1, gamma + 0.1])
    assert lo <= geo <= hi, (lo, geo, hi)
    # the count noise is there, with std sigma_b / E = 0.05 (150 draws: sample std within +-25 % w.p. > 0.999)
    assert 0.0375 < np.std(fracs) < 0.0625


def test_engine_adaptive_option_accounts_the_composed_noise_multiplier():
    # make_private(adaptive_clipping=...): the accountant records sigma, the noise multiplier of the PAIR of
    # releases (gradient with sigma_eff, centred count with sigma_b), and the run's epsilon equals that of the
    # noise multiplier composed from the noise actually applied.
    from jaxdp import accounting, models
    from jaxdp.adaptive import composed_noise_multiplier
    from jaxdp.data import load_digits
    d = load_digits()
    n = 512
    data = {"x": d.x_train[:n], "y": d.y_train[:n]}
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    model = models.create("logreg", (8, 8, 1), 10, seed=0)
    private = engine.make_private(
        loss_fn=lambda m, bb: models.cross_entropy(m(bb["x"]), bb["y"]), model=model, optimizer=__import__(
            "optax").sgd(0.5), dataset_size=n, batch_size=64, noise_multiplier=1.0, l2_clip_norm=0.1, seed=3, method="vmap",
        adaptive_clipping={"target_quantile": 0.5, "learning_rate": 0.2})
    assert private.noise_multiplier == 1.0
    assert private.count_noise_std == 64 / 20
    assert private.effective_noise_multiplier > 1.0
    np.testing.assert_allclose(composed_noise_multiplier(private.effective_noise_multiplier, private.count_noise_std),
                               1.0, rtol=1e-12)
    state = private.init()
    c = [private.clip_norm(state)]
    for bb, mask in private.batches(data, 12):
        state, stats = private.step(state, bb, mask)
        c.append(private.clip_norm(state))
    assert isinstance(stats, jaxdp.ClipStats)
    assert c[0] == pytest.approx(0.1) and c[-1] > 0.2            # C climbs towards the median norm
    sigma_composed = composed_noise_multiplier(private.effective_noise_multiplier, private.count_noise_std)
    expected = accounting.compute_epsilon(sigma_composed, 64 / n, 12, 1e-5, accountant="rdp")
    assert engine.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="count_noise_std"):
        engine.make_private(loss_fn=lambda m, bb: None, model=model, optimizer=__import__("optax").sgd(0.5),
                            dataset_size=n, batch_size=64, noise_multiplier=8.0, l2_clip_norm=1.0, seed=3,
                            adaptive_clipping=True)
    with pytest.raises(ValueError, match="flat clip norm"):
        engine.make_private(loss_fn=lambda m, bb: None, model=model, optimizer=__import__("optax").sgd(0.5),
                            dataset_size=n, batch_size=64, noise_multiplier=1.0, l2_clip_norm={"dense": 1.0},
                            seed=3, adaptive_clipping=True)


def test_engine_adaptive_secure_mode_steps():
    # secure=True: no key; the gradient and the count noise come from the OS entropy source.
    import optax
    engine = jaxdp.PrivacyEngine(accountant="rdp", secure=True)
    p, b = _lin_data(np.linspace(0.1, 3.0, 64).astype(np.float32))
    private = engine.make_private(loss_fn=_lin_loss, params=p, optimizer=optax.sgd(0.1), dataset_size=64,
                                  batch_size=32, noise_multiplier=1.0, l2_clip_norm=1.0, adaptive_clipping=True,
                                  method="vmap")
    state = private.init()
    s1, _ = private.step(state, b, np.ones(64, bool))
    s2, _ = private.step(state, b, np.ones(64, bool))
    assert private.clip_norm(s1) != private.clip_norm(s2)           # fresh count noise each call
    assert not np.allclose(s1.params["w"], s2.params["w"])
