"""Adaptive clipping: the clip norm follows a private quantile of the gradient norms (Andrew et al. 2019).

Every step, with clip norm ``C_t``, expected batch size ``E`` and target quantile ``gamma``:

    b_t     = (#{real examples with ||g_i|| <= C_t} + N(0, sigma_b^2)) / E     (private unclipped fraction)
    C_{t+1} = C_t * exp(-eta * (b_t - gamma))                                  (geometric update)
    update  = (sum_i clip(g_i, C_t) + N(0, (sigma_eff * C_t)^2 I)) / E

The count query has sensitivity 1 and the gradient sum sensitivity ``C_t``; releasing both with noise
``sigma_b`` and ``sigma_eff`` is a Gaussian mechanism with the noise multiplier ``sigma`` that the user
accounts, when ``sigma_eff^-2 + (2 sigma_b)^-2 = sigma^-2`` (Andrew et al., Thm. 1; Opacus's AdaClip uses the
same split). So ``sigma_eff = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)`` (slightly larger than ``sigma``) is used for
the gradient and the ORIGINAL ``noise_multiplier`` is what goes to the accountant
(``AdaptiveClipping.noise_multiplier``). This needs ``2 sigma_b > sigma``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdp import _checks, clipping
from jaxdp.noise import gaussian_like

PyTree = Any


class AdaptiveClipState(NamedTuple):
    """Current clip norm ``C_t``, the step count, and the base PRNG key."""

    clip_norm: jax.Array
    count: jax.Array
    key: jax.Array


class AdaptiveClipping(NamedTuple):
    """``init() -> state``; ``step(params, batch, mask, state) -> (noisy_mean_grad, state, stats)``.

    ``noise_multiplier`` is the sigma to ACCOUNT (pass it to :mod:`jaxdp.accounting`);
    ``effective_noise_multiplier`` is the (larger) sigma applied to the gradient sum.
    """

    init: Callable[[], AdaptiveClipState]
    step: Callable
    noise_multiplier: float
    effective_noise_multiplier: float
    count_noise_std: float


def effective_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``sigma_eff = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``; 0 when ``sigma = 0`` (no privacy)."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(
            f"count_noise_std (sigma_b = {count_noise_std}) must exceed noise_multiplier / 2 = "
            f"{noise_multiplier / 2}: otherwise no gradient noise can make the pair of releases as private "
            "as noise_multiplier; raise count_noise_std (default expected_batch_size / 20)")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


def adaptive_clipping(
    loss_fn: clipping.LossFn,
    *,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array | int,
    initial_clip_norm: float = 1.0,
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    count_noise_std: float | None = None,
    method: str = "auto",
    has_aux: bool = False,
) -> AdaptiveClipping:
    """DP-SGD gradients with a clip norm that tracks a private quantile of per-example gradient norms.

    Args:
      loss_fn: ``loss_fn(params, batch) -> per-example losses [B]``.
      noise_multiplier: ``sigma`` to account (the joint privacy of gradient and count releases).
      expected_batch_size: public ``E = q N``; both the gradient and the count are divided by it.
      key: PRNG key or int seed (required; distinct noise per step via ``fold_in``).
      initial_clip_norm: ``C_0``.
      target_quantile: ``gamma``, the fraction of examples that should be unclipped.
      learning_rate: ``eta`` of the geometric update.
      count_noise_std: ``sigma_b``, std of the noise on the unclipped count; default ``E / 20`` (the paper's).
      method: per-example norm method (``"auto"`` | ``"ghost"`` | ``"vmap"``).
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    """
    sigma = _checks.non_negative("noise_multiplier", noise_multiplier)
    e = _checks.positive("expected_batch_size", expected_batch_size)
    _checks.positive("initial_clip_norm", initial_clip_norm)
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target_quantile must lie in [0, 1], got {target_quantile}")
    sigma_b = e / 20.0 if count_noise_std is None else _checks.non_negative("count_noise_std", count_noise_std)
    sigma_eff = effective_noise_multiplier(sigma, sigma_b)
    base_key = _checks.prng_key(key, "adaptive_clipping")
    impl = clipping._resolve_method(method)

    def init() -> AdaptiveClipState:
        return AdaptiveClipState(jnp.asarray(initial_clip_norm, jnp.float32), jnp.zeros((), jnp.int32), base_key)

    def step(params: PyTree, batch: PyTree, mask: jax.Array | None, state: AdaptiveClipState):
        C = state.clip_norm
        B = clipping._batch_size(batch)
        m = jnp.ones((B,), bool) if mask is None else (jnp.asarray(mask) != 0)
        out = {}

        def weight_fn(sq):
            total = sum(sq)
            real = m & jnp.isfinite(total)
            norms = jnp.sqrt(total)
            out["norms"], out["real"] = norms, real
            f = jnp.where(real, clipping.clip_factor(norms, C), 0.0)
            return [f] * len(sq)

        summed, _, losses, aux = impl(loss_fn, has_aux, params, batch, weight_fn)
        step_key = jax.random.fold_in(state.key, state.count)
        count_key, grad_key = jax.random.split(step_key)
        unclipped = jnp.sum(out["real"] & (out["norms"] <= C))
        noisy_frac = (unclipped + sigma_b * jax.random.normal(count_key)) / e
        new_C = C * jnp.exp(-learning_rate * (noisy_frac - target_quantile))
        leaves, treedef = jax.tree_util.tree_flatten(summed)
        noise = gaussian_like(grad_key, leaves, sigma_eff * C)
        noisy = [(g + z) / e for g, z in zip(leaves, noise)]
        stats = {"clip_norm": C, "unclipped_fraction": noisy_frac, "per_example_norms": out["norms"],
                 "per_example_losses": losses, "aux": aux}
        new_state = AdaptiveClipState(new_C.astype(jnp.float32), state.count + 1, state.key)
        return jax.tree_util.tree_unflatten(treedef, noisy), new_state, stats

    return AdaptiveClipping(init, step, float(sigma), float(sigma_eff), float(sigma_b))


__all__ = ["adaptive_clipping", "AdaptiveClipping", "AdaptiveClipState", "effective_noise_multiplier"]
