"""Regenerate README figures from the code, over several seeds, and write them as JSON with their range.

Sections (``--only`` picks some; each is independent):

* ``demo``: `jaxdp compare` on ``jaxdp/configs/digits_dp.yaml`` (the `make demo` job) with ``training.seed``
  pinned to each seed: DP and non-private test accuracy, epsilon spent, noise multiplier (README "What `make demo`
  does").
* ``audit``: the demo's DP model of each seed audited by `jaxdp audit --run DIR --attack loss_threshold` (AUC of
  the trained model, train vs test) and ``--attack one_run`` (empirical epsilon lower bound) (README "Audits").

* ``lira``: the two shadow-model recipes of ``tests/test_audit_slow.py`` (a non-private MLP overfit on 200
  digits and a DP-SGD MLP at epsilon 3 on 500 digits; 16 shadow models each, every example IN for 8), attacked
  with the loss threshold and the four LiRA variants, and the Clopper-Pearson lower bound of the DP recipe
  (README "Audits"; ``benchmarks/results/readme_lira.json``).
* ``lm``: ``examples/lm_canaries.py`` (canary exposure of a tiny GPT-2 fine-tuned with LoRA, non-private and
  DP at epsilon 8) per seed (README "Language models"; ``benchmarks/results/readme_lm_canaries.json``).

Speed figures have their own scripts (``benchmarks/step_speed.py``, ``benchmarks/scale.py``).
:func:`readme_snippets` turns the JSON into the exact text the README states; ``tests/test_readme.py`` checks
that the README contains it, so a figure cannot drift from the run that produced it.

    PYTHONPATH=. python benchmarks/readme_figures.py [--seeds 0 1 2] [--only demo audit lira lm]
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
RESULTS = os.path.join(ROOT, "benchmarks", "results")
JSON = {"demo": os.path.join(RESULTS, "readme_figures.json"), "lira": os.path.join(RESULTS, "readme_lira.json"),
        "lm": os.path.join(RESULTS, "readme_lm_canaries.json")}
LIRA_ATTACKS = ("loss_threshold", "lira_online", "lira_offline", "lira_online_fixed_variance",
                "lira_offline_fixed_variance")


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


def lira(seed: int) -> dict:
    """Both shadow-model recipes of ``tests/test_audit_slow.py`` with PRNG key ``seed`` (16 models each)."""
    import jax

    from jaxdp import audit
    from jaxdp.audit import _accounting
    from jaxdp.data import load_digits

    d = load_digits()
    x, y = d.x_train.reshape(len(d.x_train), -1), d.y_train
    t0 = time.time()
    out: dict = {"seed": seed}
    recipes = {
        "non_private": (audit.ShadowConfig(hidden=(128,), steps=300, learning_rate=0.01, optimizer="adam",
                                           momentum=None, expected_dataset_size=100), 200),
    }
    q, steps, delta = 0.2, 150, 1e-5
    sigma = _accounting.calibrate_noise_multiplier(3.0, delta, q, steps)
    recipes["dp_epsilon_3"] = (audit.ShadowConfig(hidden=(32,), steps=steps, learning_rate=0.1, momentum=0.9,
                                                  sample_rate=q, expected_dataset_size=250, dp=True,
                                                  l2_clip_norm=1.0, noise_multiplier=sigma), 500)
    for name, (cfg, pool) in recipes.items():
        res = audit.shadow_membership_experiment(cfg, x[:pool], y[:pool], 16, jax.random.key(seed), seed=seed)
        row = {a: {"auc": res[a].auc, "auc_ci95": list(res[a].auc_ci), "tpr_at_0.1%_fpr": res[a].tpr_at_fpr[0.001]}
               for a in LIRA_ATTACKS}
        if name == "dp_epsilon_3":
            row["noise_multiplier"] = sigma
            b = audit.epsilon_lower_bound_from_scores(-res["_losses"][res["_masks"]], -res["_losses"][~res["_masks"]],
                                                      delta)
            row["clopper_pearson_lower_bound"] = b["epsilon_lower_bound"]
        out[name] = row
    out["seconds"] = time.time() - t0
    return out


def lm(seed: int) -> dict:
    """``examples/lm_canaries.py`` with ``seed``: mean exposure (bits) per insertion count and model."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("lm_canaries", os.path.join(ROOT, "examples", "lm_canaries.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run(seed=seed, verbose=False)
    return {"seed": seed, "epsilon": r["config"]["epsilon"], "seconds": r["seconds"],
            "exposure": {model: {group: v["exposure"] for group, v in row.items()}
                         for model, row in r["exposure"].items()}}


