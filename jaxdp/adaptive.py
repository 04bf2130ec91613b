"""Adaptive clipping: the clip norm follows a private quantile of the gradient norms (Andrew, Thakkar, McMahan,
Ramaswamy 2021, "Differentially Private Learning with Adaptive Clipping").

Every step, with clip norm ``C_t``, public expected batch size ``E``, target quantile ``gamma``, clip-update
rate ``eta`` and ``b_i = 1[||g_i|| <= C_t]`` for each real example of the batch:

    r_t     = sum_i (b_i - 1/2) + N(0, sigma_b^2)                    (released: centred unclipped count)
    b_t     = r_t / E + 1/2                                          (estimate of the unclipped fraction)
    C_{t+1} = C_t * exp(-eta * (b_t - gamma))                        (geometric update)
    G_t     = sum_i clip(g_i, C_t) + N(0, (sigma_eff C_t)^2 I)       (released: noisy clipped sum)
    update  = G_t / (E C_t)       (normalize=True, the default)      or   G_t / E   (normalize=False)

Privacy. Adding or removing one example changes the clipped sum by at most ``C_t`` and the centred count by
exactly ``1/2`` (that is why the bits are centred: an uncentred count has sensitivity 1). The pair of releases
is one Gaussian mechanism on the vector ``(G / (sigma_eff C_t), r / sigma_b)``, whose sensitivity is
``sqrt(sigma_eff^-2 + (2 sigma_b)^-2)``; it is exactly as private as one DP-SGD step with noise multiplier

    sigma = (sigma_eff^-2 + (2 sigma_b)^-2)^(-1/2)      <=>      sigma_eff = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)

(Andrew et al., Theorem 1). So the user's ``noise_multiplier`` ``sigma`` is what the accountant records, and
the gradient gets the slightly larger ``sigma_eff`` (needs ``2 sigma_b > sigma``; the default
``sigma_b = E / 20`` is the paper's). ``C_t`` is a function of earlier releases only (post-processing), so
dividing by it, or using it as the next clip norm, costs nothing. The estimate ``b_t`` subtracts the realised
batch size only inside the released, noised ``r_t`` and divides by the public ``E``, never by the batch size.

Both releases are drawn by :func:`jaxdp.add_noise` (each from its own key stream, ``fold_in(key, step)`` per
step, or OS entropy in secure mode), so the noise is the one sampler every other mechanism uses. (Since this
change, the count noise of a given seed differs from earlier versions -- same distribution, other draws; the
gradient noise is unchanged. Like the seed itself, these draws are private and never reported.)

Why ``normalize=True``. With plain SGD the step size of ``G_t / E`` grows linearly with ``C_t``: when the
median gradient norm is large (early training, a CNN), ``C_t`` climbs, the larger steps raise the loss and
the gradient norms, and ``C_t`` climbs further -- the run diverges (seen on MNIST: ``C`` ~13, accuracy 0.31
against 0.92 with fixed clipping, SGD, ``gamma`` 0.5, ``eta`` 0.2). Dividing by ``C_t`` makes every example's
contribution at most 1 and the noise std ``sigma_eff / E`` whatever ``C_t``: the learning rate keeps its
meaning (it is the learning rate of fixed clipping with ``C = 1``, i.e. the rate *relative to* ``C``) and the
clip norm only decides which examples are scaled down. Adam is nearly invariant to this scale either way.
"""
from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdp import _checks
from jaxdp.clipping import LossFn, clipped_grad
from jaxdp.noise import AddNoiseState, add_noise

PyTree = Any

DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_LEARNING_RATE = 0.2
_GRAD_STREAM, _COUNT_STREAM = 0x67726164, 0x636E7421  # "grad", "cnt!": independent noise streams


class AdaptiveClipState(NamedTuple):
    """Current clip norm ``C_t``, the step count, and the base PRNG key (None in secure mode)."""

    clip_norm: jax.Array
    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count (public name, kept)
    key: jax.Array | None


