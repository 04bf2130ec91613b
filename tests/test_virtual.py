"""Virtual batches equal one big batch; noise is added once outside."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdp


def _loss(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    return jnp.sum((h @ p["w2"] - b["y"]) ** 2, -1)


@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_virtual_batches_equal_one_big_batch_for_any_chunk_size(method):
    k = jax.random.split(jax.random.key(0), 4)
    p = {"w1": jax.random.normal(k[0], (3, 4)), "b1": jnp.zeros(4), "w2": jax.random.normal(k[1], (4, 2))}
    b = {"x": jax.random.normal(k[2], (10, 3)), "y": jax.random.normal(k[3], (10, 2))}
    # example 8 is masked AND lies where the clamped last chunk overlaps the previous one (chunk 3: starts
    # 0, 3, 6, 7): it must stay masked, and 7 must be counted once.
    mask = (jnp.arange(10) != 4) & (jnp.arange(10) != 8)
    ref, rst = jax.jit(jaxdp.clipped_grad(_loss, 0.5, method=method))(p, b, mask)
    for chunk in (1, 3, 4, 10, 16):
        got, gst = jax.jit(jaxdp.virtual_batch_grad(_loss, 0.5, chunk, method=method))(p, b, mask)
        for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gst.per_example_norms, rst.per_example_norms, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gst.per_example_losses, rst.per_example_losses, rtol=1e-5, atol=1e-6)
        assert float(gst.clip_fraction) == pytest.approx(float(rst.clip_fraction))
        assert int(gst.num_examples) == 8

    # The noisy step (noise added once to the sum) is then identical for the same key.
    tx = jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=0.5, expected_batch_size=10.0, key=jax.random.key(1))
    s = tx.init(p)
    u1, _ = tx.update(ref, s)
    got, _ = jax.jit(jaxdp.virtual_batch_grad(_loss, 0.5, 3, method=method))(p, b, mask)
    u2, _ = tx.update(got, s)
    for a, c in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_virtual_batch_rejects_bad_chunk():
    with pytest.raises(ValueError, match="physical_batch_size"):
        jaxdp.virtual_batch_grad(_loss, 1.0, 0)


def test_virtual_batch_memory_is_one_chunk_for_activation_heavy_model():
    """XLA's memory analysis (deterministic, not a timing): a logical batch of 16 chunks needs no more temp
    memory than one chunk, plus 10% -- no copy of the logical batch, only one chunk's activations alive."""
    k = jax.random.split(jax.random.key(0), 2)
    p = {"w": jax.random.normal(k[0], (3, 3, 1, 8)) * 0.3, "v": jax.random.normal(k[1], (8 * 14 * 14, 2)) * 0.01}

    def loss(q, b):
        h = jax.lax.conv_general_dilated(b["x"], q["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h).reshape(h.shape[0], -1)
        return jnp.sum((h @ q["v"] - b["y"]) ** 2, -1)

    def temp(B, chunk):
        b = {"x": jnp.zeros((B, 14, 14, 1)), "y": jnp.zeros((B, 2))}
        f = jaxdp.virtual_batch_grad(loss, 1.0, chunk) if chunk else jaxdp.clipped_grad(loss, 1.0)
        return jax.jit(f).lower(p, b).compile().memory_analysis().temp_size_in_bytes

    one, virtual = temp(32, None), temp(16 * 32, 32)
    assert virtual <= 1.1 * one, (one, virtual)
