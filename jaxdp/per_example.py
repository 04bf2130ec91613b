"""Per-example backends: how the per-example norms and the clipped sum of a batch are computed.

:func:`jaxdp.clipped_grad` owns the privacy rule -- clip each example to ``C`` and sum -- and a *backend* owns the
arithmetic: it computes every example's squared gradient norm per trainable leaf and the weighted sum
``sum_i w_i g_i`` with the weights :func:`clip_weights` derives from those norms. Three backends are built in:

* ``"vmap"`` (:func:`vmap_backend`, this module): ``vmap(grad)`` materialises every per-example gradient; exact
  for any differentiable loss.
* ``"ghost"`` and ``"auto"`` (:mod:`jaxdp.ghost`): ghost norms from activations and output gradients, with
  book-keeping sums; ``"auto"`` chooses per layer between the ghost formula and materialising.

Others can be added with :func:`register_backend`; a registered name works wherever a clipping method is taken
(``clipped_grad(method=)``, ``PrivacyEngine.make_private(method=)``, the trainer's ``training.method``).

The contract (:class:`PerExampleBackend`)
-----------------------------------------
``backend(loss_fn, has_aux, params, batch, weight_fn) -> BackendOutput(summed, sq_norms, losses, aux, weights)``

* ``loss_fn(params, batch) -> losses [B]`` (``(losses, aux)`` with ``has_aux``); ``params`` is the TRAINABLE tree
  only; ``batch`` a pytree with leading axis ``B``.
* ``sq_norms``: a list over the trainable leaves (``tree_leaves`` order) of ``[B]`` squared per-example norms.
* ``weight_fn(sq_norms) -> ClipWeights`` is pure; the backend calls it ONCE, with the very norms it returns, and
  returns the :class:`ClipWeights` value it got as ``weights`` (the statistics are read from it).
* ``summed``: a tree like ``params`` holding ``sum_i w_i[leaf] * g_i[leaf]``, rounded to each leaf's dtype.

A backend must keep these invariants; together they are privacy rule 9 of ``docs/privacy.md`` (sensitivity
holds by construction) and ``docs/clipping.md``. A backend that breaks one breaks the stated epsilon:

1. **Sensitivity <= C per example.** The vector an example adds to ``summed`` is ``w_i g_i`` where ``g_i`` is a
   vector whose norm is at most ``sqrt(sq_norms[i])`` (summed over the leaves of a clip group): the norm that
   clipped an example is never smaller than the norm of what it contributes.
2. **Norms in >= float32.** Squared norms, weights and sums are accumulated in :func:`acc_dtype` (the parameter
   dtype promoted to at least float32), and a sum is rounded to a coarser parameter dtype only by
   :func:`to_output`; values read by both the norm and the sum are pinned by :func:`pin_low_precision`.
3. **A fast norm may never come out below the true norm.** A norm formula that is not a sum of squares of the
   added vector (ghost norms, Gram matrices) must return an upper bound (add its floating-point error bound) or
   fall back to the exact per-example gradient.
4. **Non-finite examples are dropped and counted.** A NaN, infinite or negative squared norm makes
   :func:`clip_weights` give that example weight 0 and count it in ``ClipStats.num_nonfinite``; the backend's sum
   must then contain exactly nothing of it (use :func:`weighted_sum`: ``0 * NaN`` would poison the sum).
5. **Padding contributes exactly zero.** Examples with mask False get weight 0 from :func:`clip_weights` and
   must add nothing to the sum, even when their inputs hold NaN.

``tests/test_sensitivity.py`` checks 1-5 per example for the built-in backends; run the same property test on a
backend of your own before training with it.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple, Protocol, runtime_checkable
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[..., Any]

CLIP_EPS = 1e-6  # Opacus's constant in the clip factor; part of the public contract (docs/privacy.md rule 1).
BUILTIN_BACKENDS = ("auto", "vmap", "ghost")


# ----------------------------------------------------------------------------------------------------------
# Values passed between clipped_grad and a backend


class ClipGroups(NamedTuple):
    """Static description of the clip groups: the bound ``C_k`` of each group, its name, and the group index of
    every trainable leaf (``tree_leaves`` order of the trainable tree). Flat clipping is one group, ``"all"``."""

    norms: tuple[float, ...]
    names: tuple[str, ...]
    leaf_group: tuple[int, ...]


class ClipWeights(NamedTuple):
    """What :func:`clip_weights` derives from one chunk's squared norms (a value: no side channel).

    Attributes:
      leaf_weights: list over trainable leaves of ``[B]`` weights ``w_i`` (the clip factor of the leaf's group;
        0 for padding and for dropped, non-finite examples).
      total_sq: ``[B]`` squared norm of each example over all trainable leaves (as the backend computed it).
      finite: ``[B]`` bool, whether every group's squared norm was finite and non-negative.
      group_clipped: ``[G, B]`` bool, whether the example was scaled down in group ``k`` (real examples only).
    """

    leaf_weights: list
    total_sq: jax.Array
    finite: jax.Array
    group_clipped: jax.Array


class BackendOutput(NamedTuple):
    """What a backend returns for one chunk of examples (see the module docstring)."""

    summed: PyTree
    sq_norms: list
    losses: jax.Array
    aux: Any
    weights: ClipWeights


WeightFn = Callable[[Sequence[jax.Array]], ClipWeights]


@runtime_checkable
class PerExampleBackend(Protocol):
    """A per-example backend: squared per-example norms and the clipped sum of one chunk of examples.

    ``backend(loss_fn, has_aux, params, batch, weight_fn) -> BackendOutput``. Its invariants (sensitivity <= C per
    example, norms in >= float32, a fast norm never below the true norm, non-finite examples dropped and counted,
    padding contributing exactly zero) are stated in the :mod:`jaxdp.per_example` docstring; they are what makes
    the noise of :func:`jaxdp.add_noise` sufficient.
    """

    def __call__(self, loss_fn: LossFn, has_aux: bool, params: PyTree, batch: PyTree,
                 weight_fn: WeightFn) -> BackendOutput: ...


# ----------------------------------------------------------------------------------------------------------
# Shared primitives


def clip_factor(norms: jax.Array, l2_clip_norm: float | jax.Array) -> jax.Array:
    """Opacus's per-example clip factor ``min(1, C / (norm + 1e-6))``.

    >>> import jax.numpy as jnp
    >>> [round(float(f), 4) for f in clip_factor(jnp.array([0.5, 4.0]), 2.0)]
    [1.0, 0.5]
    """
    return jnp.minimum(1.0, l2_clip_norm / (norms + CLIP_EPS))


def acc_dtype(dtype: Any) -> Any:
    """The dtype norms, clip factors and clipped sums are computed in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def sq_norms(g: jax.Array) -> jax.Array:
    """Per-example squared L2 norms ``[B]`` of a leaf with leading axis ``B``, accumulated in >= float32."""
    g = g.astype(acc_dtype(g.dtype))
    return jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)


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


