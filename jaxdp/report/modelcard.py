"""The ``model_privacy`` section of a model card, built from a ``jaxdp train`` run directory.

The section states the mechanism that was run (DP-SGD: clip norm ``C``, noise multiplier ``sigma``, sampling
with rate ``q``, ``T`` steps), the ``(epsilon, delta)`` guarantee an accountant proves for it, what an
empirical membership-inference audit measured (AUC; 0.5 = the attacker does no better than a coin), and the
privacy ledger's total for the dataset (all runs that touched it, composed). A guarantee sentence is generated
from the numbers, followed by the caveats a reader needs (what the guarantee does and does not cover).

Appending to an existing model-card YAML sets or replaces only the ``model_privacy`` key: every other key keeps
its value and its position, and the file is replaced atomically (write to a temporary file, then rename).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping

SECTION = "model_privacy"
AUDIT_FILES = ("audit_lira.json", "audit_loss_threshold.json")  # preferred first: LiRA is the stronger attack

CAVEAT_FURTHER_TRAINING = (
    "Further training or fine-tuning of this model on the same data spends more privacy budget: the guarantee "
    "above holds only for the training recorded here; compose all runs (the privacy ledger does) before "
    "restating it.")
CAVEAT_PER_EXAMPLE = (
    "The guarantee is per training example, not per person: a person who contributed k examples is protected "
    "only at roughly k times epsilon (group privacy) unless examples were grouped per person before training.")
CAVEAT_TUNING = (
    "Hyperparameter tuning on the private data (trying several configurations and keeping the best) is not "
    "accounted for here and spends additional privacy.")
CAVEAT_AUDIT = ("Not audited: no membership-inference audit result was found for this run "
                "(run `jaxdp audit --run DIR --attack loss_threshold` or `--attack lira`).")
CAVEAT_LEDGER = ("No privacy-ledger total: {why}. The epsilon above covers this run only, not other runs on "
                 "the same dataset.")
CAVEAT_AUDIT_MEANING = (
    "A membership-inference AUC near 0.5 shows that this attack failed; it is empirical evidence, not a proof, "
    "and does not replace the accountant's guarantee.")
NO_GUARANTEE = ("Trained WITHOUT differential privacy: this model carries no privacy guarantee for its "
                "training data, and may memorise and reveal individual training examples.")


# -- reading a run ---------------------------------------------------------------------------------------------
def load_metrics(run_dir: str | os.PathLike) -> dict:
    """``metrics.json`` of a run directory written by ``jaxdp train`` / :class:`jaxdp.train.DPTrainer`."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --run must be a run directory written by `jaxdp train`")
    with open(path) as f:
        return json.load(f)


def find_audit(run_dir: str | os.PathLike, audit_path: str | os.PathLike | None = None) -> str | None:
    """The audit JSON to read: ``audit_path`` if given, else ``audit_lira.json`` or ``audit_loss_threshold.json``
    in the run directory or its ``audit/`` sub-directory (where ``jaxdp audit --run DIR`` writes)."""
    if audit_path is not None:
        if not os.path.isfile(audit_path):
            raise FileNotFoundError(f"--audit {audit_path}: no such file (an audit_<attack>.json of `jaxdp audit`)")
        return str(audit_path)
    for where in (run_dir, os.path.join(run_dir, "audit")):  # an audit of this run's own checkpoint comes first
        p = os.path.join(where, "audit_loss_threshold.json")
        if os.path.isfile(p):
            with open(p) as f:
                if "trained_model" in json.load(f):
                    return p
    for name in AUDIT_FILES:
        for where in (run_dir, os.path.join(run_dir, "audit")):
            p = os.path.join(where, name)
            if os.path.isfile(p):
                return p
    return None


