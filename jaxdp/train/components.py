"""What a trainer config names, built: the optimiser (any optax optimiser, weight decay, a learning-rate
schedule) and the model (a built-in one, or the user's own Flax NNX module given as ``"pkg.mod:Class"``).

Privacy: none of this touches the data. The optimiser receives the already clipped, noised and averaged gradient
(post-processing), so weight decay and schedules cost no privacy; a schedule is a function of the step count only.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence

TOTAL_STEPS = "total_steps"  # a schedule option with this value becomes the run's planned number of steps


class ComponentError(ValueError):
    """A config names an optimiser, schedule or model that cannot be built; the message names the key."""


def _optax_callable(name: str, key: str) -> Callable:
    import optax
    fn = getattr(optax, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not callable(fn):
        raise ComponentError(f"config key '{key}': optax has no {name!r}; use an optax function name such as "
                             "sgd, adam, adamw, lamb, lion, rmsprop, adafactor (see the optax documentation)")
    return fn


def build_schedule(learning_rate: float, schedule: dict | None, total_steps: int):
    """``learning_rate`` (constant) or the optax schedule ``schedule = {name: ..., <its options>}``.

    The schedule's ``init_value`` defaults to ``learning_rate``; an option set to ``"total_steps"`` becomes the
    run's planned number of steps (e.g. ``decay_steps: total_steps`` for a cosine decay over the whole run).
    """
    if not schedule:
        return learning_rate
    opts = dict(schedule)
    name = opts.pop("name", None)
    if name is None:
        raise ComponentError("config key 'optimizer.schedule' needs a name, e.g. "
                             "{name: cosine_decay_schedule, decay_steps: total_steps}")
    fn = _optax_callable(name, "optimizer.schedule.name")
    opts = {k: (int(total_steps) if v == TOTAL_STEPS else v) for k, v in opts.items()}
    params = inspect.signature(fn).parameters
    if "init_value" in params and "init_value" not in opts:
        opts["init_value"] = learning_rate
    try:
        sched = fn(**opts)
    except (TypeError, ValueError) as e:
        raise ComponentError(f"config key 'optimizer.schedule': optax.{name}({', '.join(opts)}) failed: {e}") from None
    if not callable(sched):
        raise ComponentError(f"config key 'optimizer.schedule.name': optax.{name} is not a schedule")
    return sched


def build_optimizer(o: dict, total_steps: int = 1):
    """The optax optimiser of the config's ``optimizer`` section.

    ``name``: ``sgd``, ``momentum`` (sgd with ``momentum``), or any optax optimiser function (``adam``,
    ``adamw``, ``lamb``, ...), called with the learning rate (or schedule) and ``options``. ``weight_decay``:
    passed to optimisers that take it (adamw, lamb, ...), otherwise applied as ``optax.add_decayed_weights``
    before the optimiser (decoupled L2 decay of the parameters, not of the private gradient).
    """
    import optax
    lr = build_schedule(o["learning_rate"], o.get("schedule"), total_steps)
    name, opts = o["name"], dict(o.get("options") or {})
    wd = o.get("weight_decay") or 0.0
    if name == "momentum":
        fn, opts = optax.sgd, dict({"momentum": o.get("momentum", 0.9)}, **opts)
    else:
        fn = _optax_callable(name, "optimizer.name")
    params = inspect.signature(fn).parameters
    takes_wd = "weight_decay" in params
    if wd and takes_wd:
        opts.setdefault("weight_decay", wd)
    try:
        tx = fn(lr, **opts)
    except (TypeError, ValueError) as e:
        raise ComponentError(f"config key 'optimizer': optax.{name}(learning_rate, {', '.join(opts)}) failed: {e}; "
                             "put the optimiser's own arguments under optimizer.options") from None
    if not isinstance(tx, optax.GradientTransformation):
        raise ComponentError(f"config key 'optimizer.name': optax.{name} is not an optimiser "
                             f"(it returned {type(tx).__name__}, not a GradientTransformation)")
    if wd and not takes_wd:
        tx = optax.chain(optax.add_decayed_weights(wd), tx)
    return tx


def _import(spec: str, base_dir: str | None):
    """``"pkg.mod:Class"`` or ``"path/to/file.py:Class"`` (relative to ``base_dir``, the config's folder, or the
    working directory) -> the object."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ComponentError(f"config key 'model.module' must look like 'package.module:ClassName' or "
                             f"'file.py:ClassName', got {spec!r}")
    mod_name, attr = spec.split(":")
    dirs = [d for d in (base_dir, os.getcwd()) if d]
    if mod_name.endswith(".py"):
        path = next((os.path.join(d, mod_name) for d in dirs if os.path.isfile(os.path.join(d, mod_name))),
                    mod_name if os.path.isfile(mod_name) else None)
        if path is None:
            raise ComponentError(f"config key 'model.module': no file {mod_name!r} (looked in {dirs})")
        modspec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if modspec is None or modspec.loader is None:
            raise ComponentError(f"config key 'model.module': {path!r} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(modspec)
        modspec.loader.exec_module(module)
    else:
        added = [d for d in dirs if d not in sys.path]
        sys.path[:0] = added
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ComponentError(f"config key 'model.module': cannot import {mod_name!r} ({e}); the module must "
                                 "be importable from the config's folder, the working directory or "
                                 "PYTHONPATH") from None
        finally:
            for d in added:
                sys.path.remove(d)
    if not hasattr(module, attr):
        raise ComponentError(f"config key 'model.module': {mod_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def build_user_model(spec: str, kwargs: dict, input_shape: Sequence[int], num_classes: int, seed: int,
                     base_dir: str | None = None):
    """The user's own Flax NNX module ``spec`` built as ``Class(**kwargs, rngs=nnx.Rngs(seed))``; ``input_shape``
    and ``num_classes`` are passed too when its constructor has parameters of those names (and ``kwargs`` does
    not set them). The model must map a batch ``[B, *input_shape]`` to logits ``[B, num_classes]``."""
    from flax import nnx
    cls = _import(spec, base_dir)
    if not (inspect.isclass(cls) and issubclass(cls, nnx.Module)):
        raise ComponentError(f"config key 'model.module': {spec} is not a Flax NNX module class (nnx.Module); "
                             "wrap a Linen module with nnx.bridge.ToNNX, or use the Python API for other models")
    kw = dict(kwargs or {})
    params = inspect.signature(cls.__init__).parameters
    if "input_shape" in params:
        kw.setdefault("input_shape", tuple(input_shape))
    if "num_classes" in params:
        kw.setdefault("num_classes", int(num_classes))
    build: Callable[..., nnx.Module] = cls   # the user's constructor (nnx.Module's own takes no arguments)
    try:
        return build(**kw, rngs=nnx.Rngs(seed))
    except TypeError as e:
        raise ComponentError(f"config key 'model.kwargs': {spec}({', '.join(kw)}, rngs=...) failed: {e}") from None


__all__ = ["ComponentError", "TOTAL_STEPS", "build_optimizer", "build_schedule", "build_user_model"]