class AdaptiveClipping(NamedTuple):
    """``init() -> state``; ``step(params, batch, mask, state) -> (update, state, stats)``.

    ``noise_multiplier`` is the sigma to ACCOUNT (pass it to :mod:`jaxdp.accounting`; it composes the gradient
    and the count releases); ``effective_noise_multiplier`` is the (larger) sigma applied to the gradient sum and
    ``count_noise_std`` the std of the noise on the centred count.
    """

    init: Callable[[], AdaptiveClipState]
    step: Callable
    noise_multiplier: float
    effective_noise_multiplier: float
    count_noise_std: float


class AdaptiveClipConfig(NamedTuple):
    """Settings of adaptive clipping for :meth:`jaxdp.PrivacyEngine.make_private` (``adaptive_clipping=``).

    The initial clip norm is :meth:`~jaxdp.PrivacyEngine.make_private`'s ``l2_clip_norm``. See
    :func:`adaptive_clipping` for the meaning.
    """

    target_quantile: float = DEFAULT_TARGET_QUANTILE
    learning_rate: float = DEFAULT_LEARNING_RATE
    count_noise_std: float | None = None
    normalize: bool = True

    @classmethod
    def from_any(cls, value: AdaptiveClipConfig | dict | bool) -> AdaptiveClipConfig:
        """``True`` (defaults), a dict of the fields, or an :class:`AdaptiveClipConfig`."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls._fields))
            if unknown:
                raise ValueError(f"unknown adaptive clipping setting {unknown[0]!r}; allowed: {list(cls._fields)}")
            return cls(**value)
        raise TypeError("adaptive_clipping must be True, a dict of AdaptiveClipConfig fields "
                        f"{list(cls._fields)} or an AdaptiveClipConfig, got {value!r}")


def effective_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``sigma_eff = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``; 0 when ``sigma = 0`` (no privacy)."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(
            f"count_noise_std (sigma_b = {count_noise_std}) must exceed noise_multiplier / 2 = "
            f"{noise_multiplier / 2}: otherwise no gradient noise can make the pair of releases as private "
            "as noise_multiplier; raise count_noise_std (default expected_batch_size / 20) or the batch size")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


def composed_noise_multiplier(effective_noise_multiplier: float, count_noise_std: float) -> float:
    """The noise multiplier of the pair of releases: ``(sigma_eff^-2 + (2 sigma_b)^-2)^(-1/2)``.

    This is what an accountant must be given for a step that releases the gradient sum with
    ``sigma_eff`` and the centred count (sensitivity 1/2) with std ``sigma_b``.
    """
    if effective_noise_multiplier == 0 or count_noise_std == 0:
        return 0.0
    return (effective_noise_multiplier ** -2 + (2 * count_noise_std) ** -2) ** -0.5


def adaptive_clipping(
    loss_fn: LossFn,
    *,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array | int | None,
    initial_clip_norm: float = 1.0,
    target_quantile: float = DEFAULT_TARGET_QUANTILE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    count_noise_std: float | None = None,
    normalize: bool = True,
    method: str = "auto",
    has_aux: bool = False,
    microbatch_size: int | None = None,
    trainable: PyTree | None = None,
    secure: bool = False,
) -> AdaptiveClipping:
    """DP-SGD gradients with a clip norm that tracks a private quantile of per-example gradient norms.

    Args:
      loss_fn: ``loss_fn(params, batch) -> per-example losses [B]`` (or ``(losses, aux)`` with ``has_aux``).
      noise_multiplier: ``sigma`` to ACCOUNT: the joint privacy of the gradient and the count releases.
      expected_batch_size: public ``E = q N``; the gradient and the count are divided by it.
      key: PRNG key or int seed (required unless ``secure``); distinct noise per step and per release.
      initial_clip_norm: ``C_0``. The geometric update moves ``C`` by a factor up to ``exp(eta / 2)`` per
        step, so ``C_0`` need not be tuned closely (Andrew et al. start at 0.1).
      target_quantile: ``gamma``, the fraction of examples that should be unclipped (0.5: the median norm).
      learning_rate: ``eta`` of the geometric update (0.2 is the paper's recommendation).
      count_noise_std: ``sigma_b``, std of the noise on the centred count; default ``E / 20`` (the paper's).
        Larger spends less of the budget on the count but makes ``C`` noisier.
      normalize: divide the update by ``C_t`` (see the module docstring); ``False`` reproduces the paper's
        and Opacus's un-normalised update, whose SGD step size grows with ``C_t``.
      method, has_aux, microbatch_size, trainable: as for :func:`jaxdp.clipped_grad`.
      secure: draw all noise from the OS entropy source (no key).

    Returns:
      :class:`AdaptiveClipping`. ``step(params, batch, mask, state) -> (update, state, stats)``; ``update`` has
      the structure of params; ``stats`` is a dict with ``clip_norm`` (``C_t`` used in this step),
      ``unclipped_fraction`` (the released estimate ``b_t``), ``per_example_norms``, ``per_example_losses``,
      ``aux`` and ``clip_stats`` (a :class:`~jaxdp.ClipStats` with norms in the original units). The
      per-example statistics are private data: do not publish them. ``step`` is pure and jit-able.

    Raises:
      ValueError: a negative ``noise_multiplier``, ``learning_rate`` or ``count_noise_std``, a non-positive
        ``expected_batch_size`` or ``initial_clip_norm``, ``target_quantile`` outside ``[0, 1]``,
        ``count_noise_std = 0`` with noise (the count would be released without noise), a count noise too small
        for the gradient's noise (``2 sigma_b <= sigma``), or no ``key`` without ``secure``.
    """
    sigma = _checks.non_negative("noise_multiplier", noise_multiplier)
    e = _checks.positive("expected_batch_size", expected_batch_size)
    _checks.positive("initial_clip_norm", initial_clip_norm)
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target_quantile must lie in [0, 1], got {target_quantile}")
    _checks.non_negative("learning_rate (of the clip norm)", learning_rate)
    sigma_b = e / 20.0 if count_noise_std is None else _checks.non_negative("count_noise_std", count_noise_std)
    if sigma > 0 and sigma_b == 0:
        raise ValueError("count_noise_std = 0 releases the unclipped count without noise: not private. Use "
                         "count_noise_std > noise_multiplier / 2 (default expected_batch_size / 20)")
    sigma_eff = effective_noise_multiplier(sigma, sigma_b)
    base_key = None if secure else _checks.prng_key(key, "adaptive_clipping")

    # clip(g, C) = C * clip(g / C, 1): the loss is scaled by 1/C (passed in the batch, so that one jitted
    # clipped_grad serves every C) and clipped at 1. Each example's contribution to C * (scaled sum) has
    # norm <= C; its clip factor is min(1, C / (||g|| + 1e-6 C)).
    if has_aux:
        def scaled_loss(p, b):
            losses, aux = loss_fn(p, b["batch"])
            return losses * b["inv_c"], aux
    else:
        def scaled_loss(p, b):
            return loss_fn(p, b["batch"]) * b["inv_c"]
    grad_fn = clipped_grad(scaled_loss, 1.0, method, has_aux=has_aux, microbatch_size=microbatch_size,
                           trainable=trainable)
    # Both releases are drawn by jaxdp's public noise transform, each from its own stream (privacy rule 7):
    # (sum + N(0, sigma_eff^2)) / E on the scaled sum, i.e. (G_t / C_t) / E; and the centred count
    # r_t = centred + N(0, sigma_b^2) (l2_clip_norm 1 and E 1: std sigma_b, no division). Their own init keys are
    # never used: every step passes AddNoiseState(count, key of its stream), derived from the state's key.
    noise_key = None if secure else base_key
    noise_tx = add_noise(noise_multiplier=sigma_eff, l2_clip_norm=1.0, expected_batch_size=e, key=noise_key,
                         secure=secure, trainable=trainable)
    count_tx = add_noise(noise_multiplier=sigma_b, l2_clip_norm=1.0, expected_batch_size=1.0, key=noise_key,
                         secure=secure)

    def init() -> AdaptiveClipState:
        return AdaptiveClipState(jnp.asarray(initial_clip_norm, jnp.float32), jnp.zeros((), jnp.int32), base_key)

    def step(params: PyTree, batch: PyTree, mask: jax.Array | None, state: AdaptiveClipState):
        C = state.clip_norm
        n = jax.tree_util.tree_leaves(batch)[0].shape[0]
        scaled_batch = {"batch": batch, "inv_c": jnp.full((n,), 1.0 / C, jnp.float32)}
        summed, cs = grad_fn(params, scaled_batch, mask)
        real = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask) != 0
        unclipped = jnp.sum(real & (cs.per_example_norms <= 1.0))          # NaN (dropped) counts as clipped
        centred = unclipped - 0.5 * cs.num_examples                          # sensitivity 1/2
        # two independent streams from the state's key (not baked into the compiled step): gradient, count
        if secure:
            grad_key = count_key = None
        else:
            assert state.key is not None  # init() stores the base key unless secure
            grad_key = jax.random.fold_in(state.key, _GRAD_STREAM)
            count_key = jax.random.fold_in(state.key, _COUNT_STREAM)
        released, _ = count_tx.update(centred.astype(jnp.float32), AddNoiseState(state.count, count_key))
        frac = released / e + 0.5
        new_C = (C * jnp.exp(-learning_rate * (frac - target_quantile))).astype(jnp.float32)
        update, _ = noise_tx.update(summed, AddNoiseState(state.count, grad_key))
        if not normalize:
            update = jax.tree_util.tree_map(lambda u: u * C.astype(u.dtype), update)
        cs = cs._replace(per_example_norms=cs.per_example_norms * C, per_example_losses=cs.per_example_losses * C,
                         layer_norm_mean={k: v * C for k, v in cs.layer_norm_mean.items()},
                         layer_norm_max={k: v * C for k, v in cs.layer_norm_max.items()})
        stats = {"clip_norm": C, "unclipped_fraction": frac, "per_example_norms": cs.per_example_norms,
                 "per_example_losses": cs.per_example_losses, "aux": cs.aux, "clip_stats": cs}
        return update, AdaptiveClipState(new_C, state.count + 1, state.key), stats

    return AdaptiveClipping(init, step, float(sigma), float(sigma_eff), float(sigma_b))


class AdaptiveOptState(NamedTuple):
    """Optimiser state of a private training object with adaptive clipping: the clip state, the optimiser's."""

    clip: AdaptiveClipState
    inner: PyTree


def private_update(ada: AdaptiveClipping, optimizer: Any) -> tuple[Callable, Callable]:
    """``(init(params) -> AdaptiveOptState, step(params, opt_state, batch, mask) -> (params, opt_state,
    ClipStats))``: one jitted private step with adaptive clipping followed by any optax ``optimizer``
    (the engine's step with ``adaptive_clipping=``)."""
    import optax

    def init(params: PyTree) -> AdaptiveOptState:
        return AdaptiveOptState(ada.init(), optimizer.init(params))

    @jax.jit
    def step(params: PyTree, opt_state: AdaptiveOptState, batch: PyTree, mask: jax.Array):
        g, clip_state, stats = ada.step(params, batch, mask, opt_state.clip)
        updates, inner = optimizer.update(g, opt_state.inner, params)
        return optax.apply_updates(params, updates), AdaptiveOptState(clip_state, inner), stats["clip_stats"]

    return init, step


__all__ = ["adaptive_clipping", "AdaptiveClipping", "AdaptiveClipState", "AdaptiveClipConfig", "AdaptiveOptState",
           "effective_noise_multiplier", "composed_noise_multiplier", "private_update"]
