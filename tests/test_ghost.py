"""Ghost / auto clipping must equal vmap clipping (1e-5): the privacy rule for method="auto"."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxdp
from jaxdp import ghost

TOL = 1e-5


def _init(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return {n: 0.5 * jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys)}


def _assert_same(loss_fn, params, batch, C=0.7, mask=None, methods=("ghost", "auto"), **kw):
    ref, rst = jax.jit(jaxdp.clipped_grad(loss_fn, C, method="vmap", **kw))(params, batch, mask)
    for m in methods:
        got, gst = jax.jit(jaxdp.clipped_grad(loss_fn, C, method=m, **kw))(params, batch, mask)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL, err_msg=m)
        np.testing.assert_allclose(gst.per_example_norms, rst.per_example_norms, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(gst.per_example_losses, rst.per_example_losses, rtol=TOL, atol=TOL)
        assert int(gst.num_nonfinite) == int(rst.num_nonfinite)
    return ref, rst


def _mlp_loss(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    o = h @ p["w2"] + p["b2"]
    return -jax.nn.log_softmax(o)[jnp.arange(o.shape[0]), b["y"]]


# Shape buckets: hypothesis draws the VALUES (seed, input scale) but every shape comes from a fixed list, so each
# shape is compiled once per run (later examples of a bucket, and later runs, read it from the persistent
# compilation cache, tests/conftest.py) instead of every example compiling a new shape. The buckets keep the edges
# the old integer ranges reached: size-1 dimensions, a batch of 1, and the largest sizes.
MLP_BUCKETS = [(1, 1, 2, 1), (9, 9, 5, 7), (4, 7, 3, 5), (8, 2, 2, 3)]   # (d, h, c, B): d, h <= 9, c 2..5, B <= 7
SEQ_BUCKETS = [(1, 1), (6, 6), (3, 2)]                                     # (T, d), each in 1..6


@pytest.mark.parametrize("d,h,c,B", MLP_BUCKETS)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.05, 5.0))
def test_mlp_random_sizes(d, h, c, B, seed, scale):
    k1, k2 = jax.random.split(jax.random.key(seed))
    p = _init(k1, {"w1": (d, h), "b1": (h,), "w2": (h, c), "b2": (c,)})
    b = {"x": 2 * scale * jax.random.normal(k2, (B, d)), "y": jnp.arange(B) % c}
    _assert_same(_mlp_loss, p, b, C=0.3)


def test_explain_mlp_uses_ghost_for_kernels_and_vmap_for_biases():
    p = _init(jax.random.key(0), {"w1": (4, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)})
    b = {"x": jnp.ones((2, 4)), "y": jnp.zeros((2,), int)}
    assert ghost.explain(_mlp_loss, p, b) == {"b1": "vmap", "b2": "vmap", "w1": "ghost", "w2": "ghost"}


@pytest.mark.parametrize("T,d", SEQ_BUCKETS)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.05, 5.0))
def test_sequences_dense_and_einsum(T, d, seed, scale):
    k1, k2 = jax.random.split(jax.random.key(seed))
    p = _init(k1, {"w": (d, 3), "u": (3, d, 2), "v": (2, 4)})

    def loss(p, b):
        h = jnp.tanh(b["x"] @ p["w"])                          # [B, T, 3]
        h = jnp.einsum("btk,kde->btde", h, p["u"]).sum(2)      # W on the right, several free dims
        h = jnp.einsum("ef,bte->bft", p["v"], h)               # W on the left
        return jnp.mean(h ** 2, axis=(1, 2))

    b = {"x": scale * jax.random.normal(k2, (3, T, d))}
    _assert_same(loss, p, b)


def test_auto_materialises_long_sequences_and_stays_exact():
    p = _init(jax.random.key(1), {"w": (2, 2), "o": (2, 1)})

    def loss(p, b):
        return jnp.sum(jnp.tanh(b["x"] @ p["w"]) @ p["o"], axis=(1, 2))

    b = {"x": jax.random.normal(jax.random.key(2), (3, 8, 2))}   # 2 T^2 = 128 > d p = 4
    assert ghost.explain(loss, p, b, "auto")["w"] == "materialise" or \
        ghost.explain(loss, p, b, "auto")["w"] == "vmap"
    assert ghost.explain(loss, p, b, "ghost")["w"] == "ghost"
    _assert_same(loss, p, b)


def test_auto_mixes_materialised_sequence_layer_with_ghost_dense_layer():
    """auto's cost rule: the sequence layer w (T 16, d = p = 4: T^2 (d + p) = 2048 > 2 |W| = 32) is
    materialised inside the vmapped backward pass while the T = 1 layer o keeps its ghost norm; with a mask,
    per-layer clipping and a NaN example, the result still equals vmap."""
    p = _init(jax.random.key(5), {"w": (4, 4), "o": (4, 3)})

    def loss(p, b):
        h = jnp.tanh(b["x"] @ p["w"]).mean(1)                  # [B, 4]
        return jnp.sum((h @ p["o"] - b["y"]) ** 2, -1)

    x = jax.random.normal(jax.random.key(6), (6, 16, 4)).at[2].set(jnp.nan)
    b = {"x": x, "y": jax.random.normal(jax.random.key(7), (6, 3))}
    plan = ghost.explain(loss, p, b, "auto")
    assert plan == {"o": "ghost", "w": "materialise"}, plan
    mask = jnp.array([True, True, True, False, True, True])
    _, st = _assert_same(loss, p, b, mask=mask)
    assert int(st.num_nonfinite) == 1
    _assert_same(loss, p, b, C={"w": 0.3, "o": 0.5}, methods=("auto",))


def test_embedding_tied_weights_and_positional_params():
    p = _init(jax.random.key(3), {"E": (11, 6), "w": (6, 6), "pos": (4, 6), "F": (11, 6), "o": (6, 3)})

    def loss(p, b):
        h = p["E"][b["t"]] + p["pos"] + jnp.take(p["F"], b["t"], axis=0)
        h = jnp.tanh(h @ p["w"])
        logits = h @ p["E"].T                                  # tied with the embedding
        return -jax.nn.log_softmax(logits)[..., 0].mean(-1) + jnp.sum(h.mean(1) @ p["o"], -1)

    b = {"t": jax.random.randint(jax.random.key(4), (5, 4), 0, 11)}
    plan = ghost.explain(loss, p, b, "ghost")
    assert plan["E"] == "ghost" and plan["F"] == "ghost" and plan["w"] == "ghost" and plan["pos"] == "vmap"
    _assert_same(loss, p, b)


@pytest.mark.parametrize("layout", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")])
def test_convolutions(layout):
    kshape = (3, 3, 2, 4) if layout[1] == "HWIO" else (4, 2, 3, 3)
    p = _init(jax.random.key(5), {"k": kshape, "kb": (4,), "o": (4 * 3 * 3, 2)})

    def loss(p, b):
        y = jax.lax.conv_general_dilated(b["x"], p["k"], (2, 2), "SAME", dimension_numbers=layout)
        y = jax.nn.relu(y + p["kb"].reshape((1, 1, 1, 4) if layout[0] == "NHWC" else (1, 4, 1, 1)))
        return jnp.sum((y.reshape(y.shape[0], -1) @ p["o"]) ** 2, -1)

    xs = (3, 6, 6, 2) if layout[0] == "NHWC" else (3, 2, 6, 6)
    b = {"x": jax.random.normal(jax.random.key(6), xs)}
    assert ghost.explain(loss, p, b, "ghost")["k"] == "ghost"
    _assert_same(loss, p, b)


def test_mask_nonfinite_frozen_per_layer_and_aux():
    p = _init(jax.random.key(7), {"w1": (4, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)})
    x = jax.random.normal(jax.random.key(8), (6, 4)).at[2, 0].set(jnp.nan)   # example 2 is non-finite
    b = {"x": x, "y": jnp.arange(6) % 3}
    mask = jnp.array([1, 1, 1, 0, 1, 1], bool)
    ref, st_ = _assert_same(_mlp_loss, p, b, mask=mask)
    assert int(st_.num_nonfinite) == 1
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(ref))
    _assert_same(_mlp_loss, p, b, mask=mask, trainable={"w1": False, "b1": False, "w2": True, "b2": True})
    _assert_same(_mlp_loss, p, b, C={"w1": 0.2, "b1": 0.3, "w2": 1.0, "b2": 0.1})

    def with_aux(p, b):
        losses = _mlp_loss(p, b)
        return losses, {"twice": 2 * losses}

    ref, _ = jax.jit(jaxdp.clipped_grad(with_aux, 0.5, method="vmap", has_aux=True))(p, b)
    got, gst = jax.jit(jaxdp.clipped_grad(with_aux, 0.5, method="ghost", has_aux=True))(p, b)
    np.testing.assert_allclose(gst.aux["twice"], 2 * gst.per_example_losses)
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, c, rtol=TOL, atol=TOL)


def test_unrecognised_use_falls_back_and_microbatches():
    p = _init(jax.random.key(9), {"w": (3, 3), "s": (3,)})

    def loss(p, b):
        w = p["w"] * 1.5 + jnp.sin(p["w"])                     # elementwise use: not a ghost site
        h = jnp.tanh(b["x"] @ w) * p["s"]
        return jax.lax.fori_loop(0, 2, lambda i, a: a + jnp.sum(h ** 2, -1), jnp.zeros(h.shape[0]))

    b = {"x": jax.random.normal(jax.random.key(10), (5, 3))}
    assert set(ghost.explain(loss, p, b, "ghost").values()) == {"vmap"}
    _assert_same(loss, p, b)
    _assert_same(_mlp_loss, _init(jax.random.key(0), {"w1": (4, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)}),
                 {"x": jnp.ones((5, 4)), "y": jnp.arange(5) % 3}, microbatch_size=2)


def test_flax_linen_and_nnx_models_need_no_changes():
    pytest.importorskip("flax")
    from flax import linen, nnx

    class Lin(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.Conv(3, (3, 3), strides=2)(x)
            x = linen.relu(x).reshape(x.shape[0], -1)
            x = linen.LayerNorm()(x)
            return linen.Dense(2)(x)

    x = jax.random.normal(jax.random.key(11), (4, 6, 6, 1))
    y = jnp.array([0, 1, 1, 0])
    m = Lin()
    params = m.init(jax.random.key(12), x)

    def lin_loss(p, b):
        return -jax.nn.log_softmax(m.apply(p, b["x"]))[jnp.arange(b["x"].shape[0]), b["y"]]

    plan = ghost.explain(lin_loss, params, {"x": x, "y": y}, "ghost")
    assert plan["params/Conv_0/kernel"] == "ghost" and plan["params/Dense_0/kernel"] == "ghost"
    _assert_same(lin_loss, params, {"x": x, "y": y})

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(7, 4, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=rngs)
            self.out = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, t):
            h = self.emb(t)
            h = self.attn(h)
            return self.out(h.mean(1))

    gdef, state = nnx.split(Tiny(nnx.Rngs(0)))
    t = jax.random.randint(jax.random.key(13), (3, 5), 0, 7)

    def nnx_loss(s, b):
        logits = nnx.merge(gdef, s)(b["t"])
        return -jax.nn.log_softmax(logits)[:, 0]

    nnx_params = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state
    if hasattr(nnx, "to_pure_dict"):
        def nnx_loss(s, b):  # noqa: F811
            st_ = nnx.State(state)
            nnx.replace_by_pure_dict(st_, s)
            logits = nnx.merge(gdef, st_)(b["t"])
            return -jax.nn.log_softmax(logits)[:, 0]
    _assert_same(nnx_loss, nnx_params, {"t": t})
