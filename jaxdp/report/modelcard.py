"""The ``model_privacy`` section of a model card, built from a ``jaxdp train`` run directory.

The section states the mechanism that was run (DP-SGD: clip norm ``C``, noise multiplier ``sigma``, sampling
with rate ``q``, ``T`` steps), the ``(epsilon, delta)`` guarantee an accountant proves for it, what an
empirical membership-inference audit measured (AUC; 0.5 = the attacker does no better than a coin), and the
privacy ledger's total for the dataset (all runs that touched it, composed). A guarantee sentence is generated
from the numbers, followed by the caveats a reader needs (what the guarantee does and does not cover).

Appending to an existing model card (YAML, or the YAML front matter of a Hugging Face ``README.md``) sets or
replaces only the ``model_privacy`` entry: every other line keeps its value, position, comments and formatting,
and the file is replaced atomically (write to a temporary file, then rename).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any
from collections.abc import Mapping

from jaxdp._io import atomic_write
from jaxdp.train.summary import RunSummary

SECTION = "model_privacy"
NOT_RECORDED = "not recorded"   # privacy rule 10: what the record lacks is said to be missing, never guessed
MECHANISM_LABELS = {   # the run record's `mechanism` -> how the card names it
    "dpsgd": "DP-SGD (per-example clipping + Gaussian noise)",
    "bandmf": "BandMF (per-example clipping + banded matrix-factorization noise)",
    "blt": "BLT (per-example clipping + buffered linear Toeplitz correlated noise)",
}
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
def load_run(run_dir: str | os.PathLike) -> RunSummary:
    """The run record (:class:`jaxdp.train.RunSummary`, ``metrics.json``) of a ``jaxdp train`` run directory.

    Raises:
      FileNotFoundError: no ``metrics.json`` in ``run_dir``.
      jaxdp.train.RunSummaryError: the file is damaged (names the file and the field).
    """
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --run must be a run directory written by `jaxdp train`")
    return RunSummary.read(path)


def load_metrics(run_dir: str | os.PathLike) -> dict:
    """``metrics.json`` of a run directory as a dict, read and checked by :func:`load_run` (keys the file lacks
    are ``None``: not recorded). Prefer :func:`load_run`, which gives the typed record."""
    return load_run(run_dir).to_dict()


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


def find_one_run_audit(run_dir: str | os.PathLike) -> str | None:
    """``audit_one_run.json`` of ``jaxdp audit --run DIR --attack one_run`` in the run directory or its ``audit/``."""
    for where in (run_dir, os.path.join(run_dir, "audit")):
        p = os.path.join(where, "audit_one_run.json")
        if os.path.isfile(p):
            return p
    return None


def read_one_run_audit(path: str | None) -> dict | None:
    """The one-run audit (Steinke, Nasr & Jagielski 2023) of an ``audit_one_run.json``: the empirical epsilon lower
    bound from canaries inserted in ONE training run, the epsilon it was checked against, and PASS/FAIL."""
    if path is None:
        return None
    with open(path) as f:
        a = json.load(f)
    if a.get("attack") != "one_run":
        return None
    keys = ("epsilon_lower_bound", "claimed_epsilon", "passed", "delta", "beta", "canary_type", "num_canaries",
            "num_guesses", "num_correct")
    return {"file": os.path.abspath(path), "attack": "one_run (canaries in one training run)",
            **{k: a.get(k) for k in keys}}


def read_audit(path: str | None) -> dict | None:
    """:func:`_read_audit`, plus ``model_note`` when the audit trained a stand-in instead of the run's model."""
    out = _read_audit(path)
    if out is not None and path is not None:   # (out is None without a path)
        with open(path) as f:
            note = json.load(f).get("model_note")
        if note:
            out["model_note"] = note
    return out


