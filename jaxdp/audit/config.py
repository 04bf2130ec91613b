"""The audit's config: a ``jaxdp train`` config, checked with the trainer's own schema, plus an ``audit`` section.

The audit re-trains a run's recipe, so it reads the same config the trainer reads, by the same rules: an unknown
or misspelt key is an error that names it, never a silent fallback to a default (``optimizer.learning_rte`` used
to train the audit at a default learning rate). Keys of the audit's former, lenient format are refused with the
key to write instead (:data:`MOVED`).

``audit`` section (every key optional; see ``docs/audit.md``)::

    audit:
      attack: null          # loss_threshold | lira | one_run (else --attack)
      pool_size: null       # examples in the audit pool (default 200; one_run 300)
      data_seed: 0          # which pool examples are drawn
      steps: null           # audit this many steps instead of the run's (the claim follows, docs/audit.md)
      sample_rate: null     # audit this sample rate instead of the run's (the claim follows)
      clipping: true        # false: a DELIBERATELY BROKEN recipe without per-example clipping
      num_shadow: null      # shadow models (lira 16, loss_threshold 4)
      alpha: 0.05           # Clopper-Pearson error of the indicative epsilon
      canary: gradient      # one_run: gradient | input
      num_canaries: null    # one_run: default chosen from the claimed epsilon
      coordinates: data_free  # one_run gradient canaries: data_free | random
      k: null               # one_run guesses on each side (default m/4)
      beta: 0.05            # one_run: error probability of the lower bound
      canary_scale: 10      # one_run gradient-canary norm, in units of C (must exceed 1 to see missing clipping)
"""
from __future__ import annotations

import copy
import os
from typing import Any

from jaxdp.train.config import ConfigError, read_yaml, resolve_paths, validate_config

ATTACKS = ("loss_threshold", "lira", "one_run")

AUDIT_SCHEMA: dict[str, Any] = {
    "attack": None, "pool_size": None, "data_seed": 0, "steps": None, "sample_rate": None, "clipping": True,
    "num_shadow": None, "alpha": 0.05, "canary": "gradient", "num_canaries": None, "coordinates": "data_free",
    "k": None, "beta": 0.05, "canary_scale": 10.0,
}

# The audit's former lenient format -> what to write now (the trainer's key, or the audit section's).
MOVED: dict[str, str] = {
    "dataset": "data.name", "data.dataset": "data.name", "data.path": "data.name",
    "model.type": "model.name", "model.arch": "model.name", "model.kind": "model.name",
    **{f"model.{k}": "model.options.hidden" for k in ("hidden", "hidden_sizes", "features", "widths", "width")},
    "model.activation": "model.options.activation",
    "training.optimizer": "optimizer (a top-level section: optimizer.name, optimizer.learning_rate)",
    **{k: "optimizer.learning_rate" for k in ("optimizer.lr", "training.learning_rate", "training.lr",
                                              "learning_rate", "lr")},
    "training.steps": "training.epochs (the run's steps are ceil(epochs / q)), or audit.steps to audit other steps",
    "steps": "training.epochs, or audit.steps", "epochs": "training.epochs", "batch_size": "training.batch_size",
    "seed": "training.seed", "dp": "training.dp",
    "training.dp.clipping": "audit.clipping (a deliberately broken recipe is the audit's, not the trainer's)",
    "training.dp.l2_clip_norm": "training.dp.max_grad_norm", "training.dp.target_epsilon": "training.dp.epsilon",
    "audit.num_models": "audit.num_shadow",
}


def _has(raw: Any, path: str) -> bool:
    cur = raw
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return True


def _refuse_old_keys(raw: Any) -> None:
    if not isinstance(raw, dict):
        return
    for section in ("data", "model", "optimizer"):
        if isinstance(raw.get(section), str):
            raise ConfigError(f"config key '{section}' is a name ({raw[section]!r}); the audit reads trainer configs: "
                              f"write {section}: {{name: {raw[section]}}}")
    for old, new in MOVED.items():
        if _has(raw, old):
            raise ConfigError(f"config key '{old}' is not read any more: write {new}. The audit checks its config "
                              "with the trainer's schema (docs/trainer.md) plus an `audit:` section (docs/audit.md)")


def check_audit_section(section: Any) -> dict:
    """The ``audit`` section with its defaults filled in, or :class:`ConfigError` naming the bad key."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"config key 'audit' must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(AUDIT_SCHEMA))
    if unknown:
        hint = f" (write {MOVED['audit.' + unknown[0]]})" if f"audit.{unknown[0]}" in MOVED else ""
        raise ConfigError(f"unknown config key 'audit.{unknown[0]}'{hint}; allowed here: {sorted(AUDIT_SCHEMA)}")
    out = {k: copy.deepcopy(section.get(k, d)) for k, d in AUDIT_SCHEMA.items()}

    def number(key: str, integer: bool = False, low: float = 0.0, high: float | None = None,
               closed_high: bool = False) -> None:
        v = out[key]
        if v is None:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > low and (
            high is None or (v <= high if closed_high else v < high)) and (not integer or float(v).is_integer())
        if not ok:
            rng = f"> {low:g}" + ("" if high is None else f" and {'<=' if closed_high else '<'} {high:g}")
            raise ConfigError(f"config key 'audit.{key}' must be {'an integer' if integer else 'a number'} {rng}, "
                              f"got {v!r}")
        out[key] = int(v) if integer else float(v)

    for key in ("pool_size", "steps", "num_shadow", "num_canaries", "k"):
        number(key, integer=True)
    number("data_seed", integer=True, low=-1)
    number("sample_rate", high=1, closed_high=True)
    number("alpha", high=1)
    number("beta", high=1)
    number("canary_scale")
    from jaxdp.audit.one_run import CANARIES, COORDINATES
    for key, allowed in (("attack", ATTACKS + (None,)), ("canary", CANARIES), ("coordinates", COORDINATES)):
        if out[key] not in allowed:
            names = ", ".join(a for a in allowed if a)
            raise ConfigError(f"config key 'audit.{key}' must be one of {names}, got {out[key]!r}")
    if not isinstance(out["clipping"], bool):
        raise ConfigError(f"config key 'audit.clipping' must be true or false, got {out['clipping']!r}")
    return out


def validate_audit_config(raw: Any) -> dict:
    """A trainer config (raw or validated) checked with the trainer's schema, plus the checked ``audit`` section.

    A config that sets ``training.dp.noise_multiplier`` and no ``training.dp.epsilon`` has no target: its
    ``epsilon`` is ``None`` here (not the trainer's default target 3), so the audit checks the accountant's
    epsilon of the noise (or the run record's), never a default.

    Raises:
      ConfigError: an unknown, misspelt or old-format key, or a bad value (the message names the key).
    """
    _refuse_old_keys(raw)
    dp = ((raw or {}).get("training") or {}).get("dp") if isinstance(raw, dict) else None
    no_target = isinstance(dp, dict) and dp.get("noise_multiplier") is not None and "epsilon" not in dp
    cfg = validate_config(copy.deepcopy(raw), sections={"audit": check_audit_section})
    if no_target:
        cfg["training"]["dp"]["epsilon"] = None
    return cfg


def load_audit_config(path: str | os.PathLike) -> dict:
    """:func:`validate_audit_config` of a YAML file (a trainer config, optionally with an ``audit`` section)."""
    raw = read_yaml(path)
    try:
        cfg = validate_audit_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return resolve_paths(cfg, path)


__all__ = ["ATTACKS", "AUDIT_SCHEMA", "MOVED", "check_audit_section", "validate_audit_config", "load_audit_config"]
