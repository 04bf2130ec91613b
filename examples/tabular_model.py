"""A user's own Flax NNX model for tabular data, named from a YAML config (``model: {module: "tabular_model.py:
WideAndDeep", kwargs: {...}}``). Used by ``examples/tabular_csv.py``.

Any ``nnx.Module`` works the same way: jaxdp builds it as ``Class(**kwargs, rngs=nnx.Rngs(seed))``, passing
``input_shape`` and ``num_classes`` when the constructor takes them, and needs it to map ``[B, *input_shape]`` to
logits ``[B, num_classes]``. It must not mix examples (no BatchNorm; LayerNorm and GroupNorm are fine), since
per-example clipping bounds one example's influence only when each example's loss depends on that example alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx


class WideAndDeep(nnx.Module):
    """Wide (a linear model on the raw features) + deep (an MLP with LayerNorm) branches, summed into logits.

    LayerNorm normalises each example over its own features, so it keeps examples independent (unlike
    BatchNorm, which ``jaxdp.validate`` refuses).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (32, 32), *,
                 rngs: nnx.Rngs):
        d = int(math.prod(input_shape))
        self.wide = nnx.Linear(d, num_classes, rngs=rngs)
        dims = [d, *hidden]
        self.deep = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.norm = nnx.LayerNorm(dims[-1], rngs=rngs)
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.reshape(x.shape[0], -1)
        h = x
        for layer in self.deep:
            h = jnp.tanh(layer(h))
        return self.wide(x) + self.head(self.norm(h))
