"""The training recipe of De et al. (2022), "Unlocking High-Accuracy Differentially Private Image
Classification through Scale": augmentation multiplicity and parameter averaging (EMA).

**Augmentation multiplicity.** Each example ``x_i`` is seen as ``K`` randomly augmented views ``a(x_i; k_1..k_K)``
and its per-example loss is the MEAN over the views,

    l_i(params) = (1/K) sum_k loss(params, a(x_i; k_k)),

so its gradient is the average of the views' gradients and :func:`jaxdp.clipped_grad` clips that average ONCE.
One example still contributes one clipped vector of norm <= C: the sensitivity, the noise and the accounting are
exactly those of plain DP-SGD, for any K and any augmentation (the augmentation only ever reads example ``i``).
(Clipping each view separately and summing would multiply the sensitivity by K.) ``K = 1`` with the identity
augmentation is plain DP-SGD. The augmentation randomness need not be secret.

Use ``clipped_grad(..., method="vmap")`` with the wrapped loss: the fast ghost norms assume each row of the
batch is one example seen once, which the K views break.

**Parameter averaging.** :func:`ema_update` keeps ``ema <- d_t ema + (1 - d_t) params`` after every step with
``d_t = min(decay, (1 + t) / (10 + t))`` (a warm-up, so early averages are not dominated by the
initialisation); the averaged parameters are used for evaluation. Post-processing: no privacy cost.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdp import _checks

PyTree = Any


def augmentation_multiplicity(loss_fn: Callable, augment_fn: Callable, multiplicity: int) -> Callable:
    """Wrap a per-example loss so each example's loss is the mean over ``multiplicity`` augmented views.

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example losses (``batch`` a pytree, leading axis ``B``).
      augment_fn: ``augment_fn(key, example) -> example``: one random view of ONE example (no batch axis); it
        must read nothing but that example.
      multiplicity: ``K >= 1``, views per example.

    Returns ``aug_loss(params, (batch, keys)) -> [B]`` where ``keys`` are ``B`` PRNG keys, one per example (fresh
    every step, e.g. :func:`augmentation_keys`). ``aug_loss``'s per-example value is
    ``mean_k loss_fn(params, view_k)[i]``: pass it to :func:`jaxdp.clipped_grad` (``method="vmap"``).
    All ``K`` views are averaged BEFORE clipping, so an example still contributes at most ``C``: the privacy
    analysis is that of plain DP-SGD.

    >>> import jax, jax.numpy as jnp
    >>> doubled = lambda key, ex: {"x": 2.0 * ex["x"]}     # a (deterministic) view of one example
    >>> aug = augmentation_multiplicity(lambda p, b: b["x"] @ p, doubled, 3)
    >>> keys = jax.random.split(jax.random.key(0), 2)     # one key per example
    >>> aug(jnp.ones(2), ({"x": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, keys)).tolist()
    [6.0, 14.0]

    Raises:
      ValueError: ``multiplicity`` is not a positive integer.
    """
    k = _checks.positive_int("multiplicity", multiplicity)

    def aug_loss(params: PyTree, batch_and_keys) -> jax.Array:
        batch, keys = batch_and_keys
        view_keys = jax.vmap(lambda kk: jax.random.split(kk, k))(keys)              # [B, K]
        views = jax.vmap(jax.vmap(augment_fn, in_axes=(0, None)), in_axes=(0, 0))(view_keys, batch)  # [B, K, ...]

        def view(j: int) -> PyTree:
            return jax.tree_util.tree_map(lambda v: v[:, j], views)

        # K calls of the user's loss on [B] examples each (the loss sees its usual shapes).
        total = loss_fn(params, view(0))
        for j in range(1, k):
            total = total + loss_fn(params, view(j))
        return total / k

    return aug_loss


def augmentation_keys(key: jax.Array, step: int | jax.Array, batch_size: int) -> jax.Array:
    """``batch_size`` augmentation keys for step ``step`` (``fold_in(key, step)`` split per example)."""
    return jax.random.split(jax.random.fold_in(key, step), batch_size)


def ema_update(ema: PyTree, params: PyTree, step: int | jax.Array, decay: float = 0.999) -> PyTree:
    """One EMA step: ``d = min(decay, (1 + step) / (10 + step))``; ``ema <- d * ema + (1 - d) * params``.

    Start with ``ema = params`` (the initial parameters) and call after every optimiser step; evaluate ``ema``.
    Post-processing of the private parameters: it costs no privacy.

    >>> import jax.numpy as jnp
    >>> ema = ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, step=0)   # d = min(0.999, 1 / 10) = 0.1
    >>> [round(float(v), 4) for v in ema["w"]]
    [0.9, 0.9]
    """
    step = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))
    return jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


__all__ = ["augmentation_multiplicity", "augmentation_keys", "ema_update"]
