"""clipped_grad: exactness against a Python loop over single-example gradients, masks, microbatches,
per-layer clipping, has_aux, trainable, non-finite examples, stats and input validation."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdp
from jaxdp.clipping import CLIP_EPS

B = 8
ATOL = 1e-6


# ---------------------------------------------------------------------------------------------------------
# Three tiny models (float32): a pure-function MLP, a Linen CNN and a Linen embedding model.


def _xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def mlp_model():
    k = jax.random.split(jax.random.key(0), 2)
    params = {"layer1": {"w": 0.5 * jax.random.normal(k[0], (6, 5)), "b": jnp.zeros(5)},
              "layer2": {"w": 0.5 * jax.random.normal(k[1], (5, 3)), "b": 0.1 * jnp.ones(3)}}

    def loss_fn(p, batch):
        h = jnp.tanh(batch["x"] @ p["layer1"]["w"] + p["layer1"]["b"])
        return _xent(h @ p["layer2"]["w"] + p["layer2"]["b"], batch["y"])

    # Per-example input scales from 0.01 to 10: small examples are not clipped, large ones are.
    scale = jnp.logspace(-2, 1, B)[:, None]
    x = scale * jax.random.normal(jax.random.key(1), (B, 6))
    y = jnp.arange(B) % 3
    return params, loss_fn, {"x": x, "y": y}, "x"


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def cnn_model():
    model = _CNN()
    x = jnp.logspace(-2, 1, B)[:, None, None, None] * jax.random.normal(jax.random.key(2), (B, 5, 5, 1))
    params = model.init(jax.random.key(3), x[:1])["params"]

    def loss_fn(p, batch):
        return _xent(model.apply({"params": p}, batch["x"]), batch["y"])

    return params, loss_fn, {"x": x, "y": jnp.arange(B) % 3}, "x"


class _EmbedModel(nn.Module):
    @nn.compact
    def __call__(self, tokens, scale):
        e = nn.Embed(20, 4)(tokens)                       # [B, T, 4]
        return nn.Dense(3)(scale[:, None] * e.mean(axis=1))


def embed_model():
    model = _EmbedModel()
    tokens = jax.random.randint(jax.random.key(4), (B, 5), 0, 20)
    scale = jnp.logspace(-1, 2, B)
    params = model.init(jax.random.key(5), tokens[:1], scale[:1])["params"]

    def loss_fn(p, batch):
        return _xent(model.apply({"params": p}, batch["tokens"], batch["scale"]), batch["y"])

    return params, loss_fn, {"tokens": tokens, "scale": scale, "y": jnp.arange(B) % 3}, "scale"


MODELS = {"mlp": mlp_model, "cnn": cnn_model, "embed": embed_model}


# ---------------------------------------------------------------------------------------------------------
# Reference: a plain Python loop over single-example gradients.


def _example(batch, i):
    return jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)


def _flat_norm(tree):
    return float(np.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in jax.tree_util.tree_leaves(tree))))


def per_example_grads(loss_fn, params, batch):
    """One ``jax.grad`` call per example (jit-compiled once: the shapes of a 1-example batch never change)."""
    single = jax.jit(jax.grad(lambda p, ex: loss_fn(p, ex)[0]))
    return [single(params, _example(batch, i)) for i in range(jax.tree_util.tree_leaves(batch)[0].shape[0])]


def reference_sum(loss_fn, params, batch, C, mask=None, grads=None):
    grads = per_example_grads(loss_fn, params, batch) if grads is None else grads
    total = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i, g in enumerate(grads):
        if mask is not None and not mask[i]:
            continue
        f = min(1.0, C / (_flat_norm(g) + CLIP_EPS))
        total = jax.tree_util.tree_map(lambda t, gi: t + f * gi, total, g)
    return total, [_flat_norm(g) for g in grads]


def assert_trees_close(a, b, atol=ATOL):
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def _clip_norm_between(norms):
    """A clip norm with some examples above it and some below it."""
    return float(np.median(norms))


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_sum_equals_python_loop(name):
    params, loss_fn, batch, _ = MODELS[name]()
    grads = per_example_grads(loss_fn, params, batch)
    norms = [_flat_norm(g) for g in grads]
    C = _clip_norm_between(norms)
    ref, _ = reference_sum(loss_fn, params, batch, C, grads=grads)
    summed, stats = jax.jit(jaxdp.clipped_grad(loss_fn, C, method="vmap"))(params, batch)
    assert_trees_close(summed, ref)
    np.testing.assert_allclose(stats.per_example_norms, norms, rtol=1e-5)
    frac = float(stats.clip_fraction)
    assert 0.0 < frac < 1.0, frac  # some examples clipped, some not
    np.testing.assert_allclose(frac, np.mean(np.array(norms) > C - CLIP_EPS), atol=1e-7)


@pytest.mark.parametrize("name", list(MODELS))
def test_padding_contributes_exactly_zero_even_with_nan_data(name):
    params, loss_fn, batch, garbage_key = MODELS[name]()
    grads = per_example_grads(loss_fn, params, batch)
    C = _clip_norm_between([_flat_norm(g) for g in grads])
    mask = np.array([True, False, True, True, False, True, False, True])
    ref, _ = reference_sum(loss_fn, params, batch, C, mask, grads=grads)
    grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, C, method="vmap"))
    clean, stats_clean = grad_fn(params, batch, mask)
    bad = dict(batch)
    bad[garbage_key] = jnp.where(
        jnp.asarray(mask).reshape((-1,) + (1,) * (batch[garbage_key].ndim - 1)), batch[garbage_key], jnp.nan)
    dirty, stats = grad_fn(params, bad, mask)
    assert_trees_close(clean, ref)
    # Exactly the same result, bit for bit, whatever the padding holds.
    for a, b in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(dirty)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(stats.num_examples) == mask.sum()
    assert int(stats.num_nonfinite) == 0
    np.testing.assert_array_equal(np.asarray(stats.per_example_norms)[~mask], 0.0)
    assert float(stats.clip_fraction) == float(stats_clean.clip_fraction)


def test_padding_with_garbage_token_ids():
    params, loss_fn, batch, _ = embed_model()
    mask = np.arange(B) % 2 == 0
    ref, _ = reference_sum(loss_fn, params, batch, 0.5, mask)
    bad = dict(batch, tokens=jnp.where(mask[:, None], batch["tokens"], 10**6))  # out-of-range ids
    summed, _ = jaxdp.clipped_grad(loss_fn, 0.5, method="vmap")(params, bad, mask)
    assert_trees_close(summed, ref)


@pytest.mark.parametrize("name,microbatch_size", [
    ("mlp", 1), ("mlp", 3), ("mlp", 100), ("cnn", 5), ("embed", 3)])
# 3 and 5 do not divide B = 8; 100 > B is one chunk
def test_microbatched_equals_unbatched(name, microbatch_size):
    params, loss_fn, batch, _ = MODELS[name]()
    mask = np.array([True, True, False, True, True, True, False, True])
    full, s_full = jaxdp.clipped_grad(loss_fn, 0.7, method="vmap")(params, batch, mask)
    micro, s_micro = jax.jit(jaxdp.clipped_grad(loss_fn, 0.7, method="vmap", microbatch_size=microbatch_size))(
        params, batch, mask)
    assert_trees_close(micro, full)
    np.testing.assert_allclose(s_micro.per_example_norms, s_full.per_example_norms, rtol=1e-6)
    np.testing.assert_allclose(s_micro.per_example_losses, s_full.per_example_losses, rtol=1e-6)
    assert float(s_micro.clip_fraction) == pytest.approx(float(s_full.clip_fraction))
    assert int(s_micro.num_examples) == int(s_full.num_examples) == 6


@pytest.mark.parametrize("name", list(MODELS))
def test_huge_clip_norm_gives_nonprivate_gradient(name):
    params, loss_fn, batch, _ = MODELS[name]()
    summed, stats = jaxdp.clipped_grad(loss_fn, 1e9, method="vmap")(params, batch)
    expected = jax.grad(lambda p: jnp.sum(loss_fn(p, batch)))(params)
    assert_trees_close(summed, expected, atol=1e-5)
    assert float(stats.clip_fraction) == 0.0
    # add_noise with sigma = 0 divides by the public E: the mean-loss gradient times B / E.
    E = 20.0
    tx = jaxdp.add_noise(noise_multiplier=0.0, l2_clip_norm=1e9, expected_batch_size=E, key=jax.random.key(0))
    update, _ = tx.update(summed, tx.init(params))
    mean_grad = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    assert_trees_close(update, jax.tree_util.tree_map(lambda g: g * B / E, mean_grad), atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_every_clipped_example_norm_at_most_C(name):
    params, loss_fn, batch, _ = MODELS[name]()
    C = 0.05  # below most norms: nearly everything is clipped
    grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, C, method="vmap"))
    for i in range(B):
        one_hot = np.arange(B) == i
        clipped_i, stats = grad_fn(params, batch, one_hot)
        assert _flat_norm(clipped_i) <= C + 1e-6
        assert int(stats.num_examples) == 1
    assert float(grad_fn(params, batch)[1].clip_fraction) > 0.5


def test_per_layer_clipping_bounds_each_group():
    params, loss_fn, batch, _ = mlp_model()
    grads = per_example_grads(loss_fn, params, batch)
    # Each group's clip norm is the median of that group's per-example norms: some clipped, some not.
    Cs = {g: float(np.median([_flat_norm(gi[g]) for gi in grads])) for g in ("layer1", "layer2")}
    grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, Cs, method="vmap"))
    ref = jax.tree_util.tree_map(jnp.zeros_like, params)
    clipped_in = {"layer1": 0, "layer2": 0}
    for i, g in enumerate(grads):
        clipped_i, _ = grad_fn(params, batch, np.arange(B) == i)
        want = {}
        for group, c in Cs.items():
            n = _flat_norm(g[group])
            assert _flat_norm(clipped_i[group]) <= c + 1e-6
            f = min(1.0, c / (n + CLIP_EPS))
            clipped_in[group] += f < 1.0
            want[group] = jax.tree_util.tree_map(lambda x: f * x, g[group])
        assert_trees_close(clipped_i, want)
        ref = jax.tree_util.tree_map(jnp.add, ref, want)
    summed, stats = grad_fn(params, batch)
    assert_trees_close(summed, ref)
    for group in Cs:
        assert 0 < clipped_in[group] < B  # the constructed batch has clipped and unclipped examples per group
        assert float(stats.group_clip_fraction[group]) == pytest.approx(clipped_in[group] / B)
    assert jaxdp.total_clip_norm(Cs) == pytest.approx(np.hypot(Cs["layer1"], Cs["layer2"]))


def test_per_layer_clip_norm_must_match_params():
    params, loss_fn, batch, _ = mlp_model()
    with pytest.raises(ValueError, match="prefix"):
        jaxdp.clipped_grad(loss_fn, {"nope": 1.0, "other": 2.0})(params, batch)


def test_has_aux():
    params, loss_fn, batch, _ = mlp_model()

    def loss_aux(p, b):
        losses = loss_fn(p, b)
        return losses, {"double": 2.0 * losses, "label": b["y"]}

    mask = np.arange(B) < 6
    summed, stats = jaxdp.clipped_grad(loss_aux, 0.5, method="vmap", has_aux=True, microbatch_size=3)(
        params, batch, mask)
    ref, _ = jaxdp.clipped_grad(loss_fn, 0.5, method="vmap")(params, batch, mask)
    assert_trees_close(summed, ref)
    np.testing.assert_allclose(stats.aux["double"], 2.0 * np.asarray(loss_fn(params, batch)), rtol=1e-6)
    np.testing.assert_array_equal(stats.aux["label"], batch["y"])


def test_trainable_frozen_leaves_get_zero_grad_and_no_norm():
    params, loss_fn, batch, _ = mlp_model()
    C = 0.1
    grad_fn = jaxdp.clipped_grad(loss_fn, C, method="vmap", trainable={"layer1": False, "layer2": True})
    summed, stats = grad_fn(params, batch)
    for leaf in jax.tree_util.tree_leaves(summed["layer1"]):
        np.testing.assert_array_equal(leaf, 0.0)
    # Reference: clip the layer2 gradient alone (layer1 plays no part in the norm).
    grads = per_example_grads(loss_fn, params, batch)
    norms2 = [_flat_norm(g["layer2"]) for g in grads]
    ref = jax.tree_util.tree_map(jnp.zeros_like, params["layer2"])
    for g, n in zip(grads, norms2):
        f = min(1.0, C / (n + CLIP_EPS))
        ref = jax.tree_util.tree_map(lambda t, x: t + f * x, ref, g["layer2"])
    assert_trees_close(summed["layer2"], ref)
    np.testing.assert_allclose(stats.per_example_norms, norms2, rtol=1e-5)
    assert set(stats.layer_norm_mean) == {"layer2/b", "layer2/w"}
    with pytest.raises(ValueError, match="no trainable"):
        jaxdp.clipped_grad(loss_fn, C, trainable={"layer1": False, "layer2": False})(params, batch)


def test_nonfinite_example_dropped_and_counted():
    params, loss_fn, batch, _ = mlp_model()
    x = np.array(batch["x"])
    x[2, 0] = np.inf            # a real example whose gradient is not finite
    bad = dict(batch, x=jnp.asarray(x))
    mask = np.ones(B, bool)
    mask[5] = False             # and a padding example
    summed, stats = jaxdp.clipped_grad(loss_fn, 0.5, method="vmap")(params, bad, mask)
    keep = mask.copy()
    keep[2] = False
    ref, _ = reference_sum(loss_fn, params, batch, 0.5, keep)
    assert_trees_close(summed, ref)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(summed))
    assert int(stats.num_nonfinite) == 1
    assert int(stats.num_examples) == 7


def test_stats_on_constructed_example():
    # loss_i = a . xa_i + b . xb_i, so the per-example gradient is exactly (xa_i, xb_i).
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}

    def loss_fn(p, batch):
        return batch["xa"] @ p["a"] + batch["xb"] @ p["b"]

    xa = jnp.array([[0.3, 0.4], [0.0, 2.0], [3.0, 0.0], [9.0, 9.0]])   # ||xa|| = 0.5, 2, 3, (padding)
    xb = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.0, 4.0], [9.0, 9.0]])   # ||xb|| = 0, 0, 4
    mask = np.array([True, True, True, False])
    summed, st = jaxdp.clipped_grad(loss_fn, 1.0, method="vmap")(params, {"xa": xa, "xb": xb}, mask)
    np.testing.assert_allclose(st.per_example_norms, [0.5, 2.0, 5.0, 0.0], rtol=1e-6)
    assert float(st.clip_fraction) == pytest.approx(2 / 3)
    assert int(st.num_examples) == 3 and int(st.num_nonfinite) == 0
    assert float(st.layer_norm_mean["a"]) == pytest.approx((0.5 + 2 + 3) / 3, rel=1e-6)
    assert float(st.layer_norm_max["a"]) == pytest.approx(3.0, rel=1e-6)
    assert float(st.layer_norm_mean["b"]) == pytest.approx(4 / 3, rel=1e-6)
    assert float(st.layer_norm_max["b"]) == pytest.approx(4.0, rel=1e-6)
    assert float(st.group_clip_fraction["all"]) == pytest.approx(2 / 3)
    f1, f2 = 1 / (2 + CLIP_EPS), 1 / (5 + CLIP_EPS)
    np.testing.assert_allclose(summed["a"], [0.3 + 3 * f2, 0.4 + 2 * f1], rtol=1e-6)
    np.testing.assert_allclose(summed["b"], [0.0, 4 * f2], rtol=1e-6)
    np.testing.assert_allclose(st.per_example_losses[:3], 0.0)
    # Per-layer on the same batch: group "a" clips examples 2 and 3 (norm 2, 3), group "b" clips example 3.
    _, st2 = jaxdp.clipped_grad(loss_fn, {"a": 1.0, "b": 1.0}, method="vmap")(
        params, {"xa": xa, "xb": xb}, mask)
    assert float(st2.group_clip_fraction["a"]) == pytest.approx(2 / 3)
    assert float(st2.group_clip_fraction["b"]) == pytest.approx(1 / 3)
    assert float(st2.clip_fraction) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("C", [0.0, -1.0, float("nan"), {"layer1": 1.0, "layer2": 0.0}])
def test_bad_clip_norm(C):
    with pytest.raises(ValueError, match="l2_clip_norm"):
        jaxdp.clipped_grad(lambda p, b: b, C)


def test_bad_method_and_microbatch():
    with pytest.raises(ValueError, match="method"):
        jaxdp.clipped_grad(lambda p, b: b, 1.0, method="fast")
    with pytest.raises(ValueError, match="microbatch_size"):
        jaxdp.clipped_grad(lambda p, b: b, 1.0, microbatch_size=0)
    with pytest.raises(TypeError, match="callable"):
        jaxdp.clipped_grad(None, 1.0)


def test_mask_of_wrong_shape():
    params, loss_fn, batch, _ = mlp_model()
    grad_fn = jaxdp.clipped_grad(loss_fn, 1.0, method="vmap")
    for mask in (np.ones(B - 1, bool), np.ones((B, 1), bool)):
        with pytest.raises(ValueError, match="mask must have shape"):
            grad_fn(params, batch, mask)


def test_scalar_loss_is_an_error():
    params, loss_fn, batch, _ = mlp_model()
    grad_fn = jaxdp.clipped_grad(lambda p, b: jnp.mean(loss_fn(p, b)), 1.0, method="vmap")
    with pytest.raises(ValueError, match="per-example losses of shape"):
        grad_fn(params, batch)


def test_batch_leaves_with_different_leading_sizes():
    params, loss_fn, batch, _ = mlp_model()
    grad_fn = jaxdp.clipped_grad(loss_fn, 1.0, method="vmap")
    with pytest.raises(ValueError, match="same leading batch axis"):
        grad_fn(params, {"x": batch["x"], "y": batch["y"][:5]})


def test_flax_nnx_state_params():
    """NNX: params are an nnx.State from nnx.split; per-layer norms / trainable take an nnx.State prefix."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 4, rngs=rngs)
            self.b = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

    def loss_fn(p, batch):
        return _xent(nnx.merge(graphdef, p)(batch["x"]), batch["y"])

    batch = {"x": jnp.logspace(-2, 1, B)[:, None] * jax.random.normal(jax.random.key(6), (B, 3)),
             "y": jnp.arange(B) % 3}
    grads = per_example_grads(loss_fn, params, batch)
    C = _clip_norm_between([_flat_norm(g) for g in grads])
    ref, _ = reference_sum(loss_fn, params, batch, C, grads=grads)
    summed, stats = jaxdp.clipped_grad(loss_fn, C, method="vmap")(params, batch)
    assert_trees_close(summed, ref)
    assert "a/kernel/value" in stats.layer_norm_mean
    _, st = jaxdp.clipped_grad(loss_fn, nnx.State({"a": C, "b": C}), method="vmap")(params, batch)
    assert set(st.group_clip_fraction) == {"a", "b"}
    frozen, _ = jaxdp.clipped_grad(loss_fn, C, method="vmap", trainable=nnx.State({"a": False, "b": True}))(
        params, batch)
    for leaf in jax.tree_util.tree_leaves(frozen["a"]):
        np.testing.assert_array_equal(leaf, 0.0)
