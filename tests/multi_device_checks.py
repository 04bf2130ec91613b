"""Multi-device checks of jaxdp.distributed; run in a subprocess with forced host devices, prints one JSON object.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python tests/multi_device_checks.py

``tests/test_distributed.py`` starts it and asserts on the numbers (the rest of the suite keeps one device).
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp
from jaxdp import distributed as dist


def mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["l1"]["w"] + params["l1"]["b"])
    logits = h @ params["l2"]["w"] + params["l2"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {"l1": {"w": jax.random.normal(k1, (6, 8)) * 0.5, "b": jnp.zeros(8)},
            "l2": {"w": jax.random.normal(k2, (8, 3)) * 0.5, "b": jnp.zeros(3)}}


def data(n, seed):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32) * 3.0, "y": rng.integers(0, 3, n).astype(np.int32)}


def maxdiff(a, b):
    return float(max(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)))
                     for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


_STEPS: dict = {}


def run(mesh, batches, clip, *, sigma=1.0, E=12.0):
    """Train from the same params with the same noise key; steps are cached so each shape compiles once."""
    params = init_params(jax.random.key(1))
    tx = jaxdp.dpsgd(0.5, l2_clip_norm=clip, noise_multiplier=sigma, expected_batch_size=E, key=jax.random.key(0))
    opt_state = tx.init(params)
    cache_key = (id(mesh), repr(clip), sigma, E)
    if cache_key not in _STEPS:
        _STEPS[cache_key] = dist.make_private_step(mlp_loss, clip, tx, mesh=mesh)
    step = _STEPS[cache_key]
    all_stats = []
    for batch, mask in batches:
        params, opt_state, stats = step(params, opt_state, batch, mask)
        all_stats.append(stats)
    return params, all_stats


def stats_diff(s1, s4, perm=None):
    """Max abs difference over every field of ClipStats (per-example fields optionally permuted)."""
    d = {}
    for name in ("per_example_norms", "per_example_losses"):
        a, b = np.asarray(getattr(s1, name)), np.asarray(getattr(s4, name))
        if perm is not None:
            b = b[perm]
        d[name] = float(np.max(np.abs(a - b))) if a.size else 0.0
    for name in ("clip_fraction", "num_examples", "num_nonfinite"):
        d[name] = float(abs(float(getattr(s1, name)) - float(getattr(s4, name))))
    for name in ("layer_norm_mean", "layer_norm_max", "group_clip_fraction"):
        a, b = getattr(s1, name), getattr(s4, name)
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        d[name] = max(float(abs(a[k] - b[k])) for k in a)
    return d


def main() -> dict:
    out: dict = {"device_count": jax.device_count(), "platform": jax.devices()[0].platform}
    mesh1 = dist.data_mesh(jax.devices()[:1])
    mesh4 = dist.data_mesh()
    per_layer = {"l1": 0.6, "l2": 0.4}

    # 1. Same batch, same key: 4 devices == 1 device (flat clipping, masked rows, 2 steps).
    d = data(16, 0)
    mask = np.ones(16, bool)
    mask[[3, 9, 10]] = False
    p1, s1 = run(mesh1, [(d, mask), (d, ~mask)], 0.5)
    p4, s4 = run(mesh4, [(d, mask), (d, ~mask)], 0.5)
    out["equal_params"] = maxdiff(p1, p4)
    out["equal_stats"] = max(max(stats_diff(a, b).values()) for a, b in zip(s1, s4))
    out["equal_clip_fraction"] = float(s4[0].clip_fraction)
    out["equal_num_examples"] = [int(s.num_examples) for s in s4]
    out["equal_param_change"] = maxdiff(p4, init_params(jax.random.key(1)))

    # 2. Uneven batch (B = 10, not a multiple of 4: padded inside, stats cut back to B), with per-layer
    #    clipping (group clip fractions recombined from counts), 2 steps.
    d10 = data(10, 1)
    m10 = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], bool)
    p1, s1 = run(mesh1, [(d10, m10), (d10, ~m10)], per_layer)
    p4, s4 = run(mesh4, [(d10, m10), (d10, ~m10)], per_layer)
    out["uneven_params"] = maxdiff(p1, p4)
    out["uneven_param_change"] = maxdiff(p4, init_params(jax.random.key(1)))
    out["uneven_stats"] = max(max(stats_diff(a, b).values()) for a, b in zip(s1, s4))
    out["uneven_norms_shape"] = list(s4[0].per_example_norms.shape)
    out["uneven_group_clip_fraction"] = {k: float(v) for k, v in s4[0].group_clip_fraction.items()}
    out["uneven_num_examples"] = [int(s.num_examples) for s in s4]

    # 3. Empty batch (all padding): the update is the noise alone, the same on 1 and 4 devices.
    m0 = np.zeros(16, bool)
    p1, s1 = run(mesh1, [(d, m0)], 0.5)
    p4, s4 = run(mesh4, [(d, m0)], 0.5)
    out["empty_params"] = maxdiff(p1, p4)
    out["empty_param_change"] = maxdiff(p4, init_params(jax.random.key(1)))
    out["empty_num_examples"] = int(s4[0].num_examples)
    out["empty_clip_fraction"] = float(s4[0].clip_fraction)

    # 4. Real examples only on device 0 (devices 1..3 hold only padding), and the same batch laid out by
    #    shard_batch (real examples dealt out evenly): both equal the single-device update.
    m2 = np.zeros(16, bool)
    m2[:3] = True
    p1, s1 = run(mesh1, [(d, m2)], 0.5)
    p4, s4 = run(mesh4, [(d, m2)], 0.5)
    out["padding_devices_params"] = maxdiff(p1, p4)
    out["padding_devices_stats"] = max(stats_diff(s1[0], s4[0]).values())
    idx, msk = dist.shard_batch(np.arange(16), m2, 4)
    shuffled = {k: v[idx] for k, v in d.items()}
    p4s, s4s = run(mesh4, [(shuffled, msk)], 0.5)
    out["shard_batch_params"] = maxdiff(p1, p4s)
    out["shard_batch_real_per_device"] = msk.reshape(4, -1).sum(axis=1).tolist()

    # 5. Poisson sampler split over devices (ShardedSampler) vs the plain sampler on one device: 3 steps.
    ds = data(64, 2)
    sampler = jaxdp.PoissonSampler(64, 0.2, seed=3, pad_to_multiple=8)
    sharded = dist.ShardedSampler(jaxdp.PoissonSampler(64, 0.2, seed=3, pad_to_multiple=8), 4)
    b1 = [({k: v[i] for k, v in ds.items()}, m) for i, m in (sampler.sample(t) for t in range(3))]
    b4 = [({k: v[i] for k, v in ds.items()}, m) for i, m in (sharded.sample(t) for t in range(3))]
    p1, s1 = run(mesh1, b1, 0.5)
    p4, s4 = run(mesh4, b4, 0.5)
    out["poisson_params"] = maxdiff(p1, p4)
    out["poisson_counts"] = [[int(a.num_examples), int(b.num_examples)] for a, b in zip(s1, s4)]
    out["poisson_shard_sizes"] = [int(m.size) for _, m in b4]
    out["poisson_sampling"] = sharded.sampling
    out["poisson_sample_rate"] = sharded.sample_rate

    # 5b. The multi-host input path on one host: this process's rows -> global sharded arrays -> step.
    rows = dist.process_rows(16, mesh4)
    gb = dist.global_batch({k: v[rows] for k, v in d.items()}, 16, mesh4)
    gm = dist.global_batch(mask[rows], 16, mesh4)
    p1, _ = run(mesh1, [(d, mask)], 0.5)
    p4g, _ = run(mesh4, [(gb, gm)], 0.5)
    out["global_batch_rows"] = [rows.start, rows.stop]
    out["global_batch_sharded"] = len(gb["x"].sharding.device_set) == 4
    out["global_batch_params"] = maxdiff(p1, p4g)

    # 6. The clipped sum really is computed per device and reduced: shard_map + psum in the program.
    grad_fn = dist.data_parallel_clipped_grad(jaxdp.clipped_grad(mlp_loss, 0.5), mesh4)
    jaxpr = str(jax.make_jaxpr(grad_fn)(init_params(jax.random.key(1)), d, mask))
    out["jaxpr_has_shard_map_psum"] = "shard_map" in jaxpr and "psum" in jaxpr

    # 7. Noise std on 4 devices: zero gradients, so the SGD(lr=1) update is exactly -noise / E.
    #    Expect sigma * C / E; n independent per-device draws would give sqrt(4) = 2x that, a per-device std
    #    divided by n would give 1/2x. The noise must be one draw: identical on every device.
    sigma, C, E = 1.3, 0.7, 10.0

    def zero_loss(params, batch):
        return jnp.zeros(batch.shape[0]) + 0.0 * jnp.sum(params["w"])

    params = {"w": jnp.zeros((4, 5000))}
    tx = jaxdp.dpsgd(1.0, l2_clip_norm=C, noise_multiplier=sigma, expected_batch_size=E, key=jax.random.key(7))
    opt_state = tx.init(params)
    step = dist.make_private_step(zero_loss, C, tx, mesh=mesh4)
    xs = np.zeros((16, 2), np.float32)
    deltas, replicas_equal = [], True
    for _ in range(2):
        new, opt_state, _ = step(params, opt_state, xs, np.ones(16, bool))
        shards = [np.asarray(s.data) for s in new["w"].addressable_shards]
        replicas_equal &= all(np.array_equal(shards[0], s) for s in shards[1:]) and shards[0].shape == (4, 5000)
        deltas.append(np.asarray(new["w"]) - np.asarray(params["w"]))
        params = new
    allnoise = np.concatenate([x.ravel() for x in deltas])
    out["noise_expected_std"] = sigma * C / E
    out["noise_measured_std"] = float(np.std(allnoise))
    out["noise_mean"] = float(np.mean(allnoise))
    out["noise_num_samples"] = int(allnoise.size)
    out["noise_replicas_equal"] = bool(replicas_equal)
    out["noise_steps_differ"] = bool(not np.allclose(deltas[0], deltas[1]))

    # Negative control (shows the statistic has power): the WRONG design -- every device adds its own
    # N(0, (sigma C)^2) to its local sum before the psum -- measures sqrt(4) = 2x the std.
    from jax.sharding import PartitionSpec as P

    def wrong(key):
        def local(k):
            k = jax.random.fold_in(k, jax.lax.axis_index("data"))
            return jax.lax.psum(sigma * C * jax.random.normal(k, (4, 5000)), "data") / E
        return jax.shard_map(local, mesh=mesh4, in_specs=P(), out_specs=P(), check_vma=False)(key)

    out["noise_wrong_per_device_std"] = float(np.std(np.asarray(jax.jit(wrong)(jax.random.key(8)))))

    # 6. PrivacyEngine with no change to user code: on 4 devices it shards each Poisson batch and its steps
    #    equal a single-device reference step (plain jit on device 0) with the same grad_fn, noise and batches.
    import optax
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    dd = data(64, 5)
    private = engine.make_private(loss_fn=mlp_loss, params=init_params(jax.random.key(1)), optimizer=optax.sgd(0.5),
                                  dataset_size=64, batch_size=13, noise_multiplier=1.0, l2_clip_norm=0.5, seed=3)
    state = private.init()

    @jax.jit
    def reference(params, opt_state, batch, mask):
        summed, _ = private.grad_fn(params, batch, mask)
        updates, opt_state = private.tx.update(summed, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    ref_p, ref_o = state.params, state.opt_state
    order_diff, shapes_ok = 0.0, True
    for batch, m in private.batches(dd, 3):
        expected = np.asarray(mlp_loss(state.params, batch))  # per-example losses in the caller's order
        state, stats = private.step(state, batch, m)
        got = np.asarray(stats.per_example_losses)
        shapes_ok &= got.shape == m.shape
        order_diff = max(order_diff, float(np.max(np.abs(got[m] - expected[m]))))
        ref_p, ref_o = reference(ref_p, ref_o, batch, m)
    out["engine_stats_in_caller_order"] = order_diff
    out["engine_stats_shape_matches_mask"] = bool(shapes_ok)
    out["engine_num_devices"] = private.num_devices
    out["engine_vs_single_device"] = maxdiff(state.params, ref_p)
    out["engine_param_change"] = maxdiff(state.params, init_params(jax.random.key(1)))
    out["engine_steps_accounted"] = engine.accountant.steps
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
    sys.stdout.write("\n")
