"""Regenerate README figures from the code, over several seeds, and write them as JSON with their range.

Sections (``--only`` picks some; each is independent):

* ``demo``: `jaxdp compare` on ``jaxdp/configs/digits_dp.yaml`` (the `make demo` job) with ``training.seed``
  pinned to each seed: DP and non-private test accuracy, epsilon spent, noise multiplier (README "What `make demo`
  does").
* ``audit``: the demo's DP model of each seed audited by `jaxdp audit --run DIR --attack loss_threshold` (AUC of
  the trained model, train vs test) and ``--attack one_run`` (empirical epsilon lower bound) (README "Audits").

Not covered (their own scripts, minutes to hours on CPU): LiRA with 16 shadow models (`tests/test_audit_slow.py`),
the language-model canary exposure (`examples/lm_canaries.py`), speed (`benchmarks/step_speed.py`).

    PYTHONPATH=. python benchmarks/readme_figures.py [--seeds 0 1 2] [--only demo audit] \
        [--json benchmarks/results/readme_figures.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdp.cli import main as jaxdp  # noqa: E402
from jaxdp.train.config import load_config  # noqa: E402

DEMO = os.path.join(ROOT, "jaxdp", "configs", "digits_dp.yaml")


def _range(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"n": 0}
    return {"min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals), "n": len(vals), "values": vals}


def _quiet(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = jaxdp(argv)
    return rc, out.getvalue()


def demo(seed: int, work: str) -> dict:
    import yaml
    cfg = load_config(DEMO)
    cfg["training"]["seed"] = seed
    path = os.path.join(work, f"demo_{seed}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    t0 = time.time()
    rc, out = _quiet(["compare", "--config", path, "--out", os.path.join(work, f"demo_{seed}"), "--no-progress",
                      "--json"])
    if rc != 0:
        raise RuntimeError(f"jaxdp compare failed for seed {seed} (exit {rc})")
    s = json.loads(out.strip().splitlines()[-1])
    return {"seed": seed, "dp_accuracy": s["dp_accuracy"], "non_private_accuracy": s["non_private_accuracy"],
            "epsilon": s["epsilon"], "noise_multiplier": s["noise_multiplier"], "seconds": time.time() - t0,
            "dp_dir": s["dp_dir"]}


def audit(run_dir: str) -> dict:
    res = {}
    for attack in ("loss_threshold", "one_run"):
        rc, out = _quiet(["audit", "--run", run_dir, "--attack", attack, "--json"])
        r = json.loads(out)
        if attack == "loss_threshold":
            res["trained_model_auc"] = (r.get("trained_model") or {}).get("auc")
        else:
            res["one_run_lower_bound"] = r.get("epsilon_lower_bound")
            res["one_run_passed"] = r.get("passed")
    return res


def run(seeds: list[int], only: list[str], work: str) -> dict:
    rows = []
    for seed in seeds:
        row = demo(seed, work)
        if "audit" in only:
            row.update(audit(row["dp_dir"]))
        row.pop("dp_dir")
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k not in ("seed", "one_run_passed")]
    return {"config": os.path.relpath(DEMO, ROOT), "seeds": seeds, "sections": only, "runs": rows,
            "range": {k: _range([r.get(k) for r in rows]) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", choices=("demo", "audit"), default=["demo", "audit"])
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "readme_figures.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = run(args.seeds, args.only, work)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    for k, r in result["range"].items():
        if r.get("n"):
            print(f"{k:<22} {r['min']:.4f} .. {r['max']:.4f} (mean {r['mean']:.4f}, {r['n']} seeds)")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