def _fmt_range(values: list[float], digits: int = 3, pct: bool = False) -> str:
    lo, hi = min(values), max(values)
    f = (lambda v: f"{100 * v:.{digits}f}%") if pct else (lambda v: f"{v:.{digits}f}")
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"


def readme_snippets(results: dict | None = None) -> dict[str, str]:
    """The exact README text of each figure, from the committed JSON (``results``: section -> JSON object)."""
    if results is None:
        results = {}
        for section, path in JSON.items():
            if os.path.exists(path):
                with open(path) as f:
                    results[section] = json.load(f)
    out: dict[str, str] = {}
    if "lira" in results:
        runs = results["lira"]["runs"]
        seeds = f"seeds {min(results['lira']['seeds'])}-{max(results['lira']['seeds'])}"
        npv = [r["non_private"] for r in runs]
        dp = [r["dp_epsilon_3"] for r in runs]
        lira_names = [a for a in LIRA_ATTACKS if a != "loss_threshold"]
        out["lira_non_private"] = (
            f"| non-private MLP, overfit (16 shadow models; {seeds}) | "
            f"{_fmt_range([r['loss_threshold']['auc'] for r in npv])} | "
            f"{_fmt_range([r['lira_online_fixed_variance']['auc'] for r in npv])} / "
            f"{_fmt_range([r['lira_online_fixed_variance']['tpr_at_0.1%_fpr'] for r in npv], 1, pct=True)} | - |")
        out["lira_dp"] = (
            f"| DP, epsilon 3 (16 shadow models; {seeds}) | "
            f"{_fmt_range([r['loss_threshold']['auc'] for r in dp])} | "
            f"{_fmt_range([r[a]['auc'] for r in dp for a in lira_names])} (all four LiRA variants) / "
            f"{_fmt_range([r['lira_online_fixed_variance']['tpr_at_0.1%_fpr'] for r in dp], 1, pct=True)} | "
            f"{_fmt_range([r['clopper_pearson_lower_bound'] for r in dp], 2)} (Clopper-Pearson, indicative) |")
    if "lm" in results:
        runs = results["lm"]["runs"]
        groups = ["inserted x1", "inserted x4", "inserted x16", "never inserted"]
        seeds = f"{len(runs)} seeds"
        rows = []
        for model, label in (("non-private LoRA", "non-private LoRA"), ("DP LoRA (eps=8)", "DP-LoRA, epsilon 8")):
            cells = [_fmt_range([r["exposure"][model][g] for r in runs], 2) for g in groups]
            rows.append(f"| {label} ({seeds}) | " + " | ".join(cells) + " |")
        out["lm_table"] = "\n".join(rows)
    return out


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
    ap.add_argument("--only", nargs="+", choices=("demo", "audit", "lira", "lm"), default=["demo", "audit"])
    ap.add_argument("--snippets", action="store_true", help="print the README text of the committed JSON and exit")
    args = ap.parse_args()
    if args.snippets:
        for name, text in readme_snippets().items():
            print(f"== {name}\n{text}")
        return
    if "demo" in args.only or "audit" in args.only:
        with tempfile.TemporaryDirectory() as work:
            result = run(args.seeds, [s for s in args.only if s in ("demo", "audit")], work)
        _write(JSON["demo"], result)
        for k, r in result["range"].items():
            if r.get("n"):
                print(f"{k:<22} {r['min']:.4f} .. {r['max']:.4f} (mean {r['mean']:.4f}, {r['n']} seeds)")
    for section, fn in (("lira", lira), ("lm", lm)):
        if section in args.only:
            rows = []
            for seed in args.seeds:      # the JSON is rewritten after every seed: a long run keeps what it did
                rows.append(fn(seed))
                print(json.dumps(rows[-1]), flush=True)
                _write(JSON[section], {"section": section, "seeds": [r["seed"] for r in rows], "runs": rows,
                                       "command": f"python benchmarks/readme_figures.py --only {section} "
                                                  f"--seeds {' '.join(map(str, args.seeds))}"})
    for name, text in readme_snippets().items():
        print(f"== {name}\n{text}")


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
