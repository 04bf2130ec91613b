"""``jaxdp sweep``: train one config at several target epsilons plus the non-private baseline.

Each private run calibrates its noise multiplier to its target epsilon (``training.dp.noise_multiplier: null``)
for the config's epochs, sample rate and delta; every run has its own run directory under ``out_dir``
(``eps_<target>/`` and ``non_private/``), so a sweep that was interrupted resumes run by run. ``sweep.json``
collects the results and ``accuracy_vs_epsilon.png`` plots them (the privacy/utility trade-off).
"""
from __future__ import annotations

import json
import os
from typing import Any
from collections.abc import Sequence

from jaxdp._io import atomic_write
from jaxdp.train.summary import RunSummary

SUMMARY_KEYS = ("run_id", "status", "epsilon", "delta", "target_epsilon", "noise_multiplier", "max_grad_norm",
                "sample_rate", "steps", "accountant", "final_test_accuracy")


def _row(summary: dict, run_dir: str) -> dict:
    record = RunSummary.coerce(summary)   # the trainer's result: the run's record (metrics.json)
    row = {k: getattr(record, k) for k in SUMMARY_KEYS}
    row["run_dir"] = run_dir
    return row


def run_sweep(config: dict | str | os.PathLike, epsilons: Sequence[float], out_dir: str | os.PathLike | None = None,
              *, baseline: bool = True, progress: bool = False, log: bool = True, plot: bool = True) -> dict:
    """Train ``config`` at each target epsilon in ``epsilons`` (and non-privately when ``baseline``).

    Returns (and writes to ``out_dir/sweep.json``) ``{"config_hash", "dataset", "model", "delta", "epsilons",
    "runs": [one row per private run: target_epsilon, epsilon spent, noise_multiplier, final_test_accuracy,
    run_dir, ...], "non_private": row or None, "plot": path or None}``.
    """
    from jaxdp.train import DPTrainer
    from jaxdp.train.config import config_hash, load_config, validate_config

    eps_list = [float(e) for e in epsilons]
    if not eps_list or any(not (e > 0) for e in eps_list):
        raise ValueError(f"--epsilons must be one or more numbers > 0, got {list(epsilons)}")
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else validate_config(config)
    out = str(out_dir) if out_dir is not None else os.path.join(cfg["output"]["dir"], "sweep")
    os.makedirs(out, exist_ok=True)
    runs: list[dict] = []
    for eps in sorted(set(eps_list)):
        c = json.loads(json.dumps(cfg))
        c["training"]["dp"].update(enabled=True, epsilon=eps, noise_multiplier=None)
        d = os.path.join(out, f"eps_{eps:g}")
        if log:
            print(f"== target epsilon {eps:g} -> {d}", flush=True)
        runs.append(_row(DPTrainer(c, out_dir=d, progress=progress, log=log).train(), d))
    base = None
    if baseline:
        c = json.loads(json.dumps(cfg))
        c["training"]["dp"]["enabled"] = False
        d = os.path.join(out, "non_private")
        if log:
            print(f"== non-private baseline -> {d}", flush=True)
        base = _row(DPTrainer(c, out_dir=d, progress=progress, log=log).train(), d)
    result: dict[str, Any] = {
        "config_hash": config_hash(cfg), "dataset": cfg["data"]["name"],
        "model": cfg["model"]["module"] or cfg["model"]["name"],
        "delta": float(cfg["training"]["dp"]["delta"]), "accountant": cfg["training"]["accountant"],
        "epochs": cfg["training"]["epochs"], "epsilons": sorted(set(eps_list)), "runs": runs,
        "non_private": base, "plot": None}
    from jaxdp import distributed
    if plot and distributed.is_main_process():   # side effects on process 0 only, as for the runs' own records
        try:
            from jaxdp.report.plots import plot_accuracy_vs_epsilon
            result["plot"] = os.path.join(out, "accuracy_vs_epsilon.png")
            plot_accuracy_vs_epsilon(result, result["plot"])
        except ImportError as e:  # pragma: no cover - without the plots extra
            result["plot"] = None
            result["plot_error"] = str(e)
    if distributed.is_main_process():
        atomic_write(os.path.join(out, "sweep.json"), json.dumps(result, indent=1))
    result["json_path"] = os.path.join(out, "sweep.json")
    return result


def load_sweep(path: str | os.PathLike) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "sweep.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--sweep {path}: no such file (the sweep.json of `jaxdp sweep`)")
    with open(path) as f:
        return json.load(f)


__all__ = ["run_sweep", "load_sweep"]
