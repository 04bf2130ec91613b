"""Trainer configuration: a YAML file checked against a schema; unknown or missing keys are errors that name
the key (a typo such as ``max_grad_nrom`` must never silently fall back to a default).

Schema (``REQUIRED`` keys must be present, others have the defaults shown)::

    model:
      name: cnn_small            # cnn_small | mlp | logreg | mnist_cnn | gabor_mlp (MLP on fixed Gabor features)
      options: {}                # passed to the model (e.g. hidden: [128] for mlp)
      module: null               # OR your own Flax NNX module: "pkg.mod:Class" or "file.py:Class" (instead of
      kwargs: {}                 #   name/options), built as Class(**kwargs, rngs=...); it gets input_shape and
                                 #   num_classes too when its constructor takes them; it must return logits [B, K]
    data:
      name: digits               # "digits" (embedded) | path to .npz / .csv / MNIST IDX directory
      options: {}                # loader options; CSV: label_column, test_fraction, seed, scale, standardize
                                 #   (standardize: {mean: [...], std: [...]} or {public_csv: FILE}: PUBLIC
                                 #   statistics only -- statistics of the private data would leak it)
    optimizer:
      name: sgd                  # sgd | momentum | any optax optimiser (adam, adamw, lamb, lion, rmsprop, ...)
      learning_rate: REQUIRED    # initial value of the schedule when there is one
      momentum: 0.9              # for momentum
      weight_decay: 0.0          # decoupled weight decay (the optimiser's own when it takes one, e.g. adamw)
      schedule: {}               # optax schedule, e.g. {name: cosine_decay_schedule, decay_steps: total_steps}
      options: {}                # other arguments of the optax optimiser (e.g. b1, b2, nesterov)
    training:
      epochs: REQUIRED
      batch_size: REQUIRED       # expected batch size (Poisson sampling rate q = batch_size / N)
      seed: null                 # batch selection, noise and initialisation; null = drawn from the OS (kept in
                                 #   the checkpoint for resume); pin an int only to reproduce a run, keep it secret
      accountant: prv            # prv | rdp | pld
      sampling: poisson          # poisson | shuffle (shuffle is accounted as fixed-size sampling)
      mechanism: dpsgd           # dpsgd | bandmf (banded matrix-factorization noise, cyclic Poisson sampling)
                                 #   | blt (buffered linear Toeplitz noise, fixed secret batch order, one
                                 #   Gaussian mechanism for the planned steps; stops there)
      bands: null                # bandmf: number of bands b (noise state b x |params|; needs b * batch_size <= N)
      buffers: null              # blt: number of buffers d (noise state d x |params|)
      method: auto               # clipping method: auto | vmap | ghost | a registered per-example backend
      microbatch_size: null      # physical batch for per-example gradients (memory bound)
      dp:
        enabled: true
        epsilon: 3.0             # target epsilon (with noise_multiplier null: calibrate to it)
        delta: 1e-5              # must be < 1/N (refused otherwise)
        allow_large_delta: false # experts only: accept delta >= 1/N (recorded in metrics.json and the card)
        max_grad_norm: 1.0       # clip norm C (the total C with per_layer rules; the initial C with adaptive)
        noise_multiplier: null   # null = calibrate from epsilon
        per_layer: null          # per-layer clipping: {layer: C_k, ...} naming every layer of the model, or a
                                 # rule splitting max_grad_norm: equal (C/sqrt(K)) | by_size (C sqrt(d_k/d))
        adaptive: null           # adaptive clipping: true, or {target_quantile: 0.5, learning_rate: 0.2,
                                 # count_noise_std: null (= batch_size/20), normalize: true}; docs/adaptive.md
        neighboring_relation: add_remove   # add_remove | replace_one (shuffle sampling needs replace_one)
    ledger:
      path: null                 # privacy ledger (SQLite path or postgresql:// URL); default $JAXDP_LEDGER
      dataset_id: null           # the dataset's id in the ledger (default: data.name)
      run_id: null               # use this run id (e.g. one reserved with `jaxdp ledger reserve`)
      reserve: true              # reserve the planned steps before the first step (else: must be reserved)
      parent_run_id: null        # fine-tuning: the run that trained the starting model (charged to its data)
    output:
      dir: runs/run              # metrics.json, checkpoint, config.yaml are written here
      checkpoint_every: 1        # epochs between checkpoints
      progress: true             # live progress bar on stderr
      telemetry_port: null       # serve Prometheus metrics on this port (needs the telemetry extra)
      pushgateway: null          # or push them to this Prometheus Pushgateway URL
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any
from collections.abc import Callable, Mapping

REQUIRED = object()

SCHEMA: dict[str, Any] = {
    "model": {"name": "cnn_small", "options": {}, "module": None, "kwargs": {}},
    "data": {"name": "digits", "options": {}},
    "optimizer": {"name": "sgd", "learning_rate": REQUIRED, "momentum": 0.9, "weight_decay": 0.0, "schedule": {},
                  "options": {}},
    "training": {
        "epochs": REQUIRED, "batch_size": REQUIRED, "seed": None, "accountant": "prv",
        "sampling": "poisson", "method": "auto", "microbatch_size": None, "mechanism": "dpsgd", "bands": None,
        "buffers": None,
        "dp": {"enabled": True, "epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": None,
               "neighboring_relation": "add_remove", "per_layer": None, "adaptive": None,
               "allow_large_delta": False},
    },
    "ledger": {"path": None, "dataset_id": None, "run_id": None, "reserve": True, "parent_run_id": None},
    "output": {"dir": "runs/run", "checkpoint_every": 1, "progress": True, "telemetry_port": None,
               "pushgateway": None},
}
_FREE_FORM = {"model.options", "model.kwargs", "data.options", "optimizer.schedule", "optimizer.options"}
# Keys added after configs were first written: left out of the config hash while they hold their default, so a
# run written before they existed still resumes.
_HASH_OMIT_IF_DEFAULT = ("model.module", "model.kwargs", "optimizer.weight_decay", "optimizer.schedule",
                         "optimizer.options", "training.mechanism", "training.bands",
                         "training.buffers")


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def _merge(schema: dict, given: Any, prefix: str) -> dict:
    if not isinstance(given, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {type(given).__name__}")
    unknown = set(given) - set(schema)
    if unknown:
        key = sorted(unknown)[0]
        where = f"{prefix}.{key}" if prefix else key
        raise ConfigError(f"unknown config key '{where}'; allowed here: {sorted(schema)}")
    out = {}
    for key, default in schema.items():
        where = f"{prefix}.{key}" if prefix else key
        if where in _FREE_FORM:
            value = given.get(key, {}) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' must be a mapping")
            out[key] = copy.deepcopy(value)
        elif isinstance(default, dict):
            out[key] = _merge(default, given.get(key, {}) or {}, where)
        elif key in given:
            out[key] = given[key]
        elif default is REQUIRED:
            raise ConfigError(f"missing required config key '{where}'")
        else:
            out[key] = copy.deepcopy(default)
    return out


def _check_values(cfg: dict) -> None:
    t, dp = cfg["training"], cfg["training"]["dp"]

    def num(where: str, value: Any, positive: bool = True, integer: bool = False) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if integer:
            ok = ok and float(value).is_integer()
        if not ok or (positive and value <= 0) or (not positive and value < 0):
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"config key '{where}' must be {kind} {'> 0' if positive else '>= 0'}, "
                              f"got {value!r}")

    num("optimizer.learning_rate", cfg["optimizer"]["learning_rate"])
    num("training.epochs", t["epochs"])
    num("training.batch_size", t["batch_size"])
    if t["seed"] is not None:
        num("training.seed", t["seed"], positive=False, integer=True)
    if cfg["model"]["module"] is None:
        from jaxdp.models import MODELS
        if cfg["model"]["name"] not in MODELS:
            raise ConfigError(f"config key 'model.name' must be one of {sorted(MODELS)}, got "
                              f"{cfg['model']['name']!r}; or name your own Flax module with model.module: "
                              "'pkg.mod:Class'")
    num("optimizer.weight_decay", cfg["optimizer"]["weight_decay"], positive=False)
    from jaxdp.accounting.event import ACCOUNTANTS, RELATIONS
    if t["accountant"] not in ACCOUNTANTS:
        raise ConfigError(f"config key 'training.accountant' must be one of {', '.join(ACCOUNTANTS)}, got "
                          f"{t['accountant']!r}")
    if t["sampling"] not in ("poisson", "shuffle"):
        raise ConfigError(f"config key 'training.sampling' must be poisson or shuffle, got {t['sampling']!r}")
    from jaxdp.train.components import ComponentError, build_optimizer
    try:
        build_optimizer(cfg["optimizer"], total_steps=1)  # the names and arguments exist (no data is involved)
    except ComponentError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(dp["enabled"], bool):
        raise ConfigError(f"config key 'training.dp.enabled' must be true or false, got {dp['enabled']!r}")
    if dp["enabled"]:
        num("training.dp.max_grad_norm", dp["max_grad_norm"])
        num("training.dp.delta", dp["delta"])
        if dp["delta"] >= 1:
            raise ConfigError(f"config key 'training.dp.delta' must be < 1, got {dp['delta']}")
        if not isinstance(dp["allow_large_delta"], bool):
            raise ConfigError("config key 'training.dp.allow_large_delta' must be true or false, "
                              f"got {dp['allow_large_delta']!r}")
        if dp["noise_multiplier"] is None:
            if dp["epsilon"] is None:
                raise ConfigError("config keys 'training.dp.epsilon' and 'training.dp.noise_multiplier' are both "
                                  "null: give a target epsilon (to calibrate the noise) or a noise multiplier")
            num("training.dp.epsilon", dp["epsilon"])
        else:
            num("training.dp.noise_multiplier", dp["noise_multiplier"], positive=False)
            if dp["epsilon"] is not None:
                num("training.dp.epsilon", dp["epsilon"])
    if dp["neighboring_relation"] not in RELATIONS:
        raise ConfigError(f"config key 'training.dp.neighboring_relation' must be one of {', '.join(RELATIONS)}, "
                          f"got {dp['neighboring_relation']!r}")
    if dp["enabled"] and t["sampling"] == "shuffle" and dp["neighboring_relation"] != "replace_one":
        raise ConfigError("config key 'training.dp.neighboring_relation' must be replace_one with "
                          "training.sampling: shuffle (fixed-size batches have no add/remove-one analysis); "
                          "or use sampling: poisson")
    if dp["enabled"] and t["sampling"] == "shuffle" and dp["noise_multiplier"] is None:
        raise ConfigError("config key 'training.dp.noise_multiplier' must be set with training.sampling: shuffle "
                          "(calibration to a target epsilon is for Poisson sampling)")
    if not isinstance(t["method"], str):   # the name is checked against the registered backends by the trainer
        raise ConfigError(f"config key 'training.method' must be a name such as auto, vmap or ghost, "
                          f"got {t['method']!r}")
    if t["microbatch_size"] is not None:
        num("training.microbatch_size", t["microbatch_size"], integer=True)
    if t["mechanism"] not in ("dpsgd", "bandmf", "blt"):
        raise ConfigError(f"config key 'training.mechanism' must be dpsgd, bandmf or blt, got {t['mechanism']!r}")
    if t["mechanism"] == "blt":
        if t["buffers"] is None:
            raise ConfigError("config key 'training.buffers' must be set (an integer >= 1, 2-4 is typical) with "
                              "mechanism: blt")
        num("training.buffers", t["buffers"], integer=True)
        num("training.batch_size", t["batch_size"], integer=True)
        if t["sampling"] != "poisson":
            raise ConfigError("config key 'training.sampling' must be left at poisson with mechanism: blt (it uses "
                              "its own fixed secret batch order, recorded as sampling fixed_order)")
        if dp["neighboring_relation"] != "add_remove":
            raise ConfigError("config key 'training.dp.neighboring_relation' must be add_remove with mechanism: blt "
                              "(zero-out: add/remove one example with a fixed participation schema)")
        if dp["adaptive"]:
            raise ConfigError("config key 'training.dp.adaptive' is for mechanism: dpsgd; remove it or set mechanism")
    elif t["buffers"] is not None:
        raise ConfigError("config key 'training.buffers' is for mechanism: blt; remove it or set mechanism")
    if t["mechanism"] == "bandmf":
        if t["bands"] is None:
            raise ConfigError("config key 'training.bands' must be set (an integer >= 1) with mechanism: bandmf")
        num("training.bands", t["bands"], integer=True)
        if t["sampling"] != "poisson":
            raise ConfigError("config key 'training.sampling' must be poisson with mechanism: bandmf (it uses "
                              "cyclic Poisson sampling over `bands` groups)")
    elif t["bands"] not in (None, 1):
        raise ConfigError("config key 'training.bands' is for mechanism: bandmf; remove it or set mechanism")
    if t["mechanism"] == "bandmf" and dp["adaptive"]:
        raise ConfigError("config key 'training.dp.adaptive' is for mechanism: dpsgd; remove it or set mechanism")
    _check_clipping(dp)


def _check_clipping(dp: dict) -> None:
    """``training.dp.per_layer`` and ``training.dp.adaptive`` (the group names are checked against the model
    by the trainer, which knows them)."""
    per_layer, ada = dp["per_layer"], dp["adaptive"]
    if per_layer is not None:
        if isinstance(per_layer, str):
            if per_layer not in ("equal", "by_size"):
                raise ConfigError("config key 'training.dp.per_layer' must be a mapping {layer: clip norm} or "
                                  f"one of the rules equal, by_size; got {per_layer!r}")
        elif isinstance(per_layer, dict) and per_layer:
            for k, v in per_layer.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    raise ConfigError(f"config key 'training.dp.per_layer.{k}' must be a number > 0, got {v!r}")
        else:
            raise ConfigError("config key 'training.dp.per_layer' must be a non-empty mapping {layer: clip norm} "
                              f"or one of the rules equal, by_size; got {per_layer!r}")
    if ada is None or ada is False:
        return
    if ada is True:
        ada = {}
    if not isinstance(ada, dict):
        raise ConfigError(f"config key 'training.dp.adaptive' must be true, null or a mapping, got {ada!r}")
    from jaxdp.adaptive import AdaptiveClipConfig
    allowed = AdaptiveClipConfig._field_defaults
    unknown = sorted(set(ada) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown config key 'training.dp.adaptive.{unknown[0]}'; allowed here: {sorted(allowed)}")
    for k in ("target_quantile", "learning_rate", "count_noise_std"):
        v = ada.get(k, allowed[k])
        if v is None and k == "count_noise_std":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "target_quantile" and v > 1):
            bound = "in [0, 1]" if k == "target_quantile" else ">= 0"
            raise ConfigError(f"config key 'training.dp.adaptive.{k}' must be a number {bound}, got {v!r}")
    if not isinstance(ada.get("normalize", True), bool):
        raise ConfigError("config key 'training.dp.adaptive.normalize' must be true or false, "
                          f"got {ada['normalize']!r}")
    if per_layer is not None:
        raise ConfigError("config keys 'training.dp.adaptive' and 'training.dp.per_layer' cannot be combined: "
                          "adaptive clipping adapts one flat clip norm")


def _yaml_numbers(obj: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` as a string; turn such strings into floats."""
    if isinstance(obj, dict):
        return {k: _yaml_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_numbers(v) for v in obj]
    if isinstance(obj, str):
        try:
            return float(obj) if any(c in obj for c in "eE.") and obj.strip()[0] in "0123456789.-+" else obj
        except ValueError:
            return obj
    return obj


