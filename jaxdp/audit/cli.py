"""``jaxdp audit``: run a privacy audit of a training recipe and write JSON (and a log-log ROC PNG).

    jaxdp audit --config FILE --attack loss_threshold|lira|one_run [--out DIR] [--json]
    jaxdp audit --run RUN_DIR --attack one_run          # RUN_DIR written by `jaxdp train`

The config is either a ``jaxdp train`` YAML (sections ``data``, ``model``, ``training`` with ``training.dp``) or
the small audit YAML documented in ``docs/audit.md``; both are read defensively (missing keys take defaults).
The audit re-trains the recipe at audit scale (a pool of ``audit.pool_size`` examples) with the SAME sample
rate, steps, clip norm and noise, so the claimed epsilon applies to the audited trainings. Exit status 1 when
the empirical lower bound exceeds the claimed epsilon (the implementation broke its promise).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Any

import numpy as np

ATTACKS = ("loss_threshold", "lira", "one_run")


def _get(d: Any, path: str, default=None):
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            return default
        cur = cur[part]
    return cur


def _first(cfg: dict, paths, default=None):
    for p in paths:
        v = _get(cfg, p)
        if v is not None:
            return v
    return default


def load_config(path: str) -> dict:
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a YAML mapping with sections data/model/training (see docs/audit.md)")
    return cfg


def _run_dir_config(run_dir: str) -> tuple[dict, dict]:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run {run_dir}: no such directory (give the run directory of `jaxdp train`)")
    candidates = [os.path.join(run_dir, n) for n in ("config.yaml", "config.yml")] + sorted(
        glob.glob(os.path.join(run_dir, "*.yaml")) + glob.glob(os.path.join(run_dir, "*.yml")))
    cfg_path = next((p for p in candidates if os.path.isfile(p)), None)
    if cfg_path is None:
        raise FileNotFoundError(f"--run {run_dir}: no config YAML in the run directory")
    metrics = {}
    mpath = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(mpath):
        with open(mpath) as f:
            metrics = json.load(f)
    return load_config(cfg_path), metrics


def recipe_from_config(cfg: dict, attack: str, metrics: dict | None = None, overrides: dict | None = None):
    """Turn a trainer/audit config into ``(ShadowConfig, x, y, info)`` for the audit (keys: docs/audit.md)."""
    from jaxdp.audit import _accounting
    from jaxdp.audit.shadow import ShadowConfig
    from jaxdp.data import load_dataset

    metrics = metrics or {}
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    dataset_name = _first(cfg, ["data.dataset", "data.name", "data.path", "dataset"], None)
    if dataset_name is None and isinstance(cfg.get("data"), str):
        dataset_name = cfg["data"]
    data_options = _first(cfg, ["data.options"], {}) or {}
    data = load_dataset(dataset_name or "digits", **data_options)
    x_all = data.x_train.reshape(len(data.x_train), -1)
    y_all = data.y_train
    default_pool = 200 if attack in ("lira", "loss_threshold") else 300
    pool = int(o.get("pool_size", _first(cfg, ["audit.pool_size"], default_pool)))
    pool = min(pool, len(y_all))
    rng = np.random.default_rng(int(_first(cfg, ["audit.data_seed"], 0)))
    idx = np.sort(rng.choice(len(y_all), pool, replace=False))
    x, y = x_all[idx], y_all[idx]

    model = cfg.get("model", "mlp")
    name = model if isinstance(model, str) else _first(model, ["name", "type", "arch", "kind"], "mlp")
    name = str(name).lower()
    notes = []
    if name in ("logreg", "logistic_regression", "linear", "logistic"):
        mname = "logreg"
    else:
        mname = "mlp"
        if name not in ("mlp", "dense"):
            notes.append(f"config model {name!r}: the audit trainer uses an MLP on flattened inputs instead")
    hidden = _first(model if isinstance(model, dict) else {},
                    [f"{pre}{k}" for pre in ("options.", "") for k in ("hidden", "hidden_sizes", "features", "widths",
                                                                         "width")], [128])
    hidden = tuple(int(h) for h in (hidden if isinstance(hidden, (list, tuple)) else [hidden]))

    t = lambda k: [f"training.{k}", k]  # noqa: E731  (keys may sit in `training` or at the top level)
    dp_enabled = bool(_first(cfg, ["training.dp.enabled", "dp.enabled"], False))
    batch_size = float(_first(cfg, t("batch_size"), 64))
    q = float(o.get("sample_rate", _first(cfg, ["audit.sample_rate"], metrics.get("sample_rate") or
                                          min(1.0, batch_size / len(y_all)))))
    steps = _first(cfg, t("steps"), metrics.get("steps") or None)
    epochs = _first(cfg, t("epochs"), None)
    if steps is None:
        steps = math.ceil(float(epochs) / q - 1e-9) if epochs is not None else 300
    steps = int(o.get("steps", steps))
    opt = _first(cfg, ["optimizer", "training.optimizer"], "adam" if not dp_enabled else "sgd")
    opt_name = str(opt if isinstance(opt, str) else _get(opt, "name", "sgd")).lower()
    lr = float(_first(cfg, ["optimizer.learning_rate", "optimizer.lr", "training.optimizer.learning_rate",
                            "training.optimizer.lr", "training.learning_rate", "learning_rate", "training.lr"],
                      0.01 if opt_name == "adam" else 0.1))
    # As in `jaxdp train`: "sgd" is plain SGD, "momentum" is SGD with optimizer.momentum (default 0.9).
    momentum = None
    if opt_name == "momentum":
        momentum = _first(cfg, ["optimizer.momentum", "training.optimizer.momentum"], 0.9)
    seed = int(o.get("seed", _first(cfg, t("seed"), 0) or 0))  # a run whose seed was drawn from the OS: 0

    delta = float(metrics.get("delta") or _first(cfg, ["training.dp.delta", "dp.delta"], 1e-5))
    # A `jaxdp train` run's metrics.json states what the run used and claimed: it wins over the config.
    claimed = metrics.get("epsilon") if metrics.get("epsilon") is not None else _first(
        cfg, ["training.dp.epsilon", "dp.epsilon", "training.dp.target_epsilon"], None)
    sigma = metrics.get("noise_multiplier") if metrics.get("noise_multiplier") is not None else _first(
        cfg, ["training.dp.noise_multiplier", "dp.noise_multiplier"], None)
    clip = float(_first(cfg, ["training.dp.max_grad_norm", "training.dp.l2_clip_norm", "dp.max_grad_norm"], 1.0))
    if dp_enabled:
        if sigma is None and claimed is None:
            raise ValueError("training.dp needs epsilon or noise_multiplier when enabled")
        if sigma is None:
            sigma = _accounting.calibrate_noise_multiplier(float(claimed), delta, q, steps)
        sigma = float(sigma)
        acc_eps = _accounting.compute_epsilon(sigma, q, steps, delta)
        claimed = float(claimed) if claimed is not None else acc_eps
    else:
        sigma, acc_eps, claimed = 0.0, math.inf, math.inf
    included = pool // 2 if attack in ("lira", "loss_threshold") else pool
    sc = ShadowConfig(model=mname, hidden=hidden, num_classes=int(max(data.num_classes, y.max() + 1)),
                      steps=steps, learning_rate=lr, optimizer="adam" if opt_name == "adam" else "sgd",
                      momentum=None if opt_name == "adam" else (float(momentum) if momentum else None),
                      sample_rate=q, expected_dataset_size=max(1, included), dp=dp_enabled, l2_clip_norm=clip,
                      noise_multiplier=sigma)
    info = dict(dataset=data.name, pool_size=pool, model=mname, hidden=list(hidden), steps=steps, sample_rate=q,
                optimizer=sc.optimizer, learning_rate=lr, dp=dp_enabled, noise_multiplier=sigma,
                max_grad_norm=clip, delta=delta, claimed_epsilon=claimed, accountant_epsilon=acc_eps,
                accountant=_accounting.accountant_name(), seed=seed, notes=notes,
                run_metrics={k: metrics[k] for k in ("epsilon", "delta", "noise_multiplier") if k in metrics})
    return sc, x, y, info


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    return v


def run_audit(cfg: dict, attack: str, out_dir: str | None = None, metrics: dict | None = None,
              overrides: dict | None = None) -> dict:
    """Run ``attack`` on the recipe in ``cfg``; returns the JSON-ready result (and writes it under out_dir)."""
    import jax

    from jaxdp.audit import bounds, lira, one_run, plot

    if attack not in ATTACKS:
        raise ValueError(f"--attack must be one of {ATTACKS}, got {attack!r}")
    o = overrides or {}
    sc, x, y, info = recipe_from_config(cfg, attack, metrics, o)
    key = jax.random.key(info["seed"])
    alpha = float(_first(cfg, ["audit.alpha"], 0.05))
    result: dict = dict(attack=attack, recipe=info)
    png = None
    if attack == "one_run":
        r = one_run.one_run_audit(
            sc, x, y, claimed_epsilon=info["claimed_epsilon"], delta=info["delta"], key=key, seed=info["seed"],
            canary=str(o.get("canary") or _first(cfg, ["audit.canary"], "gradient")),
            num_canaries=o.get("num_canaries") or _first(cfg, ["audit.num_canaries"], None),
            coordinates=str(o.get("coordinates") or _first(cfg, ["audit.coordinates"], "data_free")),
            k_pos=_first(cfg, ["audit.k"], None), k_neg=_first(cfg, ["audit.k"], None),
            beta=float(_first(cfg, ["audit.beta"], 0.05)), accountant_epsilon=info["accountant_epsilon"])
        result.update(r.to_dict())
        result["summary"] = r.summary()
        lb, passed = r.epsilon_lower_bound, r.passed
    else:
        m = int(o.get("num_models") or _first(cfg, ["audit.num_shadow", "audit.num_models"],
                                              16 if attack == "lira" else 4))
        names = (("loss_threshold",) if attack == "loss_threshold" else
                 ("loss_threshold", "lira_online", "lira_offline", "lira_online_fixed_variance",
                  "lira_offline_fixed_variance"))
        res = lira.shadow_membership_experiment(sc, x, y, m, key, seed=info["seed"], attacks=names)
        attacks = {n: res[n] for n in names}
        result["attacks"] = {n: a.to_dict(include_roc=True) for n, a in attacks.items()}
        result["num_models"] = m
        best = max(attacks.values(), key=lambda a: a.auc)
        mem = res["_losses"][res["_masks"]] if best.attack == "loss_threshold" else None
        if mem is not None:
            sb = bounds.epsilon_lower_bound_from_scores(-mem, -res["_losses"][~res["_masks"]], info["delta"], alpha)
        else:
            stat, masks = res["_stat"], res["_masks"]
            mode = best.attack.split("_")[1]
            (mi, vi), (mo, vo) = lira._loo_fits(stat, masks, best.attack.endswith("fixed_variance"))
            sc_ = lira.lira_scores(stat, mi, vi, mo, vo, mode)
            sb = bounds.epsilon_lower_bound_from_scores(sc_[masks], sc_[~masks], info["delta"], alpha)
        # Scores of examples pooled over models are not independent trials: the Clopper-Pearson bound is
        # indicative here; the one-run audit is the rigorous check.
        sb["attack"] = best.attack
        lb = sb["epsilon_lower_bound"]
        passed = not lb > info["claimed_epsilon"]
        result["epsilon_lower_bound"] = sb
        result["claimed_epsilon"] = info["claimed_epsilon"]
        result["passed"] = passed
        result["summary"] = "\n".join(a.summary() for a in attacks.values()) + (
            f"\nempirical epsilon lower bound ({best.attack}, Clopper-Pearson, {sb['correction']}): {lb:.4f} "
            f"vs claimed epsilon {info['claimed_epsilon']:.4f}: {'PASS' if passed else 'FAIL'}")
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            try:
                png = plot.plot_roc(list(attacks.values()), os.path.join(out_dir, f"roc_{attack}.png"),
                                    title=f"{attack} on {info['dataset']} "
                                          f"(eps {info['claimed_epsilon']:.3g})")
            except ImportError as e:
                result["plot_error"] = str(e)
    result["passed"] = passed
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if png:
            result["roc_png"] = png
        path = os.path.join(out_dir, f"audit_{attack}.json")
        with open(path, "w") as f:
            json.dump(_jsonable(result), f, indent=2)
        result["json_path"] = path
    return _jsonable(result)


def audit_trained_model(run_dir: str) -> dict:
    """Loss-threshold membership inference on the model a `jaxdp train` run produced (its checkpoint):
    members = its training set, non-members = the held-out test set. Returns AUC (DeLong CI), advantage,
    TPR at low FPR and a summary line."""
    from jaxdp.audit import metrics as audit_metrics
    from jaxdp.train import DPTrainer

    trainer = DPTrainer.load(run_dir)
    r = audit_metrics.loss_threshold_attack(trainer.per_example_losses("train"), trainer.per_example_losses("test"))
    d = _jsonable(r.to_dict(include_roc=False))
    d["members"], d["nonmembers"] = trainer.n, len(trainer.dataset.y_test)
    d["summary"] = f"trained model ({run_dir}), train vs test: " + r.summary()
    return d


def _handler(args: argparse.Namespace) -> int:
    if not args.config and not args.run:
        raise ValueError("give --config FILE (trainer or audit YAML) or --run RUN_DIR (from `jaxdp train`)")
    metrics = {}
    if args.run:
        cfg, metrics = _run_dir_config(args.run)
        if args.config:
            cfg = {**cfg, **load_config(args.config)}
    else:
        cfg = load_config(args.config)
    attack = args.attack or _first(cfg, ["audit.attack"], None)
    if attack is None:
        raise ValueError(f"give --attack {{{','.join(ATTACKS)}}} (or audit.attack in the config)")
    out = args.out or (os.path.join(args.run, "audit") if args.run else None)
    trained = None
    if args.run and attack == "loss_threshold":
        trained = audit_trained_model(args.run)
    res = run_audit(cfg, attack, out, metrics, dict(
        num_models=args.num_models, pool_size=args.pool_size, steps=args.steps, seed=args.seed,
        canary=args.canary, num_canaries=args.num_canaries, coordinates=args.coordinates))
    if trained is not None:
        res["trained_model"] = trained
        res["summary"] = trained["summary"] + "\n" + res["summary"]
        if res.get("json_path"):
            with open(res["json_path"], "w") as f:
                json.dump(_jsonable(res), f, indent=2)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "attacks"} | (
            {"attacks": {n: {k: v for k, v in a.items() if k != "roc"} for n, a in res["attacks"].items()}}
            if "attacks" in res else {}), indent=2))
    else:
        print(res["summary"])
        if res.get("json_path"):
            print(f"wrote {res['json_path']}" + (f" and {res['roc_png']}" if res.get("roc_png") else ""),
                  file=sys.stderr)
    if not res["passed"]:
        print("AUDIT FAILED: the empirical epsilon lower bound exceeds the claimed epsilon; the training code "
              "does not keep its privacy promise.", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("audit", help="privacy audit: membership inference and empirical epsilon bounds",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="trainer YAML (jaxdp train) or audit YAML (docs/audit.md)")
    p.add_argument("--run", help="run directory written by `jaxdp train` (reads its config and metrics.json)")
    p.add_argument("--attack", choices=ATTACKS, help="which audit to run")
    p.add_argument("--out", help="directory for audit_<attack>.json and roc_<attack>.png")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--num-models", type=int, help="shadow models (lira default 16, loss_threshold 4)")
    p.add_argument("--pool-size", type=int, help="examples in the audit pool (default 200; one_run 300)")
    p.add_argument("--steps", type=int, help="override the training steps")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--canary", choices=("gradient", "input"), help="one_run canary type (default gradient)")
    p.add_argument("--num-canaries", type=int, help="one_run canaries (default: all data-free coordinates)")
    p.add_argument("--coordinates", choices=("data_free", "random"),
                   help="one_run gradient canaries: first-layer weights of always-zero features (data_free, "
                        "default) or any coordinates (random: a weaker audit, for data without zero features)")
    p.set_defaults(func=_handler)
