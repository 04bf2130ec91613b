"""Cost of BandMF and BLT noise against DP-SGD's: time of the noise transform's update and the size of its state.

The noise update for ``--params`` float32 parameters (one leaf), jitted, with ``jaxdp.add_noise`` (DP-SGD),
``jaxdp.bandmf_noise`` for several band counts and ``jaxdp.blt.blt_noise`` for several buffer counts (strategy
optimised for ``--steps`` steps). Rows alternate within each round (the machine is shared, so
ratios to the DP-SGD row of the same round are what to read); median over ``--rounds`` rounds after 2 warm-up
calls. State size is exact: BandMF keeps ``(b - 1) x |params|`` floats of noise history, BLT ``d x |params|`` floats of
buffers (plus the step counter and key), whatever the number of steps.
The clipped-gradient computation, identical for both, is not included: relative to a whole training step the
overhead is smaller than shown here.

    PYTHONPATH=. python benchmarks/bandmf_speed.py [--params 1000000] [--bands 2 4 8 16] [--buffers 1 2 4 8]
        [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdp
from jaxdp.blt import blt_noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--bands", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--buffers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=1000, help="horizon of the BandMF and BLT strategies")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bandmf_speed.json"))
    args = ap.parse_args()
    params = {"w": jnp.zeros((args.params,), jnp.float32)}
    grads = {"w": jnp.ones((args.params,), jnp.float32)}
    key = jax.random.key(0)
    txs = {"dpsgd (add_noise)": jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=256.0,
                                                key=key)}
    for b in args.bands:
        txs[f"bandmf b={b}"] = jaxdp.bandmf_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=256.0,
                                                  key=key, bands=b, steps=args.steps)
    for d in args.buffers:
        txs[f"blt d={d}"] = blt_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=256.0, key=key,
                                      steps=args.steps, buffers=d)
    fns, states, compile_s, state_bytes = {}, {}, {}, {}
    for name, tx in txs.items():
        st = tx.init(params)
        f = jax.jit(tx.update)
        t0 = time.perf_counter()
        u, st = f(grads, st)
        jax.block_until_ready(u)
        compile_s[name] = time.perf_counter() - t0
        u, st = f(grads, st)
        jax.block_until_ready(u)
        fns[name], states[name] = f, st
        state_bytes[name] = int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(st)
                                    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))
    times: dict = {name: [] for name in txs}
    for _ in range(args.rounds):
        for name in txs:   # alternate rows within a round
            t0 = time.perf_counter()
            u, states[name] = fns[name](grads, states[name])
            jax.block_until_ready(u)
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["dpsgd (add_noise)"]))
    rows = []
    print(f"noise update for {args.params:,} float32 params, median of {args.rounds} alternating rounds")
    print(f"{'mechanism':20} {'median ms':>10} {'x dpsgd':>8} {'state MB':>9} {'compile s':>9}")
    for name in txs:
        med = float(np.median(times[name]))
        rows.append({"mechanism": name, "median_s": med, "ratio_to_dpsgd": med / base,
                     "state_bytes": state_bytes[name], "compile_s": compile_s[name]})
        print(f"{name:20} {med * 1e3:10.2f} {med / base:8.2f} {state_bytes[name] / 1e6:9.1f} "
              f"{compile_s[name]:9.2f}")
    out = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "device": str(jax.devices()[0].device_kind),
                       "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "versions": {"jax": jax.__version__, "jaxdp": jaxdp.__version__},
           "config": vars(args), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