def validate_config(raw: dict, *, sections: Mapping[str, Callable[[Any], dict]] | None = None) -> dict:
    """Return the full config (defaults filled in) or raise :class:`ConfigError` naming the bad key.

    ``sections`` lets another tool that reads trainer configs (``jaxdp audit``) add its own top-level section:
    ``{name: check}``, where ``check(value_or_None)`` returns the section with its defaults filled in or raises
    :class:`ConfigError`. Every other key is checked exactly as for the trainer.
    """
    raw = _yaml_numbers(raw or {})
    extra: dict[str, Any] = {}
    if sections and isinstance(raw, dict):
        raw = dict(raw)
        for name, check in sections.items():
            extra[name] = check(raw.pop(name, None))
    cfg = _merge(SCHEMA, raw, "")
    if cfg["model"]["module"] is not None:
        given = raw.get("model") or {}
        clash = [k for k in ("name", "options") if given.get(k)]
        if clash:
            raise ConfigError(f"config key 'model.{clash[0]}' cannot be used with model.module (your own module "
                              "takes its arguments from model.kwargs)")
        cfg["model"]["name"] = None
    _check_values(cfg)
    cfg.update(extra)
    return cfg


def model_label(cfg: dict) -> str:
    """How the config's model is named in metrics, ledgers and model cards: the built-in name or the module.

    A module given by file is named by the file's name (``mymodel.py:Net``), never by its absolute path: the
    label is published in model cards and must not depend on (or reveal) where the checkout lives.

    >>> model_label({"model": {"module": "/home/me/proj/mymodel.py:Net", "name": "cnn_small"}})
    'mymodel.py:Net'
    >>> model_label({"model": {"module": None, "name": "mlp"}})
    'mlp'
    """
    module = cfg["model"]["module"]
    if not module:
        return cfg["model"]["name"]
    return _module_file_name(str(module))


