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
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxdp import _checks

PyTree = Any
LossFn = Callable[..., Any]

CLIP_EPS = 1e-6  # Opacus's constant in the clip factor; part of the public contract (docs/privacy.md rule 1).
METHODS = ("auto", "vmap", "ghost")


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


def clip_factor(norms: jax.Array, l2_clip_norm: float | jax.Array) -> jax.Array:
    """Opacus's per-example clip factor ``min(1, C / (norm + 1e-6))``."""
    return jnp.minimum(1.0, l2_clip_norm / (norms + CLIP_EPS))


def total_clip_norm(l2_clip_norm: float | PyTree) -> float:
    """L2 sensitivity of a clipped sum: ``C`` for flat clipping, ``||(C_1..C_K)||_2`` for per-layer clipping."""
    leaves = jax.tree_util.tree_leaves(l2_clip_norm)
    if not leaves:
        raise ValueError("l2_clip_norm is an empty pytree: give a number or one clip norm per parameter group")
    for leaf in leaves:
        _checks.positive("l2_clip_norm", leaf)
    return float(np.sqrt(sum(float(c) ** 2 for c in leaves)))


def _path_name(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts) if parts else "all"


def leaf_names(tree: PyTree) -> list[str]:
    """Slash-joined key paths of the leaves of ``tree`` (in ``tree_leaves`` order)."""
    return [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class _Groups(NamedTuple):
    """Static description of the clip groups: which group each trainable leaf belongs to, and its C."""

    norms: tuple[float, ...]       # C_k per group
    names: tuple[str, ...]         # group names
    leaf_group: tuple[int, ...]    # group index of every trainable leaf (tree_leaves order of the train tree)


def _make_groups(l2_clip_norm: float | PyTree, train_params: PyTree) -> _Groups:
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(l2_clip_norm)):
        n_leaves = len(jax.tree_util.tree_leaves(train_params))
        return _Groups((float(l2_clip_norm),), ("all",), (0,) * n_leaves)
    flat, treedef = jax.tree_util.tree_flatten_with_path(l2_clip_norm)
    norms = tuple(float(c) for _, c in flat)
    names = tuple(_path_name(p) for p, _ in flat)
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
    return _Groups(norms, names, leaf_group)


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
# Method implementations.
#
# An implementation computes, for one chunk of examples, the per-leaf squared per-example norms and the
# weighted sum of per-example gradients, where the weights come from the norms:
#
#   impl(loss_fn, has_aux, params, batch, weight_fn) -> (summed, sq_norms, losses, aux)
#
#   loss_fn(params, batch) -> losses [B] (or (losses, aux) with has_aux), params = trainable tree only;
#   sq_norms: list over trainable leaves (tree_leaves order) of [B] squared norms;
#   weight_fn(sq_norms) -> list over leaves of [B] weights (0 for padding / dropped examples);
#   summed: tree like params, sum_i w_i[leaf] * g_i[leaf], with non-finite dropped examples contributing 0.


def _check_losses(losses: jax.Array, batch_size: int) -> None:
    if losses.ndim != 1 or losses.shape[0] != batch_size:
        raise ValueError(
            f"loss_fn must return per-example losses of shape [B] = [{batch_size}], got shape {losses.shape}. "
            "Return the unreduced losses (no mean or sum over the batch): clipping needs each example's loss.")