def _read_audit(path: str | None) -> dict | None:
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
                "aucs": {"loss_threshold (trained model, train vs test)": float(trained["auc"]),
                         **{f"{n} (shadow models)": float(r["auc"]) for n, r in attacks.items() if "auc" in r}},
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
            "aucs": {f"{n} (shadow models)": float(r["auc"]) for n, r in attacks.items() if "auc" in r},
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
            "max_epsilon": float(s.max_epsilon),
            "remaining": float(s.remaining) if math.isfinite(s.remaining) else None,
            "accountant": s.accountant, "runs_committed": s.runs_committed,
            "runs_reserved": s.runs_reserved}, None


def _run_config(run_dir: str | os.PathLike) -> dict:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    return cfg if isinstance(cfg, dict) else {}


def with_run_config(run_dir: str | os.PathLike, record: RunSummary | Mapping[str, Any]) -> RunSummary:
    """The run's record, with the neighbouring relation of a record written before it was recorded taken from
    the run's own ``config.yaml`` (what the trainer ran with). Nothing is filled from a default: a relation
    found in neither stays ``None`` and the model card says it was not recorded."""
    s = RunSummary.coerce(record)
    if s.neighboring_relation is not None or not s.private:
        return s
    dp = (_run_config(run_dir).get("training") or {}).get("dp") or {}
    relation = dp.get("neighboring_relation") if isinstance(dp, dict) else None
    return s.replace(neighboring_relation=relation) if isinstance(relation, str) else s


def run_mechanism(run_dir: str | os.PathLike, metrics: RunSummary | Mapping[str, Any]) -> dict:
    """The mechanism of a run as the run recorded it: sampling, neighbouring relation, accountant, delta, steps
    (``None``: not recorded; the relation of an older record comes from its ``config.yaml``, see
    :func:`with_run_config`)."""
    s = with_run_config(run_dir, metrics)
    return {"sampling": s.sampling, "neighboring_relation": s.neighboring_relation if s.private else None,
            "accountant": s.accountant, "delta": s.delta, "steps": s.steps}


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
    return NOT_RECORDED if x is None else f"{x:.{digits}g}"


