"""Tests of jaxdp.distributed: shard_batch / ShardedSampler on one device, and the multi-device private step
in a subprocess with 4 forced CPU devices (so the rest of the suite keeps its single device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdp
from jaxdp import distributed as dist

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# shard_batch / ShardedSampler (single process, no devices needed)


@pytest.mark.parametrize("n_real,padded,n", [(13, 16, 4), (0, 8, 4), (5, 8, 3), (16, 16, 4), (1, 8, 2),
                                             (9, 9, 1), (7, 8, 8)])
def test_shard_batch_even_split(n_real, padded, n):
    rng = np.random.default_rng(n_real)
    indices = np.zeros(padded, np.int32)
    indices[:n_real] = rng.choice(1000, n_real, replace=False)
    mask = np.arange(padded) < n_real
    idx, msk = dist.shard_batch(indices, mask, n)
    assert idx.shape == msk.shape and idx.size % n == 0
    per = idx.size // n
    assert per == max(1, -(-padded // n))
    counts = msk.reshape(n, per).sum(axis=1)
    assert counts.sum() == n_real and counts.max() - counts.min() <= (1 if n_real else 0)
    # the same examples, in their order; padding is index 0 and masked out
    np.testing.assert_array_equal(idx[msk], indices[:n_real])
    assert np.all(idx[~msk] == 0)
    # real examples sit at the front of each shard
    for row in msk.reshape(n, per):
        assert not np.any(row[np.argmin(row):]) or row.all()


def test_shard_batch_mask_anywhere_and_pad_multiple():
    indices = np.array([5, 0, 7, 0, 9, 11], np.int32)
    mask = np.array([1, 0, 1, 0, 1, 1], bool)
    idx, msk = dist.shard_batch(indices, mask, 2, pad_to_multiple=4)
    assert idx.shape == (8,)
    np.testing.assert_array_equal(idx, [5, 7, 0, 0, 9, 11, 0, 0])
    np.testing.assert_array_equal(msk, [1, 1, 0, 0, 1, 1, 0, 0])


def test_shard_batch_bad_input():
    with pytest.raises(ValueError, match="num_devices"):
        dist.shard_batch(np.arange(4), np.ones(4, bool), 0)
    with pytest.raises(ValueError, match="same length"):
        dist.shard_batch(np.arange(4), np.ones(3, bool), 2)


def test_sharded_sampler_keeps_sampling_and_accounting_fields():
    base = jaxdp.PoissonSampler(200, 0.05, seed=1, pad_to_multiple=8)
    sharded = dist.ShardedSampler(jaxdp.PoissonSampler(200, 0.05, seed=1, pad_to_multiple=8), 4)
    assert sharded.sampling == "poisson" and sharded.sample_rate == 0.05
    assert sharded.expected_batch_size == pytest.approx(10.0)
    for t in range(5):
        i1, m1 = base.sample(t)
        i4, m4 = sharded.sample(t)
        assert sorted(i1[m1]) == sorted(i4[m4])  # the same Poisson batch, only laid out over devices
        assert i4.size % 4 == 0
    epoch = list(sharded)
    assert len(epoch) == base.steps_per_epoch and sharded.step == base.steps_per_epoch


def test_one_device_mesh_is_the_plain_step():
    """On one device the step is the ordinary jitted single-device step (nothing sharded, same numbers)."""
    def loss(p, b):
        return jnp.sum((b["x"] @ p["w"] - b["y"]) ** 2, axis=1)

    params = {"w": jnp.ones((3, 2))}
    batch = {"x": jnp.arange(12.0).reshape(4, 3) / 10, "y": jnp.zeros((4, 2))}
    mask = np.array([1, 1, 0, 1], bool)
    tx = jaxdp.dpsgd(0.1, l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0, key=jax.random.key(0))
    step = dist.make_private_step(loss, 1.0, tx, mesh=dist.data_mesh(jax.devices()[:1]))
    new, state, stats = step(params, tx.init(params), batch, mask)
    summed, _ = jaxdp.clipped_grad(loss, 1.0)(params, batch, mask)
    upd, _ = tx.update(summed, tx.init(params), params)
    np.testing.assert_allclose(new["w"], params["w"] + upd["w"], rtol=1e-6)
    assert int(stats.num_examples) == 3
    with pytest.raises(ValueError, match="1-D mesh"):
        dist.private_update(jaxdp.clipped_grad(loss, 1.0), tx,
                            jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b")))


# ---------------------------------------------------------------------------------------------------------
# Multi-device checks (4 forced host devices, subprocess)


@pytest.fixture(scope="module")
def multi():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multi_device_checks.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_subprocess_has_four_devices(multi):
    assert multi["device_count"] == 4 and multi["platform"] == "cpu"
    assert multi["jaxpr_has_shard_map_psum"]  # the clipped sum is computed per device and psum-reduced


def test_multi_device_update_equals_single_device(multi):
    # Params move by ~0.1 per step; the two programs differ only in float summation order (psum of 4 partial
    # sums), and the noise is the same draw, so they agree to float32 rounding.
    assert multi["equal_param_change"] > 1e-2
    assert multi["equal_params"] < 1e-5
    assert multi["equal_stats"] < 1e-5  # norms, losses, counts, fractions, layer means / maxima
    assert multi["equal_num_examples"] == [13, 3]
    assert 0 < multi["equal_clip_fraction"] <= 1


def test_uneven_empty_and_padding_only_devices(multi):
    # B = 10 on 4 devices, per-layer clipping: same update and stats as one device
    assert multi["uneven_param_change"] > 1e-2
    assert multi["uneven_params"] < 1e-5 and multi["uneven_stats"] < 1e-5
    assert multi["uneven_norms_shape"] == [10]
    assert multi["uneven_num_examples"] == [8, 2]
    assert set(multi["uneven_group_clip_fraction"]) == {"l1", "l2"}
    # empty Poisson batch: the step still happens (noise only), identically on 1 and 4 devices
    assert multi["empty_params"] < 1e-6 and multi["empty_param_change"] > 1e-3
    assert multi["empty_num_examples"] == 0 and multi["empty_clip_fraction"] == 0.0
    # devices holding only padding contribute nothing
    assert multi["padding_devices_params"] < 1e-6 and multi["padding_devices_stats"] < 1e-6
    assert multi["shard_batch_params"] < 1e-6
    assert multi["shard_batch_real_per_device"] == [1, 1, 1, 0]


def test_global_batch_input_path(multi):
    assert multi["global_batch_rows"] == [0, 16] and multi["global_batch_sharded"]
    assert multi["global_batch_params"] < 1e-5


def test_poisson_sampler_split_over_devices(multi):
    assert multi["poisson_params"] < 1e-5
    assert all(a == b for a, b in multi["poisson_counts"])
    assert all(s % 4 == 0 for s in multi["poisson_shard_sizes"])
    assert multi["poisson_sampling"] == "poisson" and multi["poisson_sample_rate"] == 0.2


def test_noise_std_is_sigma_c_over_e(multi):
    # 40,000 i.i.d. coordinates: the sample std has relative standard error 1/sqrt(2 * 40000) = 0.35%, so a
    # 3% band is > 8 standard errors wide, yet excludes 2x (one draw per device, sqrt(4)) and 0.5x (per-device
    # std divided by the device count). The mean's standard error is 0.091 / 200 = 4.6e-4; bound 5 SE.
    expected = multi["noise_expected_std"]
    assert multi["noise_num_samples"] == 40000
    assert abs(multi["noise_measured_std"] / expected - 1) < 0.03
    assert abs(multi["noise_mean"]) < 5 * expected / np.sqrt(40000)
    assert multi["noise_replicas_equal"]  # one draw, the same on every device
    assert multi["noise_steps_differ"]    # a fresh draw each step
    # negative control: per-device noise gives 2x, which this test would catch
    assert abs(multi["noise_wrong_per_device_std"] / expected - 2) < 0.05


def test_privacy_engine_uses_all_devices_without_user_changes(multi):
    # make_private on a 4-device host: the engine shards every batch itself; 3 steps equal a single-device
    # reference with the same batches and noise key (float summation order only), and every step is accounted.
    assert multi["engine_num_devices"] == 4
    assert multi["engine_param_change"] > 1e-2
    assert multi["engine_vs_single_device"] < 1e-5
    assert multi["engine_steps_accounted"] == 3
    # per-example stats come back in the order (and length) of the batch the caller passed, not the layout
    assert multi["engine_stats_shape_matches_mask"] and multi["engine_stats_in_caller_order"] < 1e-5