def read_audit(path: str | None) -> dict | None:
    """Membership-inference summary of an ``audit_<attack>.json``: the strongest attack (largest AUC), its AUC and
    95% interval, its TPR at 0.1% FPR, the empirical epsilon lower bound, and the ROC curves (for the report)."""
    if path is None:
        return None
    with open(path) as f:
        a = json.load(f)
    attacks = a.get("attacks") or {}
    trained = a.get("trained_model")
    if trained:  # loss-threshold attack on the run's own checkpoint: members = training set, non-members = test
        lb = a.get("epsilon_lower_bound")
        if isinstance(lb, dict):
            lb = lb.get("epsilon_lower_bound")
        tpr = trained.get("tpr_at_fpr") or {}
        return {"file": os.path.abspath(path), "attack": "loss_threshold (trained model, train vs test)",
                "auc": float(trained["auc"]), "auc_ci95": trained.get("auc_ci95"),
                "tpr_at_0.1%_fpr": tpr.get("0.001", tpr.get(0.001)),
                "empirical_epsilon_lower_bound": lb if isinstance(lb, (int, float)) else None,
                "roc": {n: r["roc"] for n, r in attacks.items() if "roc" in r}}
    if not attacks:
        # one_run audits have no AUC; keep the lower bound only.
        lb = a.get("epsilon_lower_bound")
        return {"file": os.path.abspath(path), "attack": a.get("attack"), "auc": None, "auc_ci95": None,
                "empirical_epsilon_lower_bound": lb if isinstance(lb, (int, float)) else None, "roc": {}}
    best_name, best = max(attacks.items(), key=lambda kv: kv[1].get("auc", -1.0))
    lb = a.get("epsilon_lower_bound")
    if isinstance(lb, dict):
        lb = lb.get("epsilon_lower_bound")
    tpr = best.get("tpr_at_fpr") or {}
    return {"file": os.path.abspath(path), "attack": best_name, "auc": float(best["auc"]),
            "auc_ci95": best.get("auc_ci95"),
            "tpr_at_0.1%_fpr": tpr.get("0.001", tpr.get(0.001)),
            "empirical_epsilon_lower_bound": lb if isinstance(lb, (int, float)) else None,
            "roc": {n: r["roc"] for n, r in attacks.items() if "roc" in r}}


def ledger_total(ledger_path: str | None, dataset_id: str | None) -> tuple[dict | None, str | None]:
    """``(summary, None)`` with the ledger's composed epsilon for ``dataset_id``, or ``(None, why)``.

    :mod:`jaxdp.ledger` is imported lazily: without it (or without ``--ledger``) the total is ``None``.
    """
    if ledger_path is None:
        return None, "no ledger given (--ledger PATH --dataset-id ID)"
    if dataset_id is None:
        raise ValueError("--ledger needs --dataset-id (the dataset's id in the ledger)")
    try:
        from jaxdp.ledger import Ledger
    except ImportError:
        return None, "jaxdp.ledger is not available in this installation"
    s = Ledger.open(ledger_path).spent(dataset_id)
    eps = float(s.epsilon)
    return {"ledger": str(ledger_path), "dataset_id": dataset_id,
            "epsilon": eps if math.isfinite(eps) else None, "delta": float(s.delta),
            "max_epsilon": float(s.max_epsilon), "remaining": float(s.remaining) if math.isfinite(s.remaining) else None,
            "accountant": s.accountant, "runs_committed": s.runs_committed,
            "runs_reserved": s.runs_reserved}, None


def _run_ledger(run_dir: str | os.PathLike, dataset_id: str | None) -> tuple[str | None, str | None]:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None, dataset_id
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    led = cfg.get("ledger") if isinstance(cfg, dict) else None
    if not isinstance(led, dict) or not led.get("path"):
        return None, dataset_id
    return str(led["path"]), dataset_id or led.get("dataset_id")


# -- the section -----------------------------------------------------------------------------------------------
def _g(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def format_epsilon(epsilon: float, digits: int = 4) -> str:
    """``epsilon`` to ``digits`` significant digits, rounded UP, so a stated guarantee is never stronger than
    the proven one (2.00004 reads "2.001", not "2")."""
    if not math.isfinite(epsilon) or epsilon <= 0:
        return f"{epsilon:g}"
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(epsilon)))
    up = math.ceil(epsilon * scale) / scale
    text = f"{up:.{digits}g}"
    return text if float(text) >= epsilon else repr(epsilon)  # float noise: never state less than proven


def guarantee_sentence(mp: Mapping[str, Any]) -> str:
    """One sentence stating the mechanism and the ``(epsilon, delta)`` it provably satisfies (or that there is none)."""
    if not mp.get("private"):
        return NO_GUARANTEE
    sampling = mp["sampling"]
    if sampling == "poisson":
        how = f"Poisson sampling rate q={_g(mp['sample_rate'])}"
    elif sampling == "shuffle":
        how = f"shuffled fixed-size batches of {_g(mp['expected_batch_size'])}"
    elif sampling == "cyclic_poisson":
        how = (f"banded matrix-factorization noise with b={mp.get('bands')} bands, cyclic Poisson sampling of "
               f"{mp.get('bands')} groups at rate p={_g(mp['sample_rate'])}")
    else:
        how = f"{sampling} sampling rate q={_g(mp['sample_rate'])}"
    relation = "add/remove-one" if mp.get("neighboring_relation", "add_remove") == "add_remove" else "replace-one"
    acc = str(mp.get("accountant") or "").upper()
    name = "BandMF" if sampling == "cyclic_poisson" else "DP-SGD"
    return (f"Trained with {name} ({how}, noise multiplier σ={_g(mp['noise_multiplier'])}, "
            f"clip norm C={_g(mp['max_grad_norm'])}, T={mp['steps']} steps, training set of "
            f"{mp['training_set_size']} examples): for any one training example, (ε={format_epsilon(mp['epsilon'])}, "
            f"δ={_g(mp['delta'])})-differential privacy holds under {relation} neighbouring datasets "
            f"({acc} accountant).")


