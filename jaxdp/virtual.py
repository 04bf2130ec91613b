"""Virtual batches: a logical batch larger than memory, processed in fixed-size physical chunks.

``virtual_batch_grad`` returns the same SUM of clipped per-example gradients as :func:`jaxdp.clipped_grad` on
the whole logical batch, but computes it in ``ceil(B / physical_batch_size)`` chunks inside one
``lax.scan``: only one chunk's activations (and, for the vmap fallback, per-example gradients) are alive at a
time, so peak memory is that of one physical chunk (measured in ``benchmarks/step_speed.py``). The last chunk
is padded with masked-out examples (mask False: exactly zero contribution, privacy rule 4).

Privacy: clipping is per example, so chunking does not change the sensitivity ``C`` of the sum; add noise
ONCE to the returned sum (e.g. with :func:`jaxdp.add_noise`), never per chunk (privacy rule 2). The result
does not depend on the chunk size (up to float summation order; tests check 1e-5).
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

from jaxdp import _checks
from jaxdp.clipping import LossFn, clipped_grad

PyTree = Any


def virtual_batch_grad(
    loss_fn: LossFn,
    l2_clip_norm: float | PyTree,
    physical_batch_size: int,
    method: str = "auto",
    *,
    has_aux: bool = False,
    trainable: PyTree | None = None,
) -> Callable:
    """Build ``grad_fn(params, batch, mask=None) -> (summed, stats)`` over a logical batch in physical chunks.

    Args:
      loss_fn: ``loss_fn(params, batch) -> per-example losses [B]`` as for :func:`jaxdp.clipped_grad`.
      l2_clip_norm: ``C`` (or a per-layer pytree); the sensitivity of the returned sum.
      physical_batch_size: examples processed at once (the memory knob). Any logical batch size ``B`` works;
        it is padded up to a multiple of this with masked-out examples.
      method: ``"auto"`` | ``"ghost"`` | ``"vmap"``, as for :func:`jaxdp.clipped_grad`.
      has_aux, trainable: as for :func:`jaxdp.clipped_grad`.

    Returns:
      ``grad_fn(params, batch, mask=None)`` returning the SUM over real examples of clipped gradients and
      :class:`jaxdp.ClipStats` for the whole logical batch. Add noise once, to this sum.

    Raises:
      ValueError: ``physical_batch_size`` is not a positive integer, or as :func:`jaxdp.clipped_grad`.
    """
    _checks.positive_int("physical_batch_size", physical_batch_size)
    return clipped_grad(loss_fn, l2_clip_norm, method, has_aux=has_aux,
                        microbatch_size=physical_batch_size, trainable=trainable)


__all__ = ["virtual_batch_grad"]