def acc_dtype(dtype: Any) -> Any:
    """The dtype norms, clip factors and clipped sums are computed in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def sq_norms(g: jax.Array) -> jax.Array:
    """Per-example squared L2 norms ``[B]`` of a leaf with leading axis ``B``, accumulated in >= float32."""
    g = g.astype(acc_dtype(g.dtype))
    return jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)


def weighted_sum(weights: jax.Array, g: jax.Array) -> jax.Array:
    """``sum_i w_i g_i`` over the leading axis, accumulated in >= float32 and rounded to ``g``'s dtype by
    :func:`to_output`. Examples with weight 0 contribute exactly zero even when their gradient holds NaN/Inf
    (``0 * NaN`` would poison the sum)."""
    out_dtype, acc = g.dtype, acc_dtype(g.dtype)
    keep = (weights != 0).reshape((-1,) + (1,) * (g.ndim - 1))
    g = jnp.where(keep, g.astype(acc), jnp.zeros((), acc))
    return to_output(jnp.tensordot(weights.astype(acc), g, axes=1), out_dtype)


def output_scale(dtype: Any) -> float:
    """Factor applied to a clipped sum before it is rounded to a parameter dtype coarser than float32.

    Rounding a vector to a dtype with unit roundoff ``u`` (``2^-8`` for bfloat16, ``2^-11`` for float16) can
    lengthen it by a factor up to ``1 + u``. Scaling the float32 sum by ``1 - u`` first keeps each example's
    rounded contribution within ``C (1 - u)(1 + u) = C (1 - u^2) < C``. float32 and float64 outputs are not
    scaled (their rounding, ``2^-24`` relative, is below the clip factor's own ``1e-6`` slack).
    """
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits >= 32:
        return 1.0
    return 1.0 - float(jnp.finfo(dtype).eps) / 2.0


def to_output(summed: jax.Array, dtype: Any) -> jax.Array:
    """Round a >= float32 clipped sum to the parameter dtype under the rule of :func:`output_scale`."""
    scale = output_scale(dtype)
    if scale != 1.0:
        summed = summed * jnp.asarray(scale, summed.dtype)
    return summed.astype(dtype)


def pin_low_precision(tree: PyTree) -> PyTree:
    """Materialise the sub-float32 floating leaves of ``tree`` behind an optimisation barrier.

    XLA may keep bfloat16/float16 intermediates in excess precision (``xla_allow_excess_precision``) and does
    so per fusion: a value read by both the norm computation and the weighted sum could be rounded in one and
    not in the other, and the sum would then hold a vector slightly longer than the norm that clipped it
    (measured: 3.5e-6 relative). The barrier makes both read the same rounded buffer. float32 and wider leaves
    are returned untouched (no cost)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    low = [i for i, x in enumerate(leaves)
           if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32]
    if not low:
        return tree
    pinned = jax.lax.optimization_barrier([leaves[i] for i in low])
    for i, x in zip(low, pinned):
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def vmap_impl(loss_fn, has_aux, params, batch, weight_fn):
    """Materialise per-example gradients with ``vmap(grad)``; exact for any differentiable loss.

    Norms, weights and the weighted sum are computed in >= float32 whatever the parameter dtype, and the sum
    is rounded to the parameter dtype by :func:`to_output`.
    """

    def single(p, example):
        ex1 = jax.tree_util.tree_map(lambda x: x[None], example)
        out = loss_fn(p, ex1)
        losses, aux = out if has_aux else (out, None)
        _check_losses(losses, 1)
        aux = jax.tree_util.tree_map(lambda a: a[0], aux)
        return losses[0], (losses[0], aux)

    grads, (losses, aux) = jax.vmap(jax.grad(single, has_aux=True), in_axes=(None, 0))(params, batch)
    g_leaves, treedef = jax.tree_util.tree_flatten(pin_low_precision(grads))
    sq = [sq_norms(g) for g in g_leaves]
    weights = weight_fn(sq)
    summed = [weighted_sum(w, g) for g, w in zip(g_leaves, weights)]
    return jax.tree_util.tree_unflatten(treedef, summed), sq, losses, aux


_IMPLS: dict[str, Callable] = {"vmap": vmap_impl}


def register_method(name: str, impl: Callable) -> None:
    """Register a per-example-norm implementation (used by :mod:`jaxdp.ghost`)."""
    _IMPLS[name] = impl


def _resolve_method(method: str) -> Callable:
    if method not in METHODS and method not in _IMPLS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("ghost", "auto"):
        try:
            import jaxdp.ghost  # noqa: F401  (registers "ghost" and "auto")
        except ImportError:
            pass
        if method not in _IMPLS:
            if method == "auto":
                return _IMPLS["vmap"]
            raise NotImplementedError("method='ghost' is not available in this build; use method='vmap'")
    return _IMPLS[method]


# ----------------------------------------------------------------------------------------------------------
# The public entry point


def _batch_size(batch: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch is empty: it must be a pytree of arrays with a leading batch axis")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
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
      method: ``"vmap"`` materialises per-example gradients; ``"ghost"`` computes per-example norms from
        activations and output gradients (much faster for dense layers); ``"auto"`` picks the fastest exact one.
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
    """
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(params, batch) -> per-example losses [B]")
    total_clip_norm(l2_clip_norm)  # validates every C > 0
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if microbatch_size is not None:
        _checks.positive_int("microbatch_size", microbatch_size)
    impl = _resolve_method(method)

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
            out = {}

            def weight_fn(sq):
                sq = [x.astype(acc_dtype(x.dtype)) for x in sq]
                acc = functools.reduce(jnp.promote_types, [x.dtype for x in sq])
                group_sq = [jnp.zeros(m.shape, acc) for _ in groups.norms]
                for leaf_sq, gi in zip(sq, groups.leaf_group):
                    group_sq[gi] = group_sq[gi] + leaf_sq
                total_sq = sum(group_sq)
                # A squared norm that is NaN, infinite or negative is no norm: drop the example (weight 0)
                # rather than let sqrt(NaN) or a 0 clamp become its clip factor (privacy rule: never trust it).
                finite = jnp.isfinite(total_sq) & functools.reduce(
                    jnp.logical_and, [gs >= 0 for gs in group_sq])
                real = m & finite
                factors = [jnp.where(real, clip_factor(jnp.sqrt(jnp.where(real, gs, 0)), c), 0.0)
                           for gs, c in zip(group_sq, groups.norms)]
                out["total_sq"] = total_sq
                out["finite"] = finite
                out["group_clipped"] = jnp.stack([(f < 1.0) & real for f in factors])
                out["sq"] = sq
                return [factors[gi] for gi in groups.leaf_group]

            summed, _, losses, aux = impl(train_loss, has_aux, train, b, weight_fn)
            _check_losses(losses, m.shape[0])
            per_ex = dict(total_sq=out["total_sq"], finite=out["finite"],
                          group_clipped=out["group_clipped"], sq=out["sq"], losses=losses, aux=aux)
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
