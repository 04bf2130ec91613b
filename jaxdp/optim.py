"""DP optimisers: :func:`jaxdp.add_noise` chained with optax's optimisers.

Both take the SUM of clipped per-example gradients (the output of :func:`jaxdp.clipped_grad`) as their input
``updates``; the noise and the division by the expected batch size happen first, then the optimiser.
Post-processing of a DP quantity is DP, so any optax optimiser may follow the noise.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from jaxdp import _checks
from jaxdp.noise import add_noise


@_checks.keyword_only("l2_clip_norm", "noise_multiplier", "expected_batch_size", "key", "momentum", "nesterov")
def dpsgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    l2_clip_norm: float | Any,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array | int | None = None,
    momentum: float | None = None,
    nesterov: bool = False,
    secure: bool = False,
    trainable: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """DP-SGD (Abadi et al. 2016): ``(S + N(0,(sigma C)^2)) / E`` then ``optax.sgd``.

    Every argument after ``learning_rate`` is keyword-only (positional calls, in the old order
    ``C, sigma, E, key, momentum, nesterov``, still work with a ``DeprecationWarning``).
    ``trainable``: bool pytree prefix of params; frozen leaves get no noise (pair with ``optax.masked`` or
    ``clipped_grad(trainable=...)`` so they also get no update).

    >>> import jaxdp
    >>> tx = jaxdp.dpsgd(0.1, l2_clip_norm=1.0, noise_multiplier=1.1, expected_batch_size=256, key=0)

    Raises:
      ValueError, TypeError: as :func:`jaxdp.add_noise`.
    """
    return optax.chain(
        add_noise(noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                  expected_batch_size=expected_batch_size, key=key, secure=secure, trainable=trainable),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


@_checks.keyword_only("l2_clip_norm", "noise_multiplier", "expected_batch_size", "key", "b1", "b2", "eps")
def dpadam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    l2_clip_norm: float | Any,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array | int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    secure: bool = False,
    trainable: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """DP-Adam: ``(S + N(0,(sigma C)^2)) / E`` then ``optax.adam`` (keyword-only arguments and ``trainable`` as in
    :func:`dpsgd`; the old positional order was ``C, sigma, E, key, b1, b2, eps``).

    The noise is added to the clipped sum BEFORE Adam's moments: they are post-processing of the noisy average.
    Without noise (``noise_multiplier=0``, not private) Adam's first step is ``-lr * sign(S / E)``:

    >>> import jax.numpy as jnp
    >>> tx = dpadam(0.1, l2_clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2.0, key=0)
    >>> params = {"w": jnp.zeros(2)}
    >>> summed = {"w": jnp.array([1.0, -0.5])}                  # a clipped sum S (jaxdp.clipped_grad)
    >>> updates, _ = tx.update(summed, tx.init(params), params)
    >>> [round(float(u), 3) for u in updates["w"]]
    [-0.1, 0.1]

    Raises:
      ValueError, TypeError: as :func:`jaxdp.add_noise`.
    """
    return optax.chain(
        add_noise(noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                  expected_batch_size=expected_batch_size, key=key, secure=secure, trainable=trainable),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
    )


__all__ = ["dpsgd", "dpadam"]
