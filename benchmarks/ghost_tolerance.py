"""What the ghost certification tolerance costs and buys on a GPT-2 at T = 128, side by side in one process.

A ghost norm is used only when its float32 rounding bound pins it within ``tau`` of the exact norm; otherwise that
example's gradient for that layer is materialised (docs/clipping.md, "The tolerance"). The bound is ~8 T u
relative, so at the built-in ``tau = 2^-17`` EVERY example of a T = 128 layer falls back: the ghost step pays for
the Gram matrices AND the exact gradient. Rows (same model, batch and tokens; steps alternate between rows in
blocks, median; ``benchmarks/step_speed.py``'s protocol):

    non-private            gradient of the mean loss + SGD
    vmap                   per-example gradients of every leaf
    ghost tau=2^-17        method="ghost" (the built-in tolerance: all T > 1 examples fall back)
    ghost tau=2^-8         jaxdp.ghost.backend("ghost", rtol=2**-8)
    auto                   method="auto" (materialises within its 256 MiB budget; 2^-8 on the layers it cannot fit)

for the layers in a Python loop (``jaxdp.lm.GPT2``) and in ``nnx.scan`` + ``nnx.remat`` (``scale.py``'s
``_scanned_gpt2``). Columns: median step time, ratio to non-private, compile time, XLA peak memory
(``memory_analysis``), and for the DP rows the largest per-example norm ratio to vmap's (how much a certified
upper bound over-clips; 1 for an exact path).

    PYTHONPATH=. python benchmarks/ghost_tolerance.py --layers 4 --d-model 256 --heads 4 --vocab 8192 \\
        --batch 8 --seq-len 128 --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402
import step_speed  # noqa: E402

import jaxdp  # noqa: E402
from jaxdp import ghost, per_example  # noqa: E402

LOOSE = "bench_ghost_2m8"


def _rows(layout: str, a) -> dict:
    row = f"jax_nonprivate_{layout}"
    params, batch, loss, _ = scale._jax_problem(row, a, a.batch)
    key = jax.random.key(0)
    methods = {"vmap": "vmap", "ghost tau=2^-17": "ghost", "ghost tau=2^-8": LOOSE, "auto": "auto"}
    steps = {"non-private": scale._jax_step(row, loss, None, a.batch)}
    for name, m in methods.items():
        steps[name] = _dp_step(loss, m, a.batch)
    compiled, info = {}, {}
    for name, st in steps.items():
        t0 = time.perf_counter()
        compiled[name] = st.lower(params, batch, key).compile()
        info[name] = {"compile_s": time.perf_counter() - t0,
                      "xla_peak_mb": (scale._xla_bytes(compiled[name]) or 0) / 2 ** 20}
    # norms: how far each DP method's per-example norms lie above vmap's
    norms = {n: np.asarray(jax.jit(jaxdp.clipped_grad(loss, 1.0, method=m))(params, batch)[1].per_example_norms)
             for n, m in methods.items()}
    for n in methods:
        info[n]["max_norm_ratio_vs_vmap"] = float(np.max(norms[n] / norms["vmap"]))
        info[n]["min_norm_ratio_vs_vmap"] = float(np.min(norms[n] / norms["vmap"]))
    info["auto"]["plan"] = scale.plan_counts(ghost.explain(loss, params, batch, "auto"))
    state = {n: params for n in compiled}

    def runner(n):
        def run():
            state[n] = compiled[n](state[n], batch, key)
            jax.block_until_ready(state[n])
        return run
    times = step_speed._time_rows({n: runner(n) for n in compiled}, a.steps)
    base = float(np.median(times["non-private"]))
    for n, t in times.items():
        info[n]["median_s"] = float(np.median(t))
        info[n]["ratio_vs_nonprivate"] = float(np.median(t)) / base
        info[n]["n_timed"] = len(t)
    return info


def _dp_step(loss, method, bsz):
    """SGD on the noisy clipped sum (C = 1, sigma = 1), as scale.py's DP rows."""
    grad_fn = jaxdp.clipped_grad(loss, 1.0, method=method)

    @jax.jit
    def step(p, b, key):
        summed, _ = grad_fn(p, b)
        leaves, tdef = jax.tree.flatten(summed)
        keys = jax.random.split(key, len(leaves))
        noisy = [s + jax.random.normal(k, s.shape, s.dtype) for s, k in zip(leaves, keys)]
        return jax.tree.map(lambda x, g: x - 1e-3 / bsz * g, p, jax.tree.unflatten(tdef, noisy))
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scale.model_args(p, steps=6)
    p.add_argument("--layouts", default="loop,scan")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "ghost_tolerance.json"))
    a = p.parse_args(argv)
    per_example.register_backend(LOOSE, ghost.backend("ghost", rtol=2.0 ** -8), replace=True)
    res = {"command": "python " + " ".join(sys.argv), "config": vars(a),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "device": jax.devices()[0].device_kind, "loadavg_start": os.getloadavg()},
           "versions": {"jax": jax.__version__, "jaxdp": jaxdp.__version__}, "layouts": {}}
    for layout in a.layouts.split(","):
        res["layouts"][layout] = _rows(layout, a)
    res["machine"]["loadavg_end"] = os.getloadavg()
    lines = ["| layout | row | median s | / non-private | compile s | XLA peak MB | norm / vmap (max) | plan |",
             "|---|---|---|---|---|---|---|---|"]
    for layout, rows in res["layouts"].items():
        for n, v in rows.items():
            nr = v.get("max_norm_ratio_vs_vmap")
            lines.append(f"| {layout} | {n} | {v['median_s']:.3f} | {v['ratio_vs_nonprivate']:.2f} | "
                         f"{v['compile_s']:.1f} | {v['xla_peak_mb']:.0f} | "
                         f"{'-' if nr is None else f'{nr - 1:+.1e}'} | {v.get('plan', '-')} |")
    table = "\n".join(lines)
    print(table)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    out.with_suffix(".txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
