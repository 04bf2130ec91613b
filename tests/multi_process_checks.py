"""Multi-process checks of jaxdp under ``jax.distributed``; one run writes one JSON file per process.

Started by ``tests/test_multi_process.py``, either as ONE process with 4 forced CPU devices (the reference) or
as 2 processes x 2 CPU devices through ``jaxdp launch`` (gloo collectives, coordinator on 127.0.0.1):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python tests/multi_process_checks.py train OUT
    python -m jaxdp launch --local-processes 2 --devices-per-process 2 -- \
        python tests/multi_process_checks.py train OUT

Modes: ``train`` (private steps of an MLP through PrivacyEngine until the target epsilon stops it after 20),
``noise`` (zero gradients, SGD(lr=1): the update is the noise alone; then the negative control, where each
process adds its own noise to its part of the sum -- the mistake the library must not make), ``kill`` (as
``train``, but process 1 kills itself with SIGKILL at step 5).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

from jaxdp import distributed as dist

dist.initialize_from_env()  # before any other JAX call; a no-op without JAXDP_COORDINATOR etc.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxdp  # noqa: E402
from jaxdp.engine import PrivacyBudgetExhausted  # noqa: E402

N, BATCH, STEPS, SEED, DELTA = 512, 48, 20, 3, 1e-5  # one padded shape (64) in all 20 steps: one compile


def data():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(N, 10)).astype(np.float32), "y": rng.integers(0, 3, N).astype(np.int32)}


def init_params():
    k1, k2 = jax.random.split(jax.random.key(1))
    return {"l1": {"w": jax.random.normal(k1, (10, 16)) * 0.3, "b": jnp.zeros(16)},
            "l2": {"w": jax.random.normal(k2, (16, 3)) * 0.3, "b": jnp.zeros(3)}}


def mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["l1"]["w"] + params["l1"]["b"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["l2"]["w"] + params["l2"]["b"], batch["y"])


def digest(tree) -> str:
    """SHA-256 of the bytes of every replica of every leaf this process holds, and whether replicas agree."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards] if isinstance(leaf, jax.Array) else [leaf]
        assert all(np.array_equal(shards[0], s) for s in shards), "replicas on this process's devices differ"
        h.update(np.ascontiguousarray(shards[0]).tobytes())
    return h.hexdigest()


def tolist(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(dist.host_local(a), np.float64).tolist(), tree)


def train(out: dict, kill: bool) -> None:
    """20 private steps with a target epsilon that allows exactly 20 (the 21st is refused on every process)."""
    from jaxdp import accounting
    d = data()
    target = accounting.events_epsilon(
        [{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": BATCH / N, "steps": STEPS}], DELTA,
        accountant="rdp") * (1 + 1e-9)
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    private = engine.make_private(loss_fn=mlp_loss, params=init_params(), optimizer=optax.sgd(0.5),
                                  dataset_size=N, batch_size=BATCH, noise_multiplier=1.0, l2_clip_norm=1.0,
                                  seed=SEED, method="vmap", target_epsilon=target, target_delta=DELTA)
    out["max_steps"] = private.max_steps
    state = private.init()
    hashes, eps, stopped, shapes = [], [], None, set()
    for t, (batch, mask) in enumerate(private.batches(d, STEPS + 5)):
        shapes.add(int(np.shape(mask)[0]))
        if t == 0:  # the global batch and the examples this process loaded for it
            gi, gm = private.sampler.sample(0)
            out["global_batch_step0"] = sorted(int(i) for i in gi[gm])
            out["loaded_rows_step0"] = int(np.asarray(batch["y"]).shape[0])
            x = np.asarray(batch["x"])[np.asarray(mask)]
            out["loaded_indices_step0"] = sorted(int(np.flatnonzero((d["x"] == row).all(1))[0]) for row in x)
        if kill and t == 5 and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            state, stats = private.step(state, batch, mask)
        except PrivacyBudgetExhausted:
            stopped = t
            break
        hashes.append(digest(state.params))
        eps.append(private.get_epsilon(DELTA))
    out["budget_stopped_at"] = stopped
    out["local_batch_shapes"] = sorted(shapes)
    out["param_hashes"] = hashes
    out["params"] = tolist(state.params)
    out["param_change"] = float(max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(
        jax.tree_util.tree_leaves(out["params"]), jax.tree_util.tree_leaves(tolist(init_params())))))
    out["epsilon"] = eps[-1]
    out["epsilons"] = eps
    out["steps"] = private.steps_taken
    out["num_examples_last"] = int(stats.num_examples)
    out["local_losses_shape"] = list(np.shape(stats.per_example_losses))


def noise(out: dict, every_process: bool) -> None:
    """Zero gradients and SGD(lr=1): params after step t minus before = -(noise_t) / E."""
    D, sigma, C = 2000, 1.3, 0.7
    params0 = {"w": jnp.zeros(D)}

    def zero_loss(p, batch):
        return 0.0 * jnp.sum(p["w"]) + 0.0 * batch["x"][:, 0]

    engine = jaxdp.PrivacyEngine(accountant="rdp")
    private = engine.make_private(loss_fn=zero_loss, params=params0, optimizer=optax.sgd(1.0), dataset_size=N,
                                  batch_size=BATCH, noise_multiplier=sigma, l2_clip_norm=C, seed=SEED,
                                  method="vmap")
    E = private.expected_batch_size
    out["expected_std"] = sigma * C / E
    d = {"x": np.ones((N, 1), np.float32)}
    state = private.init()
    updates, hashes = [], []
    prev = np.asarray(dist.host_local(state.params["w"]))
    if every_process:
        # the mistake: each process adds noise N(0, (sigma C)^2) to its own part of the sum, then the parts are
        # summed across processes -> std sqrt(#processes) * sigma C / E
        from jax.experimental import multihost_utils
        key = jax.random.fold_in(jax.random.key(SEED), jax.process_index())
        for t in range(STEPS):
            local = jax.random.normal(jax.random.fold_in(key, t), (D,)) * sigma * C  # + zero clipped sum
            total = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, D).sum(axis=0)
            updates.append(-total / E)
            hashes.append(hashlib.sha256(updates[-1].tobytes()).hexdigest())
    else:
        for batch, mask in private.batches(d, STEPS):
            state, _ = private.step(state, batch, mask)
            cur = np.asarray(dist.host_local(state.params["w"]))
            updates.append(cur - prev)
            prev = cur
            hashes.append(digest(state.params))
    u = np.stack(updates)
    out["measured_std"] = float(u.std())
    out["mean"] = float(u.mean())
    out["num_samples"] = int(u.size)
    out["update_hashes"] = hashes
    out["steps_differ"] = bool(not np.allclose(u[0], u[1]))


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    t0 = time.time()
    out = {"mode": mode, "process_index": jax.process_index(), "process_count": jax.process_count(),
           "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
           "jaxdp_device_counts": [dist.local_device_count(), dist.device_count()]}
    if mode in ("train", "kill"):
        train(out, kill=mode == "kill")
        # what DPTrainer uses to give every process the run id process 0 settled (run.json, --fresh)
        out["broadcast"] = dist.broadcast_from_main({"run_id": f"run-of-process-{jax.process_index()}", "n": [1]})
    elif mode == "noise":  # jaxdp's step, then the negative control, in the same processes
        out["jaxdp"], out["every_process"] = {}, {}
        noise(out["jaxdp"], every_process=False)
        noise(out["every_process"], every_process=True)
    else:
        raise SystemExit(f"unknown mode {mode}")
    out["seconds"] = time.time() - t0
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"proc{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
