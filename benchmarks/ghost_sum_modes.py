"""Book-keeping vs a second weighted backward pass for the clipped sum (flat clipping), same process, alternating.

    python benchmarks/ghost_sum_modes.py [--steps 20]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from jaxdp import clipping, ghost, per_example  # noqa: E402
from step_speed import MODELS  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default="mlp,transformer")
    a = ap.parse_args()
    out = {}
    for name in a.models.split(","):
        make, B = MODELS[name]
        params, loss, batch = make(jax.random.key(0), B)
        fns = {}
        per_example.register_backend("ghost_second_pass", ghost._second_pass_impl)   # benchmark only
        try:
            for mode, method in (("bookkeeping", "ghost"), ("second_pass", "ghost_second_pass")):
                fns[mode] = jax.jit(clipping.clipped_grad(loss, 1.0, method=method))
                jax.block_until_ready(fns[mode](params, batch))
        finally:
            per_example.unregister_backend("ghost_second_pass")
        d = [float(abs(x - y).max()) for x, y in zip(jax.tree.leaves(fns["bookkeeping"](params, batch)[0]),
                                                     jax.tree.leaves(fns["second_pass"](params, batch)[0]))]
        ts = {m: [] for m in fns}
        for _ in range(a.steps):
            for m, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(params, batch))
                ts[m].append(time.perf_counter() - t0)
        med = {m: float(np.median(v)) for m, v in ts.items()}
        out[name] = {"median_s": med, "second_pass_over_bookkeeping": med["second_pass"] / med["bookkeeping"],
                     "max_abs_diff": max(d)}
        print(name, json.dumps(out[name]))
    Path(__file__).parent.joinpath("results").mkdir(exist_ok=True)
    Path(__file__).parent.joinpath("results", "ghost_sum_modes.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
