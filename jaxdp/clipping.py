"""Per-example gradient clipping: the privacy-critical step of DP-SGD.

For a batch of examples ``x_1..x_B`` with padding mask ``m_i`` and per-example gradients ``g_i`` (over the
trainable parameters only), :func:`clipped_grad` returns the SUM

    S = sum_i m_i * f_i * g_i,      f_i = min(1, C / (||g_i||_2 + 1e-6))

(Opacus's clip factor; the norm is over all trainable leaves together, "flat" clipping). Adding or removing one
example changes ``S`` by a vector of L2 norm at most ``C``: that is the sensitivity that the Gaussian noise of
:func:`jaxdp.add_noise` is calibrated to. No noise is added here and nothing is divided: normalisation by the
public expected batch size happens once, after the noise (privacy rules 2 and 3 in docs/privacy.md).

Per-layer (group) clipping: when ``l2_clip_norm`` is a pytree that is a prefix of the params tree, every leaf
``C_k`` of it clips the parameters below it as one group with its own factor
``f_ik = min(1, C_k / (||g_ik|| + 1e-6))``. The sum then has sensitivity ``||(C_1, ..., C_K)||_2``
(:func:`total_clip_norm`), which is what the noise must be scaled by.

Examples whose gradient is not finite (NaN/Inf) are dropped from the sum (factor 0) and counted in
``ClipStats.num_nonfinite``; padding examples (mask False) contribute exactly zero and are not counted.

The rule lives here; the arithmetic (per-example norms and the weighted sum) is a per-example backend of
:mod:`jaxdp.per_example` (``"vmap"``, ``"ghost"``, ``"auto"`` or one registered there), whose invariants its
docstring states.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxdp import _checks
from jaxdp import ghost as _ghost  # noqa: F401  (registers the "ghost" and "auto" backends; must not fail quietly)
from jaxdp import per_example
from jaxdp.per_example import (  # noqa: F401  (the shared primitives, re-exported under their old names)
    CLIP_EPS, ClipGroups, ClipWeights, LossFn, acc_dtype, clip_factor, leaf_names, output_scale,
    pin_low_precision, sq_norms, to_output, weighted_sum,
)

PyTree = Any

METHODS = per_example.BUILTIN_BACKENDS  # the built-in methods; jaxdp.per_example.backend_names() lists all


class ClipStats(NamedTuple):
    """Statistics of one call of a clipped-gradient function.

    Attributes:
      per_example_norms: [B] L2 norm of each example's unclipped gradient over all trainable leaves
        (0 for padding examples; NaN/Inf for dropped non-finite ones).
      per_example_losses: [B] the per-example losses ``loss_fn`` returned.
      clip_fraction: scalar, fraction of real, finite examples whose gradient was scaled down (in any group).
      num_examples: scalar int, number of real examples (mask True) in the batch.
      num_nonfinite: scalar int, real examples dropped because their gradient was not finite.
      layer_norm_mean: {leaf path: mean over real examples of that leaf's per-example gradient norm}.
      layer_norm_max: {leaf path: max over real examples of that leaf's per-example gradient norm}.
      group_clip_fraction: {clip group path: fraction of real examples clipped in that group}
        (the single group is named ``"all"`` for flat clipping).
      aux: the auxiliary output of ``loss_fn`` when ``has_aux=True`` (per-example, leading axis B), else None.
    """

    per_example_norms: jax.Array
    per_example_losses: jax.Array
    clip_fraction: jax.Array
    num_examples: jax.Array
    num_nonfinite: jax.Array
    layer_norm_mean: dict
    layer_norm_max: dict
    group_clip_fraction: dict
    aux: Any = None


# ----------------------------------------------------------------------------------------------------------
# Clip norms and groups


def total_clip_norm(l2_clip_norm: float | PyTree) -> float:
    """L2 sensitivity of a clipped sum: ``C`` for flat clipping, ``||(C_1..C_K)||_2`` for per-layer clipping.

    Adding or removing one example moves a sum of per-example gradients clipped group by group (group ``k`` to
    norm ``C_k``) by at most this much; the Gaussian noise is scaled to it (``std = sigma * total_clip_norm``).

    >>> total_clip_norm(1.0)
    1.0
    >>> total_clip_norm({"encoder": 3.0, "head": 4.0})   # per-layer: sqrt(3^2 + 4^2)
    5.0

    Raises:
      ValueError: an empty pytree, or a clip norm that is not a finite number > 0.
      TypeError: a clip norm that is not a number.
    """
    leaves = jax.tree_util.tree_leaves(l2_clip_norm)
    if not leaves:
        raise ValueError("l2_clip_norm is an empty pytree: give a number or one clip norm per parameter group")
    for leaf in leaves:
        _checks.positive("l2_clip_norm", leaf)
    return float(np.sqrt(sum(float(c) ** 2 for c in leaves)))


_Groups = ClipGroups  # old private name


def _make_groups(l2_clip_norm: float | PyTree, train_params: PyTree) -> ClipGroups:
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(l2_clip_norm)):
        n_leaves = len(jax.tree_util.tree_leaves(train_params))
        return ClipGroups((float(l2_clip_norm),), ("all",), (0,) * n_leaves)
    flat, treedef = jax.tree_util.tree_flatten_with_path(l2_clip_norm)
    norms = tuple(float(c) for _, c in flat)
    names = tuple(leaf_names(l2_clip_norm))
    idx_tree = jax.tree_util.tree_unflatten(treedef, list(range(len(flat))))
    try:
        grouped = jax.tree_util.tree_map(
            lambda i, sub: jax.tree_util.tree_map(lambda _: i, sub), idx_tree, train_params,
            is_leaf=lambda x: x is None)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "per-layer l2_clip_norm must be a pytree prefix of the (trainable) params, e.g. "
            "{'dense1': 1.0, 'dense2': 0.5} for params {'dense1': {...}, 'dense2': {...}}; "
            f"the structures do not match: {e}") from None
    leaf_group = tuple(int(i) for i in jax.tree_util.tree_leaves(grouped))
    return ClipGroups(norms, names, leaf_group)


# ----------------------------------------------------------------------------------------------------------
# Trainable / frozen split


def _split(params: PyTree, trainable: PyTree | None) -> tuple[PyTree, PyTree]:
    """Split params into (trainable, frozen) trees of the same structure, with None where a leaf is absent."""
    if trainable is None:
        return params, jax.tree_util.tree_map(lambda _: None, params)
    flags = jax.tree_util.tree_map(
        lambda t, sub: jax.tree_util.tree_map(lambda _: bool(t), sub), trainable, params)
    train = jax.tree_util.tree_map(lambda p, t: p if t else None, params, flags)
    frozen = jax.tree_util.tree_map(lambda p, t: None if t else p, params, flags)
    return train, frozen


def _merge(train: PyTree, frozen: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, train, frozen,
                                  is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------------------------------------
# Backends (jaxdp.per_example) under their old names


_check_losses = per_example.check_losses
vmap_impl = per_example.vmap_backend


def register_method(name: str, impl: Callable) -> None:
    """Deprecated: use :func:`jaxdp.per_example.register_backend` (same arguments, plus ``replace=``)."""
    warnings.warn("jaxdp.clipping.register_method is deprecated; use jaxdp.per_example.register_backend",
                  _checks.JaxdpDeprecationWarning, stacklevel=2)
    per_example.register_backend(name, impl, replace=True)


# ----------------------------------------------------------------------------------------------------------
# The public entry point


def _batch_size(batch: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch is empty: it must be a pytree of arrays with a leading batch axis")
    sizes = {int(np.shape(x)[0]) for x in leaves if np.ndim(x)}
    if any(np.ndim(x) == 0 for x in leaves) or len(sizes) != 1:
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(f"every leaf of the batch needs the same leading batch axis B; got shapes {shapes}")
    return sizes.pop()


def clipped_grad(
    loss_fn: LossFn,
    l2_clip_norm: float | PyTree,
    method: str = "auto",
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
    trainable: PyTree | None = None,
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """Build ``grad_fn(params, batch, mask=None) -> (summed, stats)``: the sum of clipped per-example gradients.

    Args:
      loss_fn: ``loss_fn(params, batch) -> losses`` of shape ``[B]`` (one loss per example, NOT reduced);
        with ``has_aux=True`` it returns ``(losses, aux)`` where ``aux`` leaves have leading axis ``B``.
        ``batch`` is any pytree whose leaves share the leading axis ``B``. The loss of one example must not
        depend on other examples in the batch (no BatchNorm): otherwise the sensitivity bound is void.
      l2_clip_norm: ``C``, the bound on each example's contribution (privacy: the sensitivity of the sum).
        A number for flat clipping over all trainable leaves; a pytree prefix of params for per-layer clipping.
      method: the per-example backend (:mod:`jaxdp.per_example`): ``"vmap"`` materialises per-example
        gradients; ``"ghost"`` computes per-example norms from activations and output gradients (much faster for
        dense layers); ``"auto"`` picks the fastest exact one per layer; or a name registered with
        :func:`jaxdp.per_example.register_backend`.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      microbatch_size: process the batch in sequential chunks of this many examples (bounded memory);
        the result does not depend on the chunk size (up to float summation order).
      trainable: optional pytree prefix of params with bools; frozen leaves get a zero gradient, take no
        part in the norms and cost no per-example work.

    Returns:
      ``grad_fn(params, batch, mask=None)``; ``mask`` is bool/float ``[B]``, False/0 marks a padding
      example. ``grad_fn`` returns ``(summed, stats)``: ``summed`` has the structure of params and holds
      ``sum_i mask_i * clip(g_i)`` (zeros on frozen leaves), ``stats`` is a :class:`ClipStats`.
      ``grad_fn`` is a pure function and can be wrapped in ``jax.jit``.

    Example: squared error of a linear model on two examples. Example 0's gradient ``(42, 56)`` has norm 70
    and is scaled down to norm ``C = 1``; example 1's ``(0.02, 0)`` is below ``C`` and kept as it is:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxdp
    >>> def loss_fn(params, batch):                  # one loss per example, not reduced
    ...     return (batch["x"] @ params["w"] - batch["y"]) ** 2
    >>> params = {"w": jnp.ones(2)}
    >>> batch = {"x": jnp.array([[3.0, 4.0], [0.1, 0.0]]), "y": jnp.zeros(2)}
    >>> grad_fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0))
    >>> summed, stats = grad_fn(params, batch)
    >>> [round(float(v), 4) for v in stats.per_example_norms]      # before clipping
    [70.0, 0.02]
    >>> [round(float(v), 4) for v in summed["w"]]                  # (0.6, 0.8) + (0.02, 0)
    [0.62, 0.8]
    >>> float(stats.clip_fraction)
    0.5

    Raises:
      TypeError: ``loss_fn`` is not callable.
      ValueError: a clip norm is not positive, ``method`` names no registered backend, or ``microbatch_size``
        is not a positive integer; when called, a malformed batch or mask, or a loss that is not per example.
    """
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(params, batch) -> per-example losses [B]")
    total_clip_norm(l2_clip_norm)  # validates every C > 0
    backend = per_example.get_backend(method)  # refuses an unknown name, listing the registered ones
    if microbatch_size is not None:
        _checks.positive_int("microbatch_size", microbatch_size)

    def grad_fn(params: PyTree, batch: PyTree, mask: jax.Array | None = None):
        train, frozen = _split(params, trainable)
        if not jax.tree_util.tree_leaves(train):
            raise ValueError("no trainable parameters: `trainable` marks every leaf as frozen")
        groups = _make_groups(l2_clip_norm, train)
        B = _batch_size(batch)
        if mask is None:
            mask = jnp.ones((B,), dtype=bool)
        else:
            mask = jnp.asarray(mask)
            if mask.shape != (B,):
                raise ValueError(f"mask must have shape [B] = ({B},) to match the batch, got {mask.shape}")
            mask = mask != 0

        def train_loss(t, b):
            return loss_fn(_merge(t, frozen), b)

        chunk = B if microbatch_size is None else min(microbatch_size, B)
        n_chunks = -(-B // chunk)

        def run_chunk(b, m):
            out = backend(train_loss, has_aux, train, b, functools.partial(per_example.clip_weights, mask=m,
                                                                            groups=groups))
            if not isinstance(out, tuple) or len(out) != 5 or not isinstance(out[4], ClipWeights):
                raise TypeError(f"per-example backend {method!r} must return a BackendOutput(summed, sq_norms, "
                                "losses, aux, weights) whose weights are the ClipWeights its weight_fn returned")
            summed, sq, losses, aux, cw = out
            _check_losses(losses, m.shape[0])
            per_ex = dict(total_sq=cw.total_sq, finite=cw.finite, group_clipped=cw.group_clipped, sq=list(sq),
                          losses=losses, aux=aux)
            return summed, per_ex

        if n_chunks == 1:
            summed, per_ex = run_chunk(batch, mask)
        else:
            summed, per_ex = _chunked(run_chunk, train, batch, mask, B, chunk, n_chunks)

        stats = _make_stats(mask, groups, train, per_ex["total_sq"], per_ex["finite"], per_ex["group_clipped"],
                            per_ex["sq"], per_ex["losses"], per_ex["aux"])
        full = jax.tree_util.tree_map(
            lambda s, f: jnp.zeros_like(f) if s is None else s,
            _fill(summed, train), frozen, is_leaf=lambda x: x is None)
        return full, stats

    return grad_fn


def _chunked(run_chunk, train, batch, mask, B: int, chunk: int, n_chunks: int):
    """Run ``run_chunk`` over ``ceil(B / chunk)`` chunks in a ``lax.fori_loop``, summing the clipped sums.

    Memory: chunk ``i`` is a ``dynamic_slice`` of the ORIGINAL batch (no padded or reshaped copy of the
    logical batch is made) and only the running sum plus ``[B]``-sized per-example statistics are carried, so
    peak memory is that of one chunk plus one gradient-sized accumulator. The last chunk's start is clamped
    to ``B - chunk``; the examples it shares with the previous chunk are masked out (weight 0, contributing
    exactly nothing) and their statistics are not overwritten, so every example is counted exactly once.
    """
    offs = jnp.arange(chunk)

    def take(i):
        s0 = i * chunk
        start = jnp.minimum(s0, B - chunk)
        fresh = start + offs >= s0
        b = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, 0), batch)
        m = jax.lax.dynamic_slice_in_dim(mask, start, chunk, 0) & fresh
        return start, fresh, b, m

    _, _, b0, m0 = take(0)
    shapes = jax.eval_shape(lambda b, m: run_chunk(b, m)[1], b0, m0)

    def axis_of(path) -> int:  # group_clipped is [G, chunk]; everything else has the example axis first
        return 1 if getattr(path[0], "key", None) == "group_clipped" else 0

    def alloc(path, sd):
        ax = axis_of(path)
        return jnp.zeros(sd.shape[:ax] + (B,) + sd.shape[ax + 1:], sd.dtype)

    bufs = jax.tree_util.tree_map_with_path(alloc, shapes)

    def body(i, carry):
        acc, bufs = carry
        start, fresh, b, m = take(i)
        s, pe = run_chunk(b, m)

        def put(path, buf, v):
            ax = axis_of(path)
            old = jax.lax.dynamic_slice_in_dim(buf, start, chunk, ax)
            f = fresh.reshape((1,) * ax + (chunk,) + (1,) * (v.ndim - ax - 1))
            return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(f, v, old), start, ax)

        bufs = jax.tree_util.tree_map_with_path(put, bufs, pe)
        return jax.tree_util.tree_map(jnp.add, acc, s), bufs

    zeros = jax.tree_util.tree_map(jnp.zeros_like, train)
    return jax.lax.fori_loop(0, n_chunks, body, (zeros, bufs))


def _fill(summed: PyTree, train: PyTree) -> PyTree:
    """Put the summed leaves back into the train tree's structure (None where frozen)."""
    leaves = iter(jax.tree_util.tree_leaves(summed))
    return jax.tree_util.tree_map(lambda t: None if t is None else next(leaves), train,
                                  is_leaf=lambda x: x is None)


