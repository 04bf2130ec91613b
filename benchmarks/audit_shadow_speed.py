"""Benchmark: train 16 shadow models with one ``jax.vmap``-ed program vs 16 sequential trainings.

Both sides use the same recipe, data, keys and compiled single-model/vmapped programs of
:func:`jaxdp.audit.train_models` (``vectorize=True`` / ``False``); compile time is measured separately (first
call), then the median of ``--repeats`` timed runs, alternating the two sides. Writes JSON (``--out``).

    PYTHONPATH=. python benchmarks/audit_shadow_speed.py --repeats 3 --out benchmarks/results/audit_shadow_speed.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import time

import jax
import numpy as np

import jaxdp
from jaxdp.audit import ShadowConfig, balanced_masks, train_models
from jaxdp.data import load_digits


def _time(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/audit_shadow_speed.json")
    args = ap.parse_args()

    d = load_digits()
    x, y = d.x_train.reshape(len(d.x_train), -1)[: args.pool], d.y_train[: args.pool]
    masks = balanced_masks(args.models, args.pool, 0)
    recipes = {
        "non_private_adam_full_batch": ShadowConfig(hidden=(128,), steps=args.steps, learning_rate=0.01,
                                                    optimizer="adam", momentum=None,
                                                    expected_dataset_size=args.pool // 2),
        "dpsgd_q0.25": ShadowConfig(hidden=(128,), steps=args.steps, learning_rate=0.1, sample_rate=0.25,
                                    expected_dataset_size=args.pool // 2, dp=True, noise_multiplier=1.0),
    }
    rows = []
    for name, cfg in recipes.items():
        key = jax.random.key(0)
        vec = lambda: train_models(cfg, x, y, masks, key, vectorize=True)[1]        # noqa: B023, E731
        seq = lambda: train_models(cfg, x, y, masks, key, vectorize=False)[1]       # noqa: B023, E731
        compile_vec, compile_seq = _time(vec), _time(seq)                           # first calls include compile
        tv, ts = [], []
        for _ in range(args.repeats):
            tv.append(_time(vec))
            ts.append(_time(seq))
        row = dict(recipe=name, config=dataclasses.asdict(cfg), first_call_vmap_s=compile_vec,
                   first_call_sequential_s=compile_seq, median_vmap_s=statistics.median(tv),
                   median_sequential_s=statistics.median(ts), times_vmap_s=tv, times_sequential_s=ts)
        row["speedup_sequential_over_vmap"] = row["median_sequential_s"] / row["median_vmap_s"]
        rows.append(row)
        print(f"{name:30s} {args.models} models x {args.steps} steps: vmap {row['median_vmap_s']:.2f} s, "
              f"sequential {row['median_sequential_s']:.2f} s, ratio {row['speedup_sequential_over_vmap']:.2f}x "
              f"(first calls incl. compile: {compile_vec:.1f} s / {compile_seq:.1f} s)", flush=True)
    dev = jax.devices()[0]
    out = dict(benchmark="audit_shadow_speed",
               machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), device_kind=dev.device_kind,
                            backend=jax.default_backend()),
               versions=dict(jax=jax.__version__, jaxdp=jaxdp.__version__, numpy=np.__version__),
               args=vars(args), rows=rows,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               peak_memory_source="resource.getrusage ru_maxrss of this process (host RAM)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
