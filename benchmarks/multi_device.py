"""Benchmark: the data-parallel private step (jaxdp.distributed) on 1, 2 and 4 devices.

On a CPU machine the devices are forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=n``),
one subprocess per device count. They share the machine's cores, so this measures the OVERHEAD of sharding
(shard_map, psum, padding, placement), not a speed-up. On a machine with GPUs the script also runs the step
over every visible GPU (``--gpu``, automatic when ``jax.devices("gpu")`` is non-empty).

In each subprocess, three steps alternate on the same inputs (docs/privacy.md): the non-private jitted SGD
step on one device (reference), the private step on a one-device mesh, and the private step on the n-device
mesh. Median of ``--steps`` timed steps after 3 warm-up steps; compile time (first call) separately; peak RSS of
the process from ``resource.getrusage`` (ru_maxrss, includes JAX's own footprint).

Multi-process rows (``--processes 1 2 4``): the same private step as ONE job of P local processes joined by
``jax.distributed`` (started by ``jaxdp launch``, gloo CPU collectives over 127.0.0.1), ``--total-devices``
CPU devices in all (P processes x total/P devices), each process feeding only its rows of the global batch;
the overhead column is the step time over that of one process with the same total devices.

    PYTHONPATH=. python benchmarks/multi_device.py [--devices 1 2 4] [--processes 1 2 4] [--batch 256]
        [--steps 30] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(n: int, batch_size: int, steps: int, backend: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxdp
    from jaxdp import distributed as dist

    devices = jax.devices(backend)[:n]
    if len(devices) < n:
        raise SystemExit(f"only {len(devices)} {backend} devices, asked for {n}")

    def loss_fn(params, batch):
        h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    k1, k2 = jax.random.split(jax.random.key(0))
    params0 = {"w1": jax.random.normal(k1, (64, 128)) / 8, "b1": jnp.zeros(128),
               "w2": jax.random.normal(k2, (128, 10)) / 11, "b2": jnp.zeros(10)}
    rng = np.random.default_rng(0)
    sampler = jaxdp.PoissonSampler(60_000, batch_size / 60_000, seed=1)
    sharded = dist.ShardedSampler(sampler, n)
    idx, mask = sharded.sample(0)
    data = {"x": rng.normal(size=(60_000, 64)).astype(np.float32), "y": rng.integers(0, 10, 60_000).astype(np.int32)}
    batch = {k: v[idx] for k, v in data.items()}

    # reference: non-private jitted SGD step on one device (mean loss over the real examples)
    sgd = optax.sgd(0.1)

    @jax.jit
    def plain_step(params, state, b, m):
        g = jax.grad(lambda p: jnp.sum(loss_fn(p, b) * m) / jnp.maximum(jnp.sum(m), 1))(params)
        upd, state = sgd.update(g, state, params)
        return optax.apply_updates(params, upd), state, None

    def make(mesh):
        tx = jaxdp.dpsgd(0.1, l2_clip_norm=1.0, noise_multiplier=1.0,
                         expected_batch_size=sampler.expected_batch_size, key=jax.random.key(2))
        return dist.make_private_step(loss_fn, 1.0, tx, mesh=mesh, method="vmap"), tx.init(params0)

    one_step, one_state = make(dist.data_mesh(devices[:1]))
    n_step, n_state = make(dist.data_mesh(devices))
    runners = {"non_private_1dev": [plain_step, sgd.init(params0), params0],
               "private_1dev": [one_step, one_state, params0],
               f"private_{n}dev": [n_step, n_state, params0]}
    compile_s, times = {}, {k: [] for k in runners}
    for name, r in runners.items():
        t0 = time.perf_counter()
        out = r[0](r[2], r[1], batch, mask)
        jax.block_until_ready(out[:2])
        compile_s[name] = time.perf_counter() - t0
        r[2], r[1] = out[0], out[1]
    for i in range(3 + steps):  # alternate the three on the same inputs
        for name, r in runners.items():
            t0 = time.perf_counter()
            out = r[0](r[2], r[1], batch, mask)
            jax.block_until_ready(out[:2])
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
            r[2], r[1] = out[0], out[1]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "devices": n, "backend": backend, "device_kind": devices[0].device_kind,
        "padded_batch": int(mask.size), "real_examples": int(mask.sum()),
        "median_ms": med, "compile_s": compile_s,
        "ratio_private_ndev_over_private_1dev": med[f"private_{n}dev"] / med["private_1dev"],
        "ratio_private_ndev_over_non_private": med[f"private_{n}dev"] / med["non_private_1dev"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def mp_child(batch_size: int, steps: int, out_path: str) -> None:
    """One process of a multi-process job (started by ``jaxdp.launch``): time the private step over ALL
    processes' devices, each process feeding only its rows (``local_batch``); process 0 writes the row."""
    from jaxdp import distributed as dist
    dist.initialize_from_env()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxdp

    def loss_fn(params, batch):
        h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (64, 128)) / 8, "b1": jnp.zeros(128),
              "w2": jax.random.normal(k2, (128, 10)) / 11, "b2": jnp.zeros(10)}
    rng = np.random.default_rng(0)
    sampler = jaxdp.PoissonSampler(60_000, batch_size / 60_000, seed=1)
    data = {"x": rng.normal(size=(60_000, 64)).astype(np.float32), "y": rng.integers(0, 10, 60_000).astype(np.int32)}
    idx, mask = sampler.sample(0)
    batch, lmask = dist.local_batch(idx, mask, lambda i: {k: v[i] for k, v in data.items()})
    tx = jaxdp.dpsgd(0.1, l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=sampler.expected_batch_size,
                     key=jax.random.key(2))
    step = dist.make_private_step(loss_fn, 1.0, tx, method="vmap")
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    params, opt_state, _ = step(params, opt_state, batch, lmask)
    jax.block_until_ready((params, opt_state))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(3 + steps):
        t0 = time.perf_counter()
        params, opt_state, _ = step(params, opt_state, batch, lmask)
        jax.block_until_ready((params, opt_state))
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if jax.process_index() == 0:
        Path(out_path).write_text(json.dumps({
            "processes": jax.process_count(), "devices": jax.device_count(),
            "devices_per_process": jax.local_device_count(), "padded_batch": int(mask.size),
            "real_examples": int(mask.sum()), "median_ms": statistics.median(times) * 1e3, "compile_s": compile_s,
            "peak_rss_mib_process0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_multi_process(procs: int, total_devices: int, args) -> dict:
    """``procs`` local processes with ``total_devices / procs`` CPU devices each, through ``jaxdp launch``."""
    import tempfile
    if total_devices % procs:
        raise SystemExit(f"--total-devices {total_devices} is not a multiple of {procs} processes")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "jaxdp", "launch", "--local-processes", str(procs), "--devices-per-process",
               str(total_devices // procs), "--timeout", "900", "--", sys.executable, __file__, "--mp-child", out,
               "--batch", str(args.batch), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=960)
        if proc.returncode != 0:
            raise RuntimeError(f"{procs} processes failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())


def run_child(n: int, args, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if backend == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    cmd = [sys.executable, __file__, "--child", str(n), "--batch", str(args.batch), "--steps", str(args.steps),
           "--backend", backend]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child n={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=256, help="expected global (Poisson) batch size")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gpu", action="store_true", help="also run over all GPUs (automatic when present)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "multi_device.json"))
    ap.add_argument("--processes", type=int, nargs="*", default=[1, 2, 4],
                    help="multi-process rows: this many local processes (jaxdp launch) sharing --total-devices")
    ap.add_argument("--total-devices", type=int, default=4, help="CPU devices over all processes (multi-process rows)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mp-child", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.steps, args.backend)))
        return
    if args.mp_child:
        mp_child(args.batch, args.steps, args.mp_child)
        return

    import jax
    import jaxlib
    import optax

    rows = [run_child(n, args, "cpu") for n in args.devices]
    try:
        n_gpu = len(jax.devices("gpu"))
    except RuntimeError:
        n_gpu = 0
    if n_gpu or args.gpu:
        rows += [run_child(n, args, "gpu") for n in sorted({1, n_gpu}) if n <= n_gpu]

    print(f"{'backend':8} {'devices':>7} {'padded':>6} {'non-private ms':>15} {'private 1-dev ms':>17} "
          f"{'private n-dev ms':>17} {'n-dev/1-dev':>11} {'n-dev/non-priv':>14} {'compile n-dev s':>15}")
    for r in rows:
        n = r["devices"]
        m = r["median_ms"]
        print(f"{r['backend']:8} {n:7d} {r['padded_batch']:6d} {m['non_private_1dev']:15.3f} "
              f"{m['private_1dev']:17.3f} {m[f'private_{n}dev']:17.3f} "
              f"{r['ratio_private_ndev_over_private_1dev']:11.2f} {r['ratio_private_ndev_over_non_private']:14.2f} "
              f"{r['compile_s'][f'private_{n}dev']:15.2f}")
    mp_rows = [run_multi_process(p, args.total_devices, args) for p in args.processes]
    if mp_rows:
        base = next((r["median_ms"] for r in mp_rows if r["processes"] == 1), None)
        print(f"\nmulti-process (jax.distributed, gloo), {args.total_devices} CPU devices in all:")
        print(f"{'processes':>9} {'dev/proc':>8} {'padded':>6} {'step ms':>9} {'vs 1 process':>12} {'compile s':>9}")
        for r in mp_rows:
            r["overhead_vs_one_process"] = None if base is None else r["median_ms"] / base
            ratio = "" if base is None else f"{r['overhead_vs_one_process']:.2f}"
            print(f"{r['processes']:9d} {r['devices_per_process']:8d} {r['padded_batch']:6d} {r['median_ms']:9.3f} "
                  f"{ratio:>12} {r['compile_s']:9.2f}")
    result = {
        "benchmark": "multi_device",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "gpus": n_gpu},
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__},
        "config": {"model": "MLP 64-128-10", "dataset_size": 60000, "expected_batch": args.batch,
                   "steps": args.steps, "warmup": 3, "clip": 1.0, "noise_multiplier": 1.0, "method": "vmap",
                   "cpu_devices": "forced host devices sharing the cores (overhead, not speed-up)"},
        "rows": rows,
        "multi_process_rows": mp_rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
