"""Model validation: find layers whose output for one example depends on other examples in the batch.

DP-SGD's guarantee rests on each example's gradient depending on that example alone: the sum of clipped
gradients then changes by at most ``C`` when one example is added or removed. Batch normalisation breaks this
(the batch mean and variance mix all examples; privacy rule 8). :func:`validate` lists such layers with the fix
for each; :func:`fix` replaces BatchNorm by GroupNorm with ``gcd(32, channels)`` groups (Opacus's choice) in
Flax NNX models. Linen modules define submodules inside ``__call__``, so they cannot be rewritten from outside:
:func:`fix` then raises an error that says what to change in the code.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import linen as nn
from flax import nnx
from jaxdp import _nnx

# Layer types that compute statistics across the batch axis.
_NNX_BATCH_LAYERS = (nnx.BatchNorm,)
_LINEN_BATCH_LAYERS = (nn.BatchNorm,)


class ModelValidationError(ValueError):
    """The model mixes examples within a batch; the message lists each layer and its fix."""


@dataclasses.dataclass(frozen=True)
class ValidationIssue:
    path: str
    layer: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path} ({self.layer}): {self.problem} Fix: {self.fix}"


def _groups(channels: int) -> int | None:
    """GroupNorm groups replacing a BatchNorm over ``channels`` features: ``gcd(32, C)`` (Opacus's choice) unless
    that leaves one feature per group, then the most groups (<= 32) with at least two features each; ``None``
    for ``C = 1``.

    A group of one feature is normalised by its own mean and variance: for a Dense layer's ``[B, C]`` output
    (no spatial axes) that is ``(x - x) / sqrt(0 + eps) = 0``, a constant model (Dense(32) + BatchNorm would get
    32 groups of one feature)."""
    c = int(channels)
    g = math.gcd(32, c)
    if c // g >= 2:
        return g
    fits = [d for d in range(1, min(32, c // 2) + 1) if c % d == 0]
    return max(fits) if fits else None


def _issue(path: str, layer: str, channels: int | None) -> ValidationIssue:
    problem = ("batch normalisation uses the mean and variance of the whole batch, so one example's gradient "
               "depends on the others and the clipping bound no longer limits its influence.")
    if not channels:
        fix = ("replace it with GroupNorm(num_groups=gcd(32, channels), at least 2 channels per group) "
               "(jaxdp.fix does this for NNX models), LayerNorm, or remove it.")
    elif _groups(channels) is None:
        fix = ("remove it: it normalises a single feature, and a per-example GroupNorm or LayerNorm of one "
               "feature is constant.")
    else:
        fix = (f"replace it with GroupNorm(num_groups={_groups(channels)}) (jaxdp.fix does this for NNX "
               "models), LayerNorm, or remove it.")
    return ValidationIssue(path or "<root>", layer, problem, fix)


def _linen_issues(model: nn.Module, variables: Any, sample_input: Any = None) -> list[ValidationIssue]:
    issues: list[ValidationIssue] = []
    if sample_input is not None:
        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if isinstance(mod, _LINEN_BATCH_LAYERS) and context.method_name == "__call__":
                x = args[0] if args else None
                channels = x.shape[-1] if hasattr(x, "shape") else None
                issue = _issue("/".join(mod.scope.path), type(mod).__name__, channels)
                if issue not in issues:
                    issues.append(issue)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, sample_input, mutable=True)
    if variables is not None and "batch_stats" in variables and not issues:
        import jax
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
            name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
            issue = _issue(name, "BatchNorm", leaf.shape[-1] if hasattr(leaf, "shape") else None)
            if issue not in issues:
                issues.append(issue)
    return issues


def validate(model: Any, variables: Any = None, sample_input: Any = None) -> list[ValidationIssue]:
    """List the layers of ``model`` that mix examples across the batch (empty list = OK for DP-SGD).

    Args:
      model: a Flax NNX module, or a Flax Linen module (then pass ``variables`` and/or ``sample_input``:
        Linen submodules only exist while the module runs).
      variables: Linen variables (a ``batch_stats`` collection reveals BatchNorm).
      sample_input: a small input batch; for Linen the module is run once to find batch-statistics layers.

    A layer that normalises over the batch (BatchNorm) makes one example's output depend on the others, so a
    per-example gradient is no longer one example's: clipping would not bound an example's contribution.

    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.dense = nnx.Linear(4, 64, rngs=rngs)
    ...         self.norm = nnx.BatchNorm(64, rngs=rngs)
    >>> [issue.path for issue in validate(Net(nnx.Rngs(0)))]
    ['norm']

    Raises:
      ValueError: a Linen module without ``variables`` or ``sample_input``.
    """
    if isinstance(model, nnx.Module):
        issues = []
        for path, node in nnx.iter_graph(model):
            if isinstance(node, _NNX_BATCH_LAYERS):
                issues.append(_issue("/".join(map(str, path)), type(node).__name__, node.num_features))
        return issues
    if isinstance(model, nn.Module):
        if variables is None and sample_input is None:
            raise ValueError("validate(linen_module) needs variables= or sample_input= to see its layers")
        return _linen_issues(model, variables, sample_input)
    return []


def check(model: Any, variables: Any = None, sample_input: Any = None) -> None:
    """Raise :class:`ModelValidationError` listing every problem (with fixes) if ``model`` mixes examples."""
    issues = validate(model, variables, sample_input)
    if issues:
        lines = "\n  ".join(str(i) for i in issues)
        raise ModelValidationError(
            f"the model is not compatible with DP-SGD ({len(issues)} layer(s) mix examples):\n  {lines}")


def fix(model: Any) -> Any:
    """Replace every ``nnx.BatchNorm`` by ``nnx.GroupNorm`` in place; return the model.

    ``num_groups = gcd(32, C)`` (Opacus's choice) unless that would leave one feature per group -- a constant
    output after a Dense layer -- then the most groups with at least two features each (with a warning); a
    BatchNorm over a single feature is refused (:class:`ModelValidationError`) with the reason.

    The new GroupNorm keeps the BatchNorm's learned scale and bias. Linen modules cannot be rewritten from
    outside: a :class:`ModelValidationError` says which layers to change in the code.

    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.dense = nnx.Linear(4, 64, rngs=rngs)
    ...         self.norm = nnx.BatchNorm(64, rngs=rngs)
    >>> net = fix(Net(nnx.Rngs(0)))
    >>> type(net.norm).__name__, net.norm.num_groups, validate(net)   # gcd(32, 64) groups of 2 features
    ('GroupNorm', 32, [])

    Raises:
      ModelValidationError: a Linen module, or a BatchNorm over a single feature.
      TypeError: ``model`` is not a Flax module.
    """
    if isinstance(model, nn.Module):
        raise ModelValidationError(
            "jaxdp.fix cannot rewrite a Flax Linen module (its submodules are created inside __call__). "
            "In your module's code replace nn.BatchNorm(...) with nn.GroupNorm(num_groups=gcd(32, channels), at least "
            "2 channels per group: a group of one feature after a Dense layer is constant) "
            "(or nn.LayerNorm), drop the 'batch_stats' collection, and re-initialise; or port the model to NNX "
            "and call jaxdp.fix on it.")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"jaxdp.fix expects a Flax NNX module, got {type(model).__name__}")
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, _NNX_BATCH_LAYERS) or not path:
            continue
        parent: Any = model   # walks through modules, lists and dicts
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, (list, dict, nnx.List, nnx.Dict)) or \
                not hasattr(parent, str(key)) else getattr(parent, str(key))
        c = node.num_features
        g = _groups(c)
        where = "/".join(map(str, path))
        if g is None:
            raise ModelValidationError(
                f"jaxdp.fix cannot replace {where} (BatchNorm over {c} feature): a per-example normalisation of "
                "a single feature (GroupNorm or LayerNorm) is constant, which would make the layer's output its "
                "bias. Remove the layer (or normalise over more features) and call jaxdp.fix again.")
        if g != math.gcd(32, c):
            import warnings
            warnings.warn(
                f"jaxdp.fix: {where} has {c} features; GroupNorm(num_groups=gcd(32, {c}) = {math.gcd(32, c)}) "
                f"would normalise each feature alone (a constant output after a Dense layer), so it gets "
                f"num_groups={g} ({c // g} features per group).", stacklevel=2)
        gn = nnx.GroupNorm(c, num_groups=g, epsilon=node.epsilon, rngs=nnx.Rngs(0))
        if node.scale is not None and gn.scale is not None:
            _nnx.put(gn.scale, _nnx.get(node.scale))
        if node.bias is not None and gn.bias is not None:
            _nnx.put(gn.bias, _nnx.get(node.bias))
        last = path[-1]
        if isinstance(parent, (list, nnx.List)) or isinstance(last, int):
            parent[last] = gn
        else:
            setattr(parent, str(last), gn)
    if validate(model):
        raise ModelValidationError(f"could not replace every BatchNorm: {validate(model)}")
    return model


def _shape_hint(shape: tuple) -> str:
    if len(shape) == 1:
        side = int(round(math.sqrt(shape[0])))
        if side * side == shape[0]:
            return (f" Convolutional models take images [N, H, W, C]: reshape the features to "
                    f"[N, {side}, {side}, 1] (x.reshape(-1, {side}, {side}, 1)), or use a dense model (mlp, logreg).")
        return " Convolutional models take images [N, H, W, C]; for flat features use a dense model (mlp, logreg)."
    return ""


def check_model_fits_data(model: Any, x: Any, y: Any = None, *, source: str = "the data",
                          model_name: str | None = None) -> int | None:
    """Check, before any training, that an NNX ``model`` accepts the examples of ``x`` and that integer labels
    ``y`` lie within its outputs; return the number of outputs (``None`` if the output is not ``[B, K]``).

    Runs the model abstractly (``jax.eval_shape``) on one example, so a shape mismatch is reported as expected
    vs got instead of an error from inside a layer. Raises :class:`jaxdp.data.DataValidationError`.
    """
    import jax
    import numpy as np

    from jaxdp.data import DataValidationError, check_classes
    name = model_name or type(model).__name__
    x = np.asarray(x)
    graphdef, state = nnx.split(model)
    example = jax.ShapeDtypeStruct((1,) + x.shape[1:], np.float32)

    def call(st, xx):  # fresh copies of the variables: RNG counters may be updated inside the trace
        leaves, treedef = jax.tree_util.tree_flatten(st, is_leaf=lambda v: isinstance(v, nnx.Variable))
        fresh = [v.replace() if isinstance(v, nnx.Variable) else v for v in leaves]
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, fresh))(xx)

    try:
        out = jax.eval_shape(call, state, example)
    except Exception as e:  # noqa: BLE001 -- any failure here is a data/model mismatch, reported as such
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataValidationError(
            f"model {name} cannot take the examples of {source}: each example has shape {tuple(x.shape[1:])}."
            f"{_shape_hint(tuple(x.shape[1:]))} ({type(e).__name__}: {first[:300]})") from None
    k = int(out.shape[-1]) if getattr(out, "ndim", 0) == 2 else None
    if k is not None and y is not None:
        y = np.asarray(y)
        if np.issubdtype(y.dtype, np.integer) and (y >= k).any():
            check_classes(y, y[:0], source, num_classes=k)
    return k


__all__ = ["ValidationIssue", "ModelValidationError", "validate", "check", "fix", "check_model_fits_data"]