def _n(x: int | None) -> str:
    return NOT_RECORDED if x is None else str(x)


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
    """One sentence stating the mechanism and the ``(epsilon, delta)`` it provably satisfies (or that there is none).

    ``mp`` is the ``model_privacy`` section; every number and name in the sentence is one of its fields (taken from
    the run's record), and a field the record lacks reads "not recorded"."""
    if not mp.get("private"):
        return NO_GUARANTEE
    if mp.get("epsilon") is None:  # DP-SGD run with noise multiplier 0 (or an infinite epsilon): no guarantee
        return (f"Trained with clipped SGD but noise multiplier σ={_g(mp.get('noise_multiplier'))}: no finite "
                "epsilon holds (ε = ∞), so this model carries NO differential-privacy guarantee for its training "
                "data.")
    sampling, q = mp.get("sampling"), _g(mp.get("sample_rate"))
    if sampling == "poisson":
        how = f"Poisson sampling rate q={q}"
    elif sampling == "shuffle":
        how = f"shuffled fixed-size batches of {_g(mp.get('expected_batch_size'))}"
    elif sampling == "cyclic_poisson":
        how = (f"banded matrix-factorization noise with b={_n(mp.get('bands'))} bands, cyclic Poisson sampling of "
               f"{_n(mp.get('bands'))} groups at rate p={q}")
    elif sampling == "fixed_order":
        h, b = mp.get("horizon"), mp.get("min_separation")
        k = NOT_RECORDED if h is None or b is None else -(-int(h) // int(b))
        how = (f"buffered linear Toeplitz noise with d={_n(mp.get('buffers'))} buffers, one fixed secret order of "
               f"batches of {_g(mp.get('expected_batch_size'))}, each example in at most {k} steps "
               f"{_n(b)} steps apart, noise scaled for the planned {_n(h)} steps")
    elif sampling is None:
        how = f"sampling {NOT_RECORDED}"
    else:
        how = f"{sampling} sampling rate q={q}"
    from jaxdp.accounting.event import RELATION_LABELS
    rel = mp.get("neighboring_relation")
    relation = (f"under {RELATION_LABELS[rel]} neighbouring datasets" if rel in RELATION_LABELS else
                f"under neighbouring datasets (relation {NOT_RECORDED})")
    if sampling == "fixed_order" and rel == "add_remove":
        relation = "under zero-out neighbouring datasets (add/remove-one with the fixed participation schema)"
    acc = f"{mp['accountant'].upper()} accountant" if mp.get("accountant") else f"accountant {NOT_RECORDED}"
    label = mp.get("mechanism")
    name = label.split(" (")[0] if isinstance(label, str) and label in MECHANISM_LABELS.values() else \
        f"a mechanism that was {NOT_RECORDED}"
    return (f"Trained with {name} ({how}, noise multiplier σ={_g(mp.get('noise_multiplier'))}, "
            f"clip norm C={_g(mp.get('max_grad_norm'))}, T={_n(mp.get('steps'))} steps, "
            f"training set of {_n(mp.get('training_set_size'))} examples): for any one training example, "
            f"(ε={format_epsilon(mp['epsilon'])}, δ={_g(mp.get('delta'))})-differential privacy holds {relation} "
            f"({acc}).")


def build_model_privacy(run_dir: str | os.PathLike, *, audit: str | os.PathLike | None = None,
                        ledger: str | None = None, dataset_id: str | None = None,
                        metrics: RunSummary | Mapping[str, Any] | None = None) -> dict:
    """The ``model_privacy`` section (a JSON/YAML-ready dict) of the run in ``run_dir``.

    Args:
      run_dir: a ``jaxdp train`` run directory (``metrics.json``).
      audit: an ``audit_<attack>.json``; default: found in ``run_dir`` or ``run_dir/audit``.
      ledger, dataset_id: a privacy ledger and the dataset's id in it, for the dataset's total spent epsilon
        (all runs charged to it, composed). Default: the ``ledger.path`` / ``ledger.dataset_id`` of the run's
        ``config.yaml`` when it has them, and the run's dataset name as the id.
    """
    m = with_run_config(run_dir, metrics if metrics is not None else load_run(run_dir))
    private = m.private
    aud = read_audit(find_audit(run_dir, audit))
    one_run = read_one_run_audit(find_one_run_audit(run_dir))
    if ledger is None:  # the ledger the run itself was charged to (config.yaml's `ledger` section), if any
        ledger, dataset_id = _run_ledger(run_dir, dataset_id)
    led, led_why = ledger_total(ledger, dataset_id or m.dataset)
    mp: dict[str, Any] = {
        "private": private,
        "mechanism": (MECHANISM_LABELS[m.mechanism] if m.mechanism is not None else NOT_RECORDED) if private
        else "none (non-private SGD)",
        "bands": m.bands,
        **({"buffers": m.buffers} if m.buffers is not None else {}),
        **({"min_separation": m.min_separation, "horizon": m.horizon} if m.sampling == "fixed_order" else {}),
        "library": "jaxdp",
        "library_version": m.jaxdp_version,
        "epsilon": m.epsilon if private else None,
        "delta": m.delta if private else None,
        "target_epsilon": m.target_epsilon,
        "accountant": m.accountant,
        "neighboring_relation": m.neighboring_relation if private else None,
        "max_grad_norm": m.max_grad_norm,
        "noise_multiplier": m.noise_multiplier,
        "clipping_method": m.clipping_method,
        "sampling": m.sampling,
        "sample_rate": m.sample_rate,
        "expected_batch_size": m.expected_batch_size,
        "steps": m.steps,
        "epochs": m.epochs_run,
        "training_set_size": m.training_set_size,
        "dataset": m.dataset,
        "model": m.model,
        "run_id": m.run_id,
        "run_status": m.status,
        "config_hash": m.config_hash,
        "final_test_accuracy": m.final_test_accuracy,
        "membership_inference_auc": aud["auc"] if aud else None,
        "membership_inference_attack": aud["attack"] if aud and aud["auc"] is not None else None,
        "membership_inference": None if aud is None else {
            k: v for k, v in aud.items() if k != "roc"},
        "one_run_audit": one_run,
        "ledger_dataset_epsilon": led["epsilon"] if led else None,
        "ledger": led,
    }
    mp["guarantee"] = guarantee_sentence(mp)
    caveats = []
    if private:
        caveats += [CAVEAT_FURTHER_TRAINING, CAVEAT_PER_EXAMPLE, CAVEAT_TUNING]
        if m.status is None:
            caveats.append("The run's status was not recorded: whether it finished is unknown; epsilon is for the "
                           f"{_n(m.steps)} steps recorded.")
        elif m.status != "finished":
            caveats.append(f"The run's status is {m.status!r}: epsilon is for the {_n(m.steps)} steps "
                           "actually taken.")
        n = m.training_set_size
        if m.delta_at_least_one_over_n or (n and m.delta is not None and m.delta >= 1.0 / n):
            caveats.insert(0, f"delta = {m.delta} is not below 1/N = 1/{n} (trained with "
                              "training.dp.allow_large_delta): a mechanism that publishes one training example "
                              "in the clear meets this guarantee, so it does not protect individual examples.")
    else:
        caveats.append("No epsilon is stated because none holds; train with training.dp.enabled: true for a "
                       "guarantee.")
    if one_run is not None and one_run.get("passed") is False:
        caveats.append(f"The one-run audit FAILED: its empirical epsilon lower bound "
                       f"{_g(one_run.get('epsilon_lower_bound'))} exceeds the epsilon it checked "
                       f"({_g(one_run.get('claimed_epsilon'))}); the stated guarantee is not supported.")
    if private and m.neighboring_relation is None:
        caveats.append("The run did not record its neighbouring relation (add/remove-one or replace-one), so "
                       "the guarantee above does not say which datasets count as neighbours; re-train with a "
                       "current jaxdp to record it.")
    if aud is not None and aud.get("model_note"):
        caveats.append(aud["model_note"])
    if (aud is None or aud["auc"] is None) and one_run is None:
        caveats.append(CAVEAT_AUDIT)
    elif aud is not None and aud["auc"] is not None:
        caveats.append(CAVEAT_AUDIT_MEANING)
    if led is None:
        caveats.append(CAVEAT_LEDGER.format(why=led_why))
    mp["caveats"] = caveats
    return mp


# -- writing ---------------------------------------------------------------------------------------------------
_MARKDOWN = (".md", ".markdown")


def _split_front_matter(text: str, path) -> tuple[str, str] | None:
    """``(yaml, rest)`` of a Markdown file that starts with a ``---`` YAML front-matter block (Hugging Face model
    cards), ``rest`` starting at the closing ``---``; ``None`` when the file has no front matter."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n") != "---":
        return None
    for i in range(1, len(lines)):
        if lines[i].rstrip("\r\n") in ("---", "..."):
            return "".join(lines[1:i]), "".join(lines[i:])
    raise ValueError(f"{path}: the YAML front matter opened by '---' on line 1 is never closed by a '---' line")


def _set_top_level_key(text: str, key: str, block: str) -> str:
    """``text`` (YAML) with the top-level entry ``key`` replaced by ``block`` (or ``block`` appended), every other
    line -- comments, blank lines, quoting, flow style -- kept byte for byte."""
    lines = text.splitlines(keepends=True)
    head = re.compile(rf"""^(?:{re.escape(key)}|'{re.escape(key)}'|"{re.escape(key)}")\s*:""")
    start = next((i for i, line in enumerate(lines) if head.match(line)), None)
    if start is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        return text + sep + block

    def continues(line: str) -> bool:  # indented, or a block-sequence item at column 0 (`key:\n- a`)
        return line[:1] in (" ", "\t") or line.startswith("- ") or line.rstrip("\r\n") == "-"

    end = start + 1
    while end < len(lines):
        line = lines[end]
        if not line.strip() or continues(line):
            end += 1
            continue
        if line.startswith("#"):  # column-0 comments: part of the entry only if the entry goes on after them
            j = end
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith("#")):
                j += 1
            if j < len(lines) and continues(lines[j]):
                end = j
                continue
        break
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next entry stay there
        end -= 1
    return "".join(lines[:start]) + block + "".join(lines[end:])


def _relative_paths(section: Mapping[str, Any], card_dir: str) -> dict:
    """The section with the files it names (audit JSONs, a ledger file) relative to the card's folder, so that a
    card moved with its run keeps pointing at them."""
    out = json.loads(json.dumps(section, default=str))
    for sub, field in (("membership_inference", "file"), ("one_run_audit", "file"), ("ledger", "ledger")):
        d = out.get(sub)
        if isinstance(d, dict) and isinstance(d.get(field), str) and "://" not in d[field] \
                and os.path.isabs(d[field]):
            d[field] = os.path.relpath(d[field], card_dir)
    return out


def write_model_card(path: str | os.PathLike, section: Mapping[str, Any]) -> dict:
    """Set ``model_privacy`` in the model card at ``path`` (created if missing) and return the whole card.

    ``path`` is a YAML file, or a Markdown model card (``README.md`` of a Hugging Face repository) whose YAML
    front matter (between ``---`` lines) receives the section; the Markdown body is kept as is. Only the lines of
    the ``model_privacy`` entry change: every other key keeps its value, position, comments and formatting (the
    result is parsed back and compared; should a hand-written layout defeat the line edit, the card is rewritten
    from its parsed content instead, with a warning, since the comments could not be kept). Paths in the section
    are stored relative to the card's folder. The file is replaced atomically.
    """
    import warnings

    import yaml
    path = os.fspath(path)
    section = _relative_paths(section, os.path.dirname(os.path.abspath(path)))
    markdown = path.lower().endswith(_MARKDOWN)
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    front = _split_front_matter(text, path) if markdown else None
    if not markdown:
        yaml_text, rest = text, ""
    elif front is None:
        yaml_text, rest = "", "---\n" + text if text else "---\n"
    else:
        yaml_text, rest = front
    try:
        loaded = yaml.safe_load(yaml_text) if yaml_text.strip() else None
    except yaml.YAMLError as e:
        where = "front matter" if markdown else "YAML"
        raise ValueError(f"{path}: the model card's {where} is not valid YAML ({e})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a model card must be a YAML mapping at the top level, "
                         f"got {type(loaded).__name__}")
    card = dict(loaded)
    card[SECTION] = section  # replaces in place (keeps its position) or appends at the end
    block = yaml.safe_dump({SECTION: section}, sort_keys=False, allow_unicode=True, width=100)
    new_yaml = _set_top_level_key(yaml_text, SECTION, block)
    try:
        ok = yaml.safe_load(new_yaml) == card
    except yaml.YAMLError:
        ok = False
    if not ok:
        warnings.warn(f"{path}: could not replace {SECTION} line by line; the card is rewritten from its parsed "
                      "content (its comments and formatting are lost)", stacklevel=2)
        new_yaml = yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=100)
    atomic_write(path, "---\n" + new_yaml + rest if markdown else new_yaml)
    return card


__all__ = ["SECTION", "NOT_RECORDED", "MECHANISM_LABELS", "format_epsilon", "load_run", "load_metrics",
           "with_run_config", "find_audit", "read_audit", "find_one_run_audit",
           "read_one_run_audit", "ledger_total", "guarantee_sentence",
           "build_model_privacy", "run_mechanism", "write_model_card"]