def weighted_sum(weights: jax.Array, g: jax.Array) -> jax.Array:
    """``sum_i w_i g_i`` over the leading axis, accumulated in >= float32 and rounded to ``g``'s dtype by
    :func:`to_output`. Examples with weight 0 contribute exactly zero even when their gradient holds NaN/Inf
    (``0 * NaN`` would poison the sum)."""
    out_dtype, acc = g.dtype, acc_dtype(g.dtype)
    keep = (weights != 0).reshape((-1,) + (1,) * (g.ndim - 1))
    g = jnp.where(keep, g.astype(acc), jnp.zeros((), acc))
    return to_output(jnp.tensordot(weights.astype(acc), g, axes=1), out_dtype)


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


def check_losses(losses: jax.Array, batch_size: int) -> None:
    """Refuse a loss that is not per example: ``loss_fn`` must return ``[B]`` unreduced losses."""
    if losses.ndim != 1 or losses.shape[0] != batch_size:
        raise ValueError(
            f"loss_fn must return per-example losses of shape [B] = [{batch_size}], got shape {losses.shape}. "
            "Return the unreduced losses (no mean or sum over the batch): clipping needs each example's loss.")


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
    """Slash-joined key paths of the leaves of ``tree`` (in ``tree_leaves`` order).

    >>> leaf_names({"dense": {"kernel": 1, "bias": 2}})
    ['dense/bias', 'dense/kernel']
    """
    return [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def clip_weights(sq: Sequence[jax.Array], mask: jax.Array, groups: ClipGroups) -> ClipWeights:
    """The clip weights of one chunk: a pure function of the squared norms, the padding mask and the groups.

    For group ``k`` with squared norm ``s_ik`` (the sum over its leaves) the weight of every leaf in the group is
    ``f_ik = min(1, C_k / (sqrt(s_ik) + 1e-6))`` for a real example whose squared norms are all finite and
    non-negative, and 0 otherwise: a NaN, infinite or negative squared norm is no norm, so the example is dropped
    (never a NaN clip factor, never a 0 clamp that would leave it unclipped), and padding (mask False) weighs 0.

    >>> import jax.numpy as jnp
    >>> g = ClipGroups((1.0,), ("all",), (0,))
    >>> cw = clip_weights([jnp.array([4.0, jnp.nan, 0.25])], jnp.array([True, True, False]), g)
    >>> [round(float(w), 4) for w in cw.leaf_weights[0]], [bool(f) for f in cw.finite]
    ([0.5, 0.0, 0.0], [True, False, True])
    """
    sq = [x.astype(acc_dtype(x.dtype)) for x in sq]
    acc = functools.reduce(jnp.promote_types, [x.dtype for x in sq])
    group_sq = [jnp.zeros(mask.shape, acc) for _ in groups.norms]
    for leaf_sq, gi in zip(sq, groups.leaf_group):
        group_sq[gi] = group_sq[gi] + leaf_sq
    total_sq = functools.reduce(operator.add, group_sq)   # (one group at least)
    finite = jnp.isfinite(total_sq) & functools.reduce(jnp.logical_and, [gs >= 0 for gs in group_sq])
    real = mask & finite
    factors = [jnp.where(real, clip_factor(jnp.sqrt(jnp.where(real, gs, 0)), c), 0.0)
               for gs, c in zip(group_sq, groups.norms)]
    return ClipWeights(
        leaf_weights=[factors[gi] for gi in groups.leaf_group],
        total_sq=total_sq,
        finite=finite,
        group_clipped=jnp.stack([(f < 1.0) & real for f in factors]),
    )


# ----------------------------------------------------------------------------------------------------------
# The vmap backend


def vmap_backend(loss_fn: LossFn, has_aux: bool, params: PyTree, batch: PyTree, weight_fn: WeightFn
                 ) -> BackendOutput:
    """Materialise per-example gradients with ``vmap(grad)``; exact for any differentiable loss.

    Norms, weights and the weighted sum are computed in >= float32 whatever the parameter dtype, and the sum
    is rounded to the parameter dtype by :func:`to_output`.
    """

    def single(p, example):
        ex1 = jax.tree_util.tree_map(lambda x: x[None], example)
        out = loss_fn(p, ex1)
        losses, aux = out if has_aux else (out, None)
        check_losses(losses, 1)
        aux = jax.tree_util.tree_map(lambda a: a[0], aux)
        return losses[0], (losses[0], aux)

    grads, (losses, aux) = jax.vmap(jax.grad(single, has_aux=True), in_axes=(None, 0))(params, batch)
    g_leaves, treedef = jax.tree_util.tree_flatten(pin_low_precision(grads))
    sq = [sq_norms(g) for g in g_leaves]
    cw = weight_fn(sq)
    summed = [weighted_sum(w, g) for g, w in zip(g_leaves, cw.leaf_weights)]
    return BackendOutput(jax.tree_util.tree_unflatten(treedef, summed), sq, losses, aux, cw)


# ----------------------------------------------------------------------------------------------------------
# The registry


_REGISTRY: dict[str, PerExampleBackend] = {"vmap": vmap_backend}


def register_backend(name: str, backend: PerExampleBackend, *, replace: bool = False) -> None:
    """Make ``backend`` available as ``method=name`` in :func:`jaxdp.clipped_grad`, ``make_private`` and the
    trainer's ``training.method``.

    The backend must keep the invariants of :class:`PerExampleBackend` (module docstring): the privacy guarantee
    rests on them. The built-in names ``"vmap"``, ``"ghost"`` and ``"auto"`` cannot be replaced; another name
    that is already registered is replaced only with ``replace=True``.

    >>> from jaxdp import per_example
    >>> per_example.register_backend("my_vmap", per_example.vmap_backend)
    >>> "my_vmap" in per_example.backend_names()
    True
    >>> per_example.unregister_backend("my_vmap")

    Raises:
      TypeError: ``name`` is not a non-empty string or ``backend`` is not callable.
      ValueError: ``name`` is a built-in, or already registered and ``replace`` is False.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a backend name must be a non-empty string, got {name!r}")
    if not callable(backend):
        raise TypeError(f"backend {name!r} must be callable: backend(loss_fn, has_aux, params, batch, weight_fn) "
                        f"-> BackendOutput; got {backend!r}")
    if name in _REGISTRY:
        if name in BUILTIN_BACKENDS:
            raise ValueError(f"{name!r} is a built-in per-example backend and cannot be replaced; register yours "
                             "under another name and pass that name as method=")
        if not replace:
            raise ValueError(f"a per-example backend named {name!r} is already registered; pass replace=True to "
                             "replace it, or choose another name")
    _REGISTRY[name] = backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend (built-in backends cannot be removed).

    Raises:
      ValueError: ``name`` is a built-in or not registered.
    """
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"{name!r} is a built-in per-example backend and cannot be unregistered")
    if name not in _REGISTRY:
        raise ValueError(f"no per-example backend named {name!r} is registered; registered: {backend_names()}")
    del _REGISTRY[name]


def get_backend(name: str) -> PerExampleBackend:
    """The backend registered as ``name``.

    >>> from jaxdp import per_example
    >>> per_example.get_backend("vmap") is per_example.vmap_backend
    True

    Raises:
      ValueError: no backend of that name is registered (the message lists the registered ones).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {backend_names()} (registered per-example backends; add one "
                         f"with jaxdp.per_example.register_backend), got {name!r}") from None


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends: the built-ins first (``auto``, ``vmap``, ``ghost``), then the others in
    registration order.

    >>> from jaxdp import per_example
    >>> per_example.backend_names()[:3]
    ('auto', 'vmap', 'ghost')
    """
    return tuple(n for n in BUILTIN_BACKENDS if n in _REGISTRY) + tuple(
        n for n in _REGISTRY if n not in BUILTIN_BACKENDS)


__all__ = ["PerExampleBackend", "BackendOutput", "ClipWeights", "ClipGroups", "clip_weights", "vmap_backend",
           "register_backend", "unregister_backend", "get_backend", "backend_names", "BUILTIN_BACKENDS",
           "CLIP_EPS", "clip_factor", "acc_dtype", "sq_norms", "weighted_sum", "output_scale", "to_output",
           "pin_low_precision", "check_losses", "leaf_names"]