def read_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML of a config file (a missing file or bad YAML is an error naming the file)."""
    import yaml
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None


def load_config(path: str | os.PathLike, *, sections: Mapping[str, Callable[[Any], dict]] | None = None) -> dict:
    """The validated config of a YAML file (see :func:`validate_config`; ``sections``: extra top-level sections
    of another tool, e.g. the audit's). A ``model.module: "file.py:Class"`` is resolved next to the file.

    Raises:
      FileNotFoundError: no such file.
      ConfigError: bad YAML, or a key that is unknown, missing or has a bad value (the message names it).
    """
    return resolve_paths(validate_config(read_yaml(path), sections=sections), path)


def resolve_paths(cfg: dict, path: str | os.PathLike) -> dict:
    """``model.module: "file.py:Class"`` made absolute when the file lies next to the config file ``path``."""
    module = cfg["model"]["module"]
    if isinstance(module, str) and module.count(":") == 1 and module.split(":")[0].endswith(".py"):
        file, cls = module.split(":")
        near = os.path.join(os.path.dirname(os.path.abspath(path)), file)
        if not os.path.isabs(file) and os.path.isfile(near):  # "file.py:Class" is relative to the config
            cfg["model"]["module"] = f"{near}:{cls}"
    return cfg


def config_hash(cfg: Any) -> str:
    """SHA-256 of a config in canonical form: the one config hash of jaxdp (the trainer's checkpoints and
    ``run.json``, ``metrics.json``, and the ledger's reservations all record this one).

    A trainer config (a mapping whose top-level keys are trainer sections) is validated first, so the raw YAML
    dict and the validated config (defaults filled in) hash the same; its ``output`` section (where files go)
    and any other tool's section (``audit``) are left out, and so are keys added after configs were first
    written while they hold their default (old runs keep their hash). A ``model.module`` given by file
    (``"file.py:Class"``, which :func:`load_config` makes absolute) is hashed by the file's name and class
    (``file.py:Class``, as :func:`model_label` names it), never by its directory: the hash of a run does not
    depend on where the checkout lives, so a moved or re-cloned checkout resumes its runs. (The file's name, not
    its path relative to the config: a run directory's own ``config.yaml``, which :meth:`DPTrainer.load` reads,
    names the module by its absolute path and must hash as the config it was trained from. Two module files of
    the same name and class in different folders therefore hash the same.) Any other JSON-able object (another
    tool's config) is hashed as its canonical JSON.

    Migration: before this rule the absolute path was hashed. :func:`config_hashes` gives both computations;
    a checkpoint, ``run.json`` or ledger reservation recorded with either is the same config (a run written
    before the rule resumes where it was written, and keeps its recorded hash and run id).

    Raises:
      ConfigError: a trainer config with a bad key or value (a config that cannot run has no hash).

    Example:
      >>> raw = {"optimizer": {"learning_rate": 0.1}, "training": {"epochs": 1, "batch_size": 64}}
      >>> config_hash(raw) == config_hash(validate_config(raw))
      True
      >>> here = dict(raw, model={"module": "/home/me/proj/net.py:Net"})
      >>> config_hash(here) == config_hash(dict(raw, model={"module": "/srv/clone/net.py:Net"}))
      True
    """
    return config_hashes(cfg)[0]


def config_hashes(cfg: Any) -> tuple[str, ...]:
    """The hashes that identify ``cfg``: :func:`config_hash` first, then (when it differs) the legacy hash of
    the same config with a module file named by its full path as given (the computation before the hash was
    made location-independent). A recorded hash in this tuple names this config; any other, another config."""
    body, trainer = _hash_body(cfg)
    module = body["model"].get("module") if trainer else None
    if not isinstance(module, str) or _module_file_name(module) == module:
        return (_digest(body),)
    legacy = _digest(body)
    body["model"]["module"] = _module_file_name(module)   # body is a validated copy: the caller's cfg is intact
    return (_digest(body), legacy)


def _hash_body(cfg: Any) -> tuple[Any, bool]:
    """The config as hashed (the module path still as given; see :func:`config_hash`) and whether it is a
    trainer config (then a fresh validated copy)."""
    if not isinstance(cfg, Mapping):
        return cfg, False
    body = {k: v for k, v in cfg.items() if k not in _NOT_HASHED}
    if not (body and set(body) <= set(SCHEMA)):
        return body, False
    body = {k: v for k, v in validate_config(copy.deepcopy(body)).items() if k not in _NOT_HASHED}
    for where in _HASH_OMIT_IF_DEFAULT:
        section, key = where.split(".")
        if key in body[section] and body[section][key] == SCHEMA[section][key]:
            del body[section][key]
    return body, True


def _module_file_name(module: str) -> str:
    """``"/any/dir/file.py:Class"`` -> ``"file.py:Class"``; a ``"package.module:Class"`` is returned as is."""
    file, sep, cls = module.rpartition(":")
    if sep and file.endswith(".py"):
        return f"{os.path.basename(file)}:{cls}"
    return module


def _digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


_NOT_HASHED = ("output", "audit")   # where files go, and the audit's own settings: not part of a run's identity


_EXAMPLE_VALUES = {"learning_rate": "0.1", "epochs": "10", "batch_size": "256"}


def example_config() -> str:
    """A commented example config with every key (the schema above, required keys filled with example values);
    ``jaxdp config --example`` prints it. It validates as is."""
    import textwrap
    doc = __doc__.split("Schema", 1)[1].split("::", 1)[1]
    lines = []
    for line in textwrap.dedent(doc.strip("\n")).rstrip().splitlines():
        if "REQUIRED" in line:
            key = line.split(":", 1)[0].strip()
            line = line.replace("REQUIRED", _EXAMPLE_VALUES[key] + " " * (8 - len(_EXAMPLE_VALUES[key])), 1)
            line = line.rstrip() + "  (required)" if "#" in line else line + "  # required"
        lines.append(line.rstrip())
    head = ("# jaxdp train config: every key with its default. Keys marked (required) must be given; the values\n"
            "# shown for them are examples. Delete what you do not change.\n")
    return head + "\n".join(lines) + "\n"

__all__ = ["SCHEMA", "ConfigError", "validate_config", "load_config", "read_yaml", "config_hash", "config_hashes",
           "model_label", "example_config"]
