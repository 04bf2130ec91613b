"""``jaxdp audit``: run a privacy audit of a training recipe and write JSON (and a log-log ROC PNG).

    jaxdp audit --config FILE --attack loss_threshold|lira|one_run [--out DIR] [--json]
    jaxdp audit --run RUN_DIR --attack one_run          # RUN_DIR written by `jaxdp train`

The config is a ``jaxdp train`` YAML, checked with the trainer's own schema (a misspelt key is an error, never a
default), plus an optional ``audit:`` section (:mod:`jaxdp.audit.config`, ``docs/audit.md``). With ``--run``, the
run's record (``metrics.json``, :class:`jaxdp.train.RunSummary`) states what the run did and claimed.
The audit re-trains the recipe at audit scale (a pool of ``audit.pool_size`` examples) with the SAME sample
rate, steps, clip norm and noise, so the claimed epsilon applies to the audited trainings. Exit status: 0 pass (or an
indicative-only membership-inference result), 1 when the one-run audit's lower bound exceeds the claimed
epsilon (the implementation broke its promise), 2 bad input, 3 inconclusive (the claim is at or above the
largest epsilon the audit can detect); see docs/cli.md.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys

import numpy as np

from jaxdp import _cli
from jaxdp._io import atomic_write
from jaxdp.audit.config import ATTACKS, load_audit_config, validate_audit_config
from jaxdp.train.summary import RunSummary


def load_config(path: str) -> dict:
    """Deprecated alias of :func:`jaxdp.audit.config.load_audit_config` (the audit reads trainer configs with the
    trainer's schema now; this used to read any YAML mapping and let every key fall back to a default)."""
    import warnings
    from jaxdp._checks import JaxdpDeprecationWarning
    warnings.warn("jaxdp.audit.cli.load_config is deprecated: use jaxdp.audit.config.load_audit_config",
                  JaxdpDeprecationWarning, stacklevel=2)
    return load_audit_config(path)


def _run_dir_config(run_dir: str) -> tuple[dict, RunSummary | None]:
    """The raw config YAML of a ``jaxdp train`` run directory and its record (None: no ``metrics.json`` yet)."""
    from jaxdp.train.config import read_yaml
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run {run_dir}: no such directory (give the run directory of `jaxdp train`)")
    candidates = [os.path.join(run_dir, n) for n in ("config.yaml", "config.yml")] + sorted(
        glob.glob(os.path.join(run_dir, "*.yaml")) + glob.glob(os.path.join(run_dir, "*.yml")))
    cfg_path = next((p for p in candidates if os.path.isfile(p)), None)
    if cfg_path is None:
        raise FileNotFoundError(f"--run {run_dir}: no config YAML in the run directory")
    record = RunSummary.read(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.json")) else None
    return read_yaml(cfg_path), record


_AUDIT_OPTIMIZERS = ("sgd", "momentum", "adam")


def recipe_from_config(cfg: dict, attack: str, metrics: RunSummary | dict | None = None,
                       overrides: dict | None = None):
    """Turn a trainer config (checked with the trainer's schema, plus its ``audit`` section) and the run's record
    into ``(ShadowConfig, x, y, info)`` for the audit (keys: docs/audit.md).

    The run's record (``metrics``: its ``metrics.json``) wins over the config for what the run did and claimed:
    epsilon, noise multiplier, delta, sample rate, steps. The claim is the record's epsilon (what the run's
    accountant proved), else the config's target ``training.dp.epsilon`` when it sets one, else the accountant's
    epsilon of the noise: never a default target."""
    from jaxdp.audit import _accounting
    from jaxdp.audit.shadow import ShadowConfig
    from jaxdp.data import load_dataset
    from jaxdp.sampling import PoissonSampler

    cfg = validate_audit_config(cfg)
    record = None if metrics is None else RunSummary.coerce(metrics)
    a, t, dp, opt = cfg["audit"], cfg["training"], cfg["training"]["dp"], cfg["optimizer"]
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = load_dataset(cfg["data"]["name"], **cfg["data"]["options"])
    x_all = data.x_train.reshape(len(data.x_train), -1)
    y_all = data.y_train
    default_pool = 200 if attack in ("lira", "loss_threshold") else 300
    pool = int(o.get("pool_size", a["pool_size"] or default_pool))
    pool = min(pool, len(y_all))
    rng = np.random.default_rng(a["data_seed"])
    idx = np.sort(rng.choice(len(y_all), pool, replace=False))
    x, y = x_all[idx], y_all[idx]

    name = cfg["model"]["module"] or cfg["model"]["name"]
    options = cfg["model"]["options"] if cfg["model"]["module"] is None else {}
    notes = []
    substituted = None
    if name == "logreg":
        mname = "logreg"
    else:
        mname = "mlp"
        if name != "mlp":
            substituted = name
            notes.append(f"config model {name!r}: the audit trainer uses an MLP on flattened inputs instead")
    hidden = options.get("hidden", [128]) if name == "mlp" else [128]
    hidden = tuple(int(h) for h in (hidden if isinstance(hidden, (list, tuple)) else [hidden]))
    activation = str(options.get("activation", "tanh")) if name == "mlp" else "tanh"
    if mname == "mlp" and substituted is None and activation.lower() != "tanh":
        substituted = f"{name} ({activation})"
        notes.append(f"config activation {activation!r}: the audit trainer's MLP uses tanh")

    dp_enabled = bool(dp["enabled"])
    # The run's own (q, T): its record (what the run did) wins over the config (what it was asked to do).
    run_q = record.sample_rate if record is not None and record.sample_rate is not None else \
        min(1.0, float(t["batch_size"]) / len(y_all))
    run_steps = record.steps if record is not None and record.steps is not None else \
        PoissonSampler(len(y_all), run_q, 0).steps_for_epochs(t["epochs"])
    # The audited (q, T): the run's unless overridden (--steps / audit.steps, --sample-rate / audit.sample_rate).
    q = float(o.get("sample_rate", a["sample_rate"] or run_q))
    steps = int(o.get("steps", a["steps"] or run_steps))
    opt_name = opt["name"]
    if opt_name not in _AUDIT_OPTIMIZERS:
        notes.append(f"config optimizer {opt_name!r}: the audit trainer uses plain SGD at its learning rate")
    ignored = [k for k, default in (("weight_decay", 0.0), ("schedule", {}), ("options", {})) if opt[k] != default]
    if ignored:
        notes.append(f"config optimizer.{', optimizer.'.join(ignored)}: not used by the audit trainer")
    lr = float(opt["learning_rate"])
    momentum = float(opt["momentum"]) if opt_name == "momentum" else None   # "sgd" is plain SGD, as in the trainer
    seed = int(o.get("seed", t["seed"] if t["seed"] is not None else 0))  # a seed drawn from the OS: 0

    delta = float(record.delta if record is not None and record.delta is not None else dp["delta"])
    if record is not None and record.epsilon is not None:
        claimed = record.epsilon          # the run's own accounted epsilon
    elif record is not None and record.private:
        claimed = None                    # the run recorded no finite epsilon: the accountant's, below
    else:
        claimed = dp["epsilon"]           # the config's target (None when it sets only a noise multiplier)
    sigma = record.noise_multiplier if record is not None and record.noise_multiplier is not None else \
        dp["noise_multiplier"]
    clip = float(dp["max_grad_norm"])
    clipping = a["clipping"]
    run_claim, claim_note = None, None
    if dp_enabled:
        if sigma is None:
            if claimed is None:
                raise ValueError("training.dp needs epsilon or noise_multiplier when enabled")
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
        notes.append("audit.clipping is false: a DELIBERATELY BROKEN recipe without per-example clipping")
    included = pool // 2 if attack in ("lira", "loss_threshold") else pool
    sc = ShadowConfig(model=mname, hidden=hidden, num_classes=int(max(data.num_classes, y.max() + 1)),
                      steps=steps, learning_rate=lr, optimizer="adam" if opt_name == "adam" else "sgd",
                      momentum=momentum, sample_rate=q, expected_dataset_size=max(1, included), dp=dp_enabled,
                      l2_clip_norm=clip, noise_multiplier=sigma, clip=clipping)
    recorded = {} if record is None else {k: getattr(record, k) for k in ("epsilon", "delta", "noise_multiplier")
                                          if getattr(record, k) is not None}
    info = dict(dataset=data.name, pool_size=pool, model=mname, hidden=list(hidden), steps=steps, sample_rate=q,
                optimizer=sc.optimizer, learning_rate=lr, dp=dp_enabled, noise_multiplier=sigma,
                max_grad_norm=clip, clipping=clipping, delta=delta, claimed_epsilon=claimed,
                accountant_epsilon=acc_eps, accountant=_accounting.accountant_name(), seed=seed, notes=notes,
                run_steps=run_steps, run_sample_rate=run_q, run_claimed_epsilon=run_claim,
                run_model=substituted or name, audited_model=f"{mname} {list(hidden)}" if mname == "mlp" else mname,
                model_substituted=substituted is not None, run_metrics=recorded)
    return sc, x, y, info


def run_audit(cfg: dict, attack: str, out_dir: str | None = None, metrics: RunSummary | dict | None = None,
              overrides: dict | None = None) -> dict:
    """Run ``attack`` on the recipe in ``cfg``; returns the JSON-ready result (and writes it under out_dir)."""
    import jax

    from jaxdp.audit import bounds, lira, one_run, plot

    if attack not in ATTACKS:
        raise ValueError(f"--attack must be one of {ATTACKS}, got {attack!r}")
    o = overrides or {}
    cfg = validate_audit_config(cfg)
    a = cfg["audit"]
    sc, x, y, info = recipe_from_config(cfg, attack, metrics, o)
    key = jax.random.key(info["seed"])
    alpha = a["alpha"]
    result: dict = dict(attack=attack, recipe=info)
    png = None
    if attack == "one_run":
        r = one_run.one_run_audit(
            sc, x, y, claimed_epsilon=info["claimed_epsilon"], delta=info["delta"], key=key, seed=info["seed"],
            canary=str(o.get("canary") or a["canary"]),
            num_canaries=o.get("num_canaries") or a["num_canaries"],
            coordinates=str(o.get("coordinates") or a["coordinates"]),
            k_pos=a["k"], k_neg=a["k"], beta=a["beta"], accountant_epsilon=info["accountant_epsilon"],
            canary_scale=float(o.get("canary_scale") or a["canary_scale"]))
        result.update(r.to_dict())
        result["summary"] = r.summary()
        verdict = r.verdict
    else:
        m = int(o.get("num_models") or a["num_shadow"] or (16 if attack == "lira" else 4))
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
                png = os.path.join(out_dir, f"roc_{attack}.png")
                plot.plot_roc(list(attacks.values()), png,
                              title=f"{attack} on {info['dataset']} (eps {info['claimed_epsilon']:.3g})")
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
        atomic_write(path, _cli.dumps(result, indent=2))
        result["json_path"] = path
    return _cli.jsonable(result)


def audit_trained_model(run_dir: str) -> dict:
    """Loss-threshold membership inference on the model a `jaxdp train` run produced (its checkpoint):
    members = its training set, non-members = the held-out test set. Returns AUC (DeLong CI), advantage,
    TPR at low FPR and a summary line."""
    from jaxdp.audit import metrics as audit_metrics
    from jaxdp.train import DPTrainer

    trainer = DPTrainer.load(run_dir)
    r = audit_metrics.loss_threshold_attack(trainer.per_example_losses("train"), trainer.per_example_losses("test"))
    d = _cli.jsonable(r.to_dict(include_roc=False))
    d["members"], d["nonmembers"] = trainer.n, len(trainer.dataset.y_test)
    d["summary"] = f"trained model ({run_dir}), train vs test: " + r.summary()
    return d


def _handler(args: argparse.Namespace) -> int:
    if not args.config and not args.run:
        raise ValueError("give --config FILE (trainer or audit YAML) or --run RUN_DIR (from `jaxdp train`)")
    metrics = None
    if args.run:
        from jaxdp.train.config import read_yaml
        raw, metrics = _run_dir_config(args.run)
        if args.config:   # its sections replace the run's
            raw = {**raw, **(read_yaml(args.config) or {})}
        cfg = validate_audit_config(raw)
    else:
        cfg = load_audit_config(args.config)
    attack = args.attack or cfg["audit"]["attack"]
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
            atomic_write(res["json_path"], _cli.dumps(res, indent=2))
    if args.json:
        print(_cli.dumps({k: v for k, v in res.items() if k != "attacks"} | (
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
        return _cli.EXIT_REFUSED
    if res.get("verdict") == "INCONCLUSIVE":
        print(f"AUDIT INCONCLUSIVE: the claimed epsilon {res['claimed_epsilon']} is at or above the largest epsilon "
              f"this audit can detect ({res.get('ceiling')}); it neither passes nor fails the run.",
              file=sys.stderr)
        return _cli.EXIT_INCONCLUSIVE
    return 0


def register(subparsers) -> None:
    from jaxdp.audit import one_run
    p = subparsers.add_parser("audit", help="privacy audit: membership inference and empirical epsilon bounds",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="trainer YAML (jaxdp train) or audit YAML (docs/audit.md)")
    p.add_argument("--run", help="run directory written by `jaxdp train` (reads its config and metrics.json)")
    p.add_argument("--attack", choices=ATTACKS, help="which audit to run")
    p.add_argument("--out", help="directory for audit_<attack>.json and roc_<attack>.png")
    _cli.add_json_flag(p)
    p.add_argument("--num-models", type=int, help="shadow models (lira default 16, loss_threshold 4)")
    p.add_argument("--pool-size", type=int, help="examples in the audit pool (default 200; one_run 300)")
    p.add_argument("--steps", type=int, help="override the training steps")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--canary", choices=one_run.CANARIES, help="one_run canary type (default gradient)")
    p.add_argument("--num-canaries", type=int,
                   help="one_run canaries (default: chosen from the claimed epsilon, see docs/audit.md)")
    p.add_argument("--coordinates", choices=one_run.COORDINATES,
                   help="one_run gradient canaries: first-layer weights of always-zero features (data_free, "
                        "default) or any coordinates (random: a weaker audit, for data without zero features)")
    p.add_argument("--canary-scale", type=float,
                   help="one_run gradient-canary norm as a multiple of the clip norm C (default 10; must exceed 1 "
                        "for the audit to see missing clipping)")
    p.set_defaults(func=_handler)
