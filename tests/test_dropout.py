"""Dropout through PrivacyEngine (issue 19 item 2): per-example dropout keys for NNX (nnx.Dropout) and Linen
(``loss_fn(params, batch, rng)``) under every clipping method; the clip bound holds per example; a seed
reproduces the run."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxdp
from jaxdp import models
from jaxdp.engine import ExampleKeyedBatch

N, B, D, K, C = 32, 8, 6, 3, 0.5
RNG = np.random.default_rng(0)
X = (RNG.normal(size=(N, D)) * 4).astype(np.float32)   # large inputs: most gradients are clipped
Y = RNG.integers(0, K, N).astype(np.int32)
X[1] = X[0]
Y[1] = Y[0]                                              # two identical examples: their masks must differ


class DropNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(16, K, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jnp.tanh(self.l1(x))))


def nnx_loss(model, batch):
    return models.cross_entropy(model(batch["x"]), batch["y"])


def _private(method, seed=7, model=None):
    model = DropNet(nnx.Rngs(0)) if model is None else model
    return jaxdp.PrivacyEngine().make_private(
        model=model, loss_fn=nnx_loss, optimizer=optax.sgd(0.1), dataset_size=N, batch_size=B,
        noise_multiplier=1.0, l2_clip_norm=C, seed=seed, method=method)


def _run(private, steps=3):
    state = private.init()
    for batch, mask in private.batches({"x": X, "y": Y}, steps):
        state, stats = private.step(state, batch, mask)
    return state, stats


def _keyed_batch(private, idx):
    keys = jax.random.key_data(jax.random.split(jax.random.key(5), len(idx)))
    return ExampleKeyedBatch({"x": jnp.asarray(X[idx]), "y": jnp.asarray(Y[idx])}, keys)


@pytest.mark.parametrize("method", [pytest.param("vmap", marks=pytest.mark.slow), "ghost", "auto"])
def test_nnx_dropout_trains_with_every_method_and_keeps_the_clip_bound(method):
    private = _private(method)
    state, stats = _run(private)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(state.params))
    assert private.steps_taken == 3
    # Sensitivity: removing example i changes the clipped sum by its clipped gradient, of norm <= C.
    idx = np.arange(8)
    kb = _keyed_batch(private, idx)
    masks = jnp.concatenate([jnp.ones((1, 8), bool), ~jnp.eye(8, dtype=bool)])   # all; all but example i
    sums, st = jax.jit(jax.vmap(private.grad_fn, in_axes=(None, None, 0)))(state.params, kb, masks)
    assert float(st.clip_fraction[0]) > 0.5              # the bound is actually exercised
    diff = jax.tree_util.tree_map(lambda s: s[:1] - s[1:], sums)
    norms = jnp.sqrt(sum(jnp.sum(d.reshape(8, -1) ** 2, axis=1) for d in jax.tree_util.tree_leaves(diff)))
    assert float(jnp.max(norms)) <= C * (1 + 1e-4)


def test_dropout_masks_are_per_example_and_the_same_under_every_method():
    ref = _private("vmap")
    params = ref.init().params
    kb = _keyed_batch(ref, np.arange(8))
    losses = ref.loss_fn(params, kb)
    assert float(losses[0]) != float(losses[1])          # same example, different position: its own mask
    evaluated = nnx.merge(ref._nnx_graph[0], params, ref._nnx_graph[1])
    evaluated.eval()
    eval_losses = nnx_loss(evaluated, kb.batch)
    assert not np.allclose(losses, eval_losses)          # dropout is on while training
    mask = jnp.ones(8, bool)
    g_ref, s_ref = jax.jit(ref.grad_fn)(params, kb, mask)
    for method in ("ghost", "auto"):
        g, s = jax.jit(_private(method).grad_fn)(params, kb, mask)
        np.testing.assert_allclose(s.per_example_norms, s_ref.per_example_norms, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_dropout_run_is_determined_by_the_seed():
    a, _ = _run(_private("auto", seed=11))
    b, _ = _run(_private("auto", seed=11))
    c, _ = _run(_private("auto", seed=12))
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(c.params)))


class LinenDropNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(nn.Dense(16)(x)))
        return nn.Dense(K)(x)


@pytest.mark.parametrize("method", ["vmap", pytest.param("ghost", marks=pytest.mark.slow)])
def test_linen_dropout_gets_a_key_per_example(method):
    module = LinenDropNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, D)), train=False)

    def loss_fn(params, batch, rng):                     # rng: this example's key
        logits = module.apply({"params": params}, batch["x"], rngs={"dropout": rng})
        return models.cross_entropy(logits, batch["y"])

    def make(seed):
        return jaxdp.PrivacyEngine().make_private(
            model=module, variables=variables, loss_fn=loss_fn, optimizer=optax.sgd(0.1), dataset_size=N,
            batch_size=B, noise_multiplier=1.0, l2_clip_norm=C, seed=seed, method=method)

    a, _ = _run(make(3))
    b, _ = _run(make(3))
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    private = make(3)
    kb = _keyed_batch(private, np.arange(8))
    losses = private.loss_fn(variables["params"], kb)
    assert float(losses[0]) != float(losses[1])
    with pytest.raises(ValueError, match="rng"):
        private.loss_fn(variables["params"], kb.batch)
