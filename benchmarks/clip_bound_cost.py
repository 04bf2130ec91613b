"""What the clipping bound costs: jaxdp ``auto`` with the rounding-error bound and exact fallback (the shipped
method) against the bare Gram formula it replaced (can under-estimate norms; kept unregistered for this
benchmark only), side by side in one process, with the non-private step as the reference.

Same models, inputs and timing protocol as ``benchmarks/step_speed.py`` (alternating blocks, median).

    python benchmarks/clip_bound_cost.py --models mlp,cnn,transformer --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_speed  # noqa: E402

from jaxdp import ghost, per_example  # noqa: E402


def rows_for(name, steps):
    make, B = step_speed.MODELS[name]
    params, loss, batch = make(jax.random.key(0), B)
    key = jax.random.key(1)
    fns = {}
    steps_fns = step_speed.jax_steps(params, loss, batch, ["auto"])
    fns["jax non-private"] = steps_fns["jax non-private"]
    fns["auto (bounded)"] = steps_fns["jaxdp auto"]
    per_example.register_backend("auto_unbounded", ghost._auto_unbounded_impl)   # NOT private: benchmark only
    try:
        fns["auto (bare Gram, pre-fix)"] = step_speed.jax_steps(
            params, loss, batch, ["auto_unbounded"])["jaxdp auto_unbounded"]
    finally:
        per_example.unregister_backend("auto_unbounded")
    compiled = {r: jax.jit(f).lower(params, batch, key).compile() for r, f in fns.items()}
    runners = {r: (lambda c=c: jax.block_until_ready(c(params, batch, key))) for r, c in compiled.items()}
    times = step_speed._time_rows(runners, steps)
    med = {r: float(np.median(t)) for r, t in times.items()}
    base = med["jax non-private"]
    return {"batch_size": B, "median_s": med,
            "ratio_vs_nonprivate": {r: m / base for r, m in med.items()},
            "bound_cost": med["auto (bounded)"] / med["auto (bare Gram, pre-fix)"] - 1.0,
            "plan": ghost.explain(loss, params, batch, "auto")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "clip_bound_cost.json"))
    a = ap.parse_args(argv)
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "device": jax.devices()[0].device_kind, "load_avg": os.getloadavg()},
           "versions": step_speed.versions(), "models": {}}
    print(f"{'model':12s} {'non-private':>12s} {'bounded':>12s} {'bare Gram':>12s} {'bound cost':>11s}")
    for name in a.models.split(","):
        r = rows_for(name, a.steps)
        res["models"][name] = r
        m = r["median_s"]
        print(f"{name:12s} {m['jax non-private'] * 1e3:10.2f}ms {m['auto (bounded)'] * 1e3:10.2f}ms "
              f"{m['auto (bare Gram, pre-fix)'] * 1e3:10.2f}ms {100 * r['bound_cost']:+10.1f}%")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