def build_model_privacy(run_dir: str | os.PathLike, *, audit: str | os.PathLike | None = None,
                        ledger: str | None = None, dataset_id: str | None = None,
                        metrics: dict | None = None) -> dict:
    """The ``model_privacy`` section (a JSON/YAML-ready dict) of the run in ``run_dir``.

    Args:
      run_dir: a ``jaxdp train`` run directory (``metrics.json``).
      audit: an ``audit_<attack>.json``; default: found in ``run_dir`` or ``run_dir/audit``.
      ledger, dataset_id: a privacy ledger and the dataset's id in it, for the dataset's total spent epsilon
        (all runs charged to it, composed). Default: the ``ledger.path`` / ``ledger.dataset_id`` of the run's
        ``config.yaml`` when it has them, and the run's dataset name as the id.
    """
    m = metrics if metrics is not None else load_metrics(run_dir)
    private = bool(m.get("dp"))
    aud = read_audit(find_audit(run_dir, audit))
    if ledger is None:  # the ledger the run itself was charged to (config.yaml's `ledger` section), if any
        ledger, dataset_id = _run_ledger(run_dir, dataset_id)
    led, led_why = ledger_total(ledger, dataset_id or m.get("dataset"))
    mp: dict[str, Any] = {
        "private": private,
        "mechanism": (("BandMF (per-example clipping + banded matrix-factorization noise)"
                       if m.get("mechanism") == "bandmf" else "DP-SGD (per-example clipping + Gaussian noise)")
                      if private else "none (non-private SGD)"),
        "bands": m.get("bands"),
        "library": "jaxdp",
        "library_version": m.get("jaxdp_version"),
        "epsilon": m.get("epsilon") if private else None,
        "delta": m.get("delta") if private else None,
        "target_epsilon": m.get("target_epsilon"),
        "accountant": m.get("accountant"),
        "neighboring_relation": "add_remove" if private else None,
        "max_grad_norm": m.get("max_grad_norm"),
        "noise_multiplier": m.get("noise_multiplier"),
        "clipping_method": m.get("clipping_method"),
        "sampling": m.get("sampling"),
        "sample_rate": m.get("sample_rate"),
        "expected_batch_size": m.get("expected_batch_size"),
        "steps": m.get("steps"),
        "epochs": len(m.get("epochs") or []),
        "training_set_size": m.get("training_set_size"),
        "dataset": m.get("dataset"),
        "model": m.get("model"),
        "run_id": m.get("run_id"),
        "run_status": m.get("status"),
        "config_hash": m.get("config_hash"),
        "final_test_accuracy": m.get("final_test_accuracy"),
        "membership_inference_auc": aud["auc"] if aud else None,
        "membership_inference": None if aud is None else {
            k: v for k, v in aud.items() if k != "roc"},
        "ledger_dataset_epsilon": led["epsilon"] if led else None,
        "ledger": led,
    }
    mp["guarantee"] = guarantee_sentence(mp)
    caveats = []
    if private:
        caveats += [CAVEAT_FURTHER_TRAINING, CAVEAT_PER_EXAMPLE, CAVEAT_TUNING]
        if m.get("status") not in (None, "finished"):
            caveats.append(f"The run's status is {m.get('status')!r}: epsilon is for the {m.get('steps')} steps "
                           "actually taken.")
    else:
        caveats.append("No epsilon is stated because none holds; train with training.dp.enabled: true for a "
                       "guarantee.")
    if aud is None or aud["auc"] is None:
        caveats.append(CAVEAT_AUDIT)
    else:
        caveats.append(CAVEAT_AUDIT_MEANING)
    if led is None:
        caveats.append(CAVEAT_LEDGER.format(why=led_why))
    mp["caveats"] = caveats
    return mp


# -- writing ---------------------------------------------------------------------------------------------------
def _atomic_write(path: str | os.PathLike, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".jaxdp.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:  # mkstemp makes 0600 files; give a new file the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_model_card(path: str | os.PathLike, section: Mapping[str, Any]) -> dict:
    """Set ``model_privacy`` in the model-card YAML at ``path`` (created if missing); other keys keep their
    values and order. The file is replaced atomically. Returns the whole card."""
    import yaml
    card: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a model card must be a YAML mapping at the top level, "
                             f"got {type(loaded).__name__}")
        card = loaded
    card[SECTION] = dict(section)  # replaces in place (keeps its position) or appends at the end
    _atomic_write(path, yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=100))
    return card


__all__ = ["SECTION", "format_epsilon", "load_metrics", "find_audit", "read_audit", "ledger_total", "guarantee_sentence",
           "build_model_privacy", "write_model_card"]
