"""Per-layer clip groups by name: check a user's ``{group: C_k}`` against the model's parameters, or split a
total clip norm over the groups by a rule.

The groups are the top-level entries of the (trainable) params tree -- the layers of a Flax NNX module
(``conv1``, ``fc``, ``head`` ...) or of a Linen ``params`` dict. :func:`jaxdp.clipped_grad` clips each group
``k`` to its own ``C_k`` and the noise must then be scaled by the sensitivity ``||(C_1, ..., C_K)||_2``
(:func:`jaxdp.total_clip_norm`; :func:`jaxdp.add_noise` does this when given the same tree). The split rules
keep that sensitivity equal to the total ``C``, so the noise (and epsilon) is that of flat clipping at ``C``:

    equal:    C_k = C / sqrt(K)
    by_size:  C_k = C * sqrt(d_k / d)        (d_k parameters in group k, d in all: the same budget per coordinate)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax

PyTree = Any
RULES = ("equal", "by_size")


def group_names(params: PyTree) -> list[str]:
    """The names of the per-layer clip groups of ``params`` (its top-level keys)."""
    if not isinstance(params, Mapping) and not hasattr(params, "keys"):
        raise ValueError("per-layer clipping needs params that are a mapping of layer name -> parameters "
                         f"(a dict or an nnx.State), got {type(params).__name__}")
    return [str(k) for k in params.keys()]


def _as_params_type(tree: dict, params: PyTree) -> PyTree:
    """A plain dict of clip norms, in the container type of ``params`` (an nnx.State prefix must be a State)."""
    if isinstance(params, dict):
        return dict(tree)
    try:
        from flax import nnx
        if isinstance(params, nnx.State):
            return nnx.State(dict(tree))
    except ImportError:  # pragma: no cover
        pass
    return type(params)(tree)


def clip_norm_tree(params: PyTree, per_layer: Mapping | str, l2_clip_norm: float | None = None, *,
                   max_grad_norm: float | None = None) -> PyTree:
    """The per-layer ``l2_clip_norm`` tree for ``params``.

    Args:
      params: the (trainable) params tree whose top-level keys are the groups.
      per_layer: ``{group: C_k}`` naming EVERY group with a clip norm > 0, or a rule ``"equal"`` / ``"by_size"``
        that splits ``l2_clip_norm`` over all groups (module docstring).
      l2_clip_norm: the total ``C`` for a rule (the sensitivity of the clipped sum stays ``C``).
      max_grad_norm: deprecated name of ``l2_clip_norm``.

    Raises ``ValueError`` naming the valid group names when a group is unknown or missing.
    """
    from jaxdp import _checks
    l2_clip_norm = _checks.renamed_keyword("clip_norm_tree", "l2_clip_norm", l2_clip_norm, "max_grad_norm",
                                           max_grad_norm)
    names = group_names(params)
    if isinstance(per_layer, str):
        if per_layer not in RULES:
            raise ValueError(f"per-layer clipping rule must be one of {RULES} or a mapping {{group: C_k}} with "
                             f"groups {names}; got {per_layer!r}")
        if l2_clip_norm is None or not l2_clip_norm > 0:
            raise ValueError(f"per-layer rule {per_layer!r} splits the total clip norm, which must be > 0, got "
                             f"{l2_clip_norm!r}")
        if per_layer == "equal":
            norms = {k: float(l2_clip_norm) / math.sqrt(len(names)) for k in names}
        else:
            sizes = {k: sum(int(x.size) for x in jax.tree_util.tree_leaves(params[k])) for k in names}
            total = sum(sizes.values())
            norms = {k: float(l2_clip_norm) * math.sqrt(sizes[k] / total) for k in names}
        return _as_params_type(norms, params)
    if not isinstance(per_layer, Mapping) and not hasattr(per_layer, "keys"):
        raise ValueError(f"per-layer clip norms must be a mapping {{group: C_k}} with groups {names} or a rule "
                         f"{RULES}; got {type(per_layer).__name__}")
    given = [str(k) for k in per_layer.keys()]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ValueError(f"per-layer clipping: unknown group {unknown[0]!r}; the model's groups are {names}")
    missing = [k for k in names if k not in given]
    if missing:
        raise ValueError(f"per-layer clipping: no clip norm for group(s) {missing}; every group needs one "
                         f"(the model's groups are {names}), or use a rule such as 'equal'")
    for k in given:
        for c in jax.tree_util.tree_leaves(per_layer[k]):
            ok = isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0
            if not ok:
                raise ValueError(f"per-layer clipping: the clip norm of group {k!r} must be a number > 0, got {c!r}")
    by_name = {str(k): v for k, v in per_layer.items()}
    return _as_params_type({k: by_name[k] for k in names}, params)


__all__ = ["RULES", "clip_norm_tree", "group_names"]