def _make_stats(mask, groups, train, total_sq, finite, group_clipped, sq, losses, aux) -> ClipStats:
    real = mask & finite
    n_real = jnp.sum(mask)
    n_real_finite = jnp.maximum(jnp.sum(real), 1)
    norms = jnp.where(mask, jnp.sqrt(total_sq), 0.0)
    clipped_any = jnp.any(group_clipped, axis=0)
    names = leaf_names(train)
    layer_mean, layer_max = {}, {}
    for name, s in zip(names, sq):
        ln = jnp.where(real, jnp.sqrt(s), 0.0)
        layer_mean[name] = jnp.sum(ln) / n_real_finite
        layer_max[name] = jnp.max(ln)
    group_frac = {name: jnp.sum(group_clipped[i]) / n_real_finite for i, name in enumerate(groups.names)}
    return ClipStats(
        per_example_norms=norms,
        per_example_losses=losses,
        clip_fraction=jnp.sum(clipped_any) / n_real_finite,
        num_examples=n_real,
        num_nonfinite=jnp.sum(mask & ~finite),
        layer_norm_mean=layer_mean,
        layer_norm_max=layer_max,
        group_clip_fraction=group_frac,
        aux=aux,
    )


def clip_per_example(grads: PyTree, l2_clip_norm: float, mask: jax.Array | None = None):
    """Clip already-materialised per-example gradients (leading axis B) and sum them (flat clipping).

    Returns ``(summed, per_example_norms)``; non-finite or masked-out examples contribute zero.
    """
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    chex.assert_equal_shape_prefix(leaves, 1)
    B = leaves[0].shape[0]
    mask = jnp.ones((B,), bool) if mask is None else (jnp.asarray(mask) != 0)
    if mask.shape != (B,):
        raise ValueError(f"mask must have shape [B] = ({B},), got {mask.shape}")
    sq = sum(sq_norms(g) for g in leaves)
    norms = jnp.sqrt(sq)
    w = jnp.where(mask & jnp.isfinite(sq), clip_factor(norms, l2_clip_norm), 0.0)
    out = [weighted_sum(w, g) for g in leaves]
    return jax.tree_util.tree_unflatten(treedef, out), jnp.where(mask, norms, 0.0)


__all__ = ["ClipStats", "clipped_grad", "clip_factor", "total_clip_norm", "clip_per_example",
           "register_method", "leaf_names", "CLIP_EPS"]
