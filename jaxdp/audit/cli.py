"""``jaxdp audit``: run a privacy audit of a training recipe and write JSON (and a log-log ROC PNG).

    jaxdp audit --config FILE --attack loss_threshold|lira|one_run [--out DIR] [--json]
    jaxdp audit --run RUN_DIR --attack one_run          # RUN_DIR written by `jaxdp train`

The config is either a ``jaxdp train`` YAML (sections ``data``, ``model``, ``training`` with ``training.dp``) or
the small audit YAML documented in ``docs/audit.md``; both are read defensively (missing keys take defaults).
The audit re-trains the recipe at audit scale (a pool of ``audit.pool_size`` examples) with the SAME sample
rate, steps, clip norm and noise, so the claimed epsilon applies to the audited trainings. Exit status: 0 pass (or an
indicative-only membership-inference result), 1 when the one-run audit's lower bound exceeds the claimed
epsilon (the implementation broke its promise), 2 bad input, 3 inconclusive (the claim is at or above the
largest epsilon the audit can detect).
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
    from jaxdp.audit import _accounting, bounds
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
    substituted = None
    if name in ("logreg", "logistic_regression", "linear", "logistic"):
        mname = "logreg"
    else:
        mname = "mlp"
        if name not in ("mlp", "dense"):
            substituted = name
            notes.append(f"config model {name!r}: the audit trainer uses an MLP on flattened inputs instead")
    hidden = _first(model if isinstance(model, dict) else {},
                    [f"{pre}{k}" for pre in ("options.", "") for k in ("hidden", "hidden_sizes", "features", "widths",
                                                                         "width")], [128])
    hidden = tuple(int(h) for h in (hidden if isinstance(hidden, (list, tuple)) else [hidden]))
    activation = str(_first(model if isinstance(model, dict) else {}, ["options.activation", "activation"], "tanh"))
    if mname == "mlp" and substituted is None and activation.lower() != "tanh":
        substituted = f"{name} ({activation})"
        notes.append(f"config activation {activation!r}: the audit trainer's MLP uses tanh")

    t = lambda k: [f"training.{k}", k]  # noqa: E731  (keys may sit in `training` or at the top level)
    dp_enabled = bool(_first(cfg, ["training.dp.enabled", "dp.enabled"], False))
    batch_size = float(_first(cfg, t("batch_size"), 64))
    # The run's own (q, T): metrics.json (what the run did) wins over the config (what it was asked to do).
    run_q = float(metrics.get("sample_rate") or min(1.0, batch_size / len(y_all)))
    run_steps = metrics.get("steps") or _first(cfg, t("steps"), None)
    epochs = _first(cfg, t("epochs"), None)
    if run_steps is None:
        from jaxdp.sampling import steps_for_epochs   # the trainer's rule
        run_steps = steps_for_epochs(float(epochs), run_q) if epochs is not None else 300
    run_steps = int(run_steps)
    # The audited (q, T): the run's unless overridden (--steps, audit.sample_rate / --sample-rate).
    q = float(o.get("sample_rate", _first(cfg, ["audit.sample_rate"], run_q)))
    steps = int(o.get("steps", run_steps))
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

    delta = float(metrics.get("delta") or _first(cfg, ["training.dp.delta", "dp.delta"], bounds.DEFAULT_DELTA))
    # A `jaxdp train` run's metrics.json states what the run used and claimed: it wins over the config.
    claimed = metrics.get("epsilon") if metrics.get("epsilon") is not None else _first(
        cfg, ["training.dp.epsilon", "dp.epsilon", "training.dp.target_epsilon"], None)
    sigma = metrics.get("noise_multiplier") if metrics.get("noise_multiplier") is not None else _first(
        cfg, ["training.dp.noise_multiplier", "dp.noise_multiplier"], None)
    clip = float(_first(cfg, ["training.dp.max_grad_norm", "training.dp.l2_clip_norm", "dp.max_grad_norm"], 1.0))
    clipping = bool(_first(cfg, ["training.dp.clipping", "dp.clipping"], True))
    run_claim, claim_note = None, None
    if dp_enabled:
        if sigma is None and claimed is None:
            raise ValueError("training.dp needs epsilon or noise_multiplier when enabled")
        if sigma is None:
            sigma = _accounting.calibrate_noise_multiplier(float(claimed), delta, run_q, run_steps)
        sigma = float(sigma)
        acc_eps = _accounting.compute_epsilon(sigma, q, steps, delta)
        if claimed is None:
            claimed = acc_eps
        elif (q, steps) != (run_q, run_steps):
            # The claim is about the run's (q, T). For the audited (q', T') the claim says: the noise the run
            # claims to have -- the sigma whose epsilon at (q, T) is the claim -- gives epsilon(sigma, q', T').
            run_claim = float(claimed)
            claimed_sigma = _accounting.calibrate_noise_multiplier(run_claim, delta, run_q, run_steps)
            claimed = _accounting.compute_epsilon(claimed_sigma, q, steps, delta)
            claim_note = (f"the run claims epsilon {run_claim:.4g} for q {run_q:.4g}, {run_steps} steps; this audit "
                          f"runs q {q:.4g}, {steps} steps, for which that claim (noise multiplier "
                          f"{claimed_sigma:.4g}) means epsilon {claimed:.4g}")
            notes.append(claim_note)
        claimed = float(claimed)
    else:
        sigma, acc_eps, claimed = 0.0, math.inf, math.inf
    if not clipping:
        notes.append("training.dp.clipping is false: a DELIBERATELY BROKEN recipe without per-example clipping")
    included = pool // 2 if attack in ("lira", "loss_threshold") else pool
    sc = ShadowConfig(model=mname, hidden=hidden, num_classes=int(max(data.num_classes, y.max() + 1)),
                      steps=steps, learning_rate=lr, optimizer="adam" if opt_name == "adam" else "sgd",
                      momentum=None if opt_name == "adam" else (float(momentum) if momentum else None),
                      sample_rate=q, expected_dataset_size=max(1, included), dp=dp_enabled, l2_clip_norm=clip,
                      noise_multiplier=sigma, clip=clipping)
    info = dict(dataset=data.name, pool_size=pool, model=mname, hidden=list(hidden), steps=steps, sample_rate=q,
                optimizer=sc.optimizer, learning_rate=lr, dp=dp_enabled, noise_multiplier=sigma,
                max_grad_norm=clip, clipping=clipping, delta=delta, claimed_epsilon=claimed,
                accountant_epsilon=acc_eps, accountant=_accounting.accountant_name(), seed=seed, notes=notes,
                run_steps=run_steps, run_sample_rate=run_q, run_claimed_epsilon=run_claim,
                run_model=substituted or name, audited_model=f"{mname} {list(hidden)}" if mname == "mlp" else mname,
                model_substituted=substituted is not None,
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
            beta=float(_first(cfg, ["audit.beta"], 0.05)), accountant_epsilon=info["accountant_epsilon"],
            canary_scale=float(o.get("canary_scale") or _first(cfg, ["audit.canary_scale"],
                                                                one_run.DEFAULT_CANARY_SCALE)))
        result.update(r.to_dict())
        result["summary"] = r.summary()
        verdict = r.verdict
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
        # INDICATIVE ONLY. The scores of one example pooled over shadow models are not independent trials, and
        # the attack was picked by its AUC on the same data, so this Clopper-Pearson number is not a valid
        # lower bound; it never decides the verdict or the exit status (the one-run audit does).
        sb["attack"] = best.attack
        sb["note"] = ("indicative only: pooled shadow-model scores are dependent and the attack was chosen on "
                      "the same scores, so this is not a valid lower bound; use --attack one_run for a verdict")
        result["indicative_epsilon"] = sb
        result["claimed_epsilon"] = info["claimed_epsilon"]
        verdict = "INDICATIVE"
        result["summary"] = "\n".join(a.summary() for a in attacks.values()) + (
            f"\nindicative epsilon ({best.attack}, Clopper-Pearson, {sb['correction']}): "
            f"{sb['epsilon_lower_bound']:.4f} vs claimed epsilon {info['claimed_epsilon']:.4f} -- INDICATIVE ONLY "
            "(dependent pooled scores, attack chosen on the same data: not a valid bound, no verdict; "
            "`--attack one_run` gives one)")
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            try:
                png = plot.plot_roc(list(attacks.values()), os.path.join(out_dir, f"roc_{attack}.png"),
                                    title=f"{attack} on {info['dataset']} "
                                          f"(eps {info['claimed_epsilon']:.3g})")
            except ImportError as e:
                result["plot_error"] = str(e)
    result["verdict"] = verdict
    result["passed"] = {"PASS": True, "FAIL": False}.get(verdict)   # None: inconclusive / indicative
    result["audited_model"] = info["audited_model"]
    result["model_substituted"] = info["model_substituted"]
    if info["model_substituted"]:
        result["model_note"] = (f"NOTE: the run trained model {info['run_model']!r}; this audit re-trained its "
                                f"recipe on a {info['audited_model']} MLP stand-in (tanh, flattened inputs), "
                                "not on that model: it checks the DP-SGD implementation at this recipe, not the "
                                "trained model itself.")
        result["summary"] = result["model_note"] + "\n" + result["summary"]
    if info.get("run_claimed_epsilon") is not None:
        result["summary"] = "NOTE: " + next(n for n in info["notes"] if n.startswith("the run claims")) + \
            "\n" + result["summary"]
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
        canary=args.canary, num_canaries=args.num_canaries, coordinates=args.coordinates,
        canary_scale=args.canary_scale))
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
    if res.get("verdict") == "FAIL":
        print("AUDIT FAILED: the empirical epsilon lower bound exceeds the claimed epsilon; the training code "
              "does not keep its privacy promise.", file=sys.stderr)
        return 1
    if res.get("verdict") == "INCONCLUSIVE":
        print(f"AUDIT INCONCLUSIVE: the claimed epsilon {res['claimed_epsilon']} is at or above the largest epsilon "
              f"this audit can detect ({res.get('ceiling')}); it neither passes nor fails the run.",
              file=sys.stderr)
        return 3
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
    p.add_argument("--num-canaries", type=int,
                   help="one_run canaries (default: chosen from the claimed epsilon, see docs/audit.md)")
    p.add_argument("--coordinates", choices=("data_free", "random"),
                   help="one_run gradient canaries: first-layer weights of always-zero features (data_free, "
                        "default) or any coordinates (random: a weaker audit, for data without zero features)")
    p.add_argument("--canary-scale", type=float,
                   help="one_run gradient-canary norm as a multiple of the clip norm C (default 10; must exceed 1 "
                        "for the audit to see missing clipping)")
    p.set_defaults(func=_handler)
