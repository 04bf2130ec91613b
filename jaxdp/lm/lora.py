"""LoRA adapters (Hu et al. 2021) for the GPT-2 of :mod:`jaxdp.lm.model`, and freezing masks.

A LoRA-wrapped dense layer computes, in activation space,

    y = x W + b + (alpha / r) * (x A) B,      A: [in, r],  B: [r, out],  B initialised to 0

so the wrapped model starts exactly equal to the base model. ``A`` and ``B`` are :class:`flax.nnx.LoRAParam`
variables (a subclass of ``nnx.Param``): ``nnx.split(model, nnx.LoRAParam, ...)`` separates them from the frozen
base weights. Because the adapters are two ordinary sequence-shaped dense products, per-example gradient norms
for them can be computed by ghost clipping (``method="auto"``) without materialising per-example gradients.

Targets (names as in PEFT for GPT-2, plus the q/k/v slices of the fused ``c_attn``):
``"c_attn"`` (whole fused projection), ``"q"``, ``"k"``, ``"v"`` (one adapter on that third of ``c_attn``'s
output), ``"attn.c_proj"``, ``"mlp.c_fc"``, ``"mlp.c_proj"``, and ``"c_proj"`` (both projections).

Privacy: only the adapters are trained, so only they are clipped and noised; the frozen base weights are
public (pre-trained) or were trained on other data, and are never touched by the private data.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp import _nnx
from jaxdp.lm.model import GPT2

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "lora_filter", "last_k_filter", "count_params",
           "TARGETS"]

TARGETS = ("c_attn", "q", "k", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "c_proj")


class LoRALinear(nnx.Module):
    """``base(x) + scale * sum_s place_s((x A_s) B_s)``: LoRA on a whole layer or on column slices of it.

    Args:
      base: the frozen :class:`nnx.Linear` (kernel ``[in, out]``).
      rank: ``r``.
      alpha: LoRA's ``alpha``; the update is scaled by ``alpha / r``.
      slices: ``(start, stop)`` column ranges of the output that get their own adapter; None = whole output.
      rngs: for ``A``'s initialisation, uniform in ``+-1/sqrt(in)`` (PEFT's default); ``B`` starts at 0.
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 slices: Sequence[tuple[int, int]] | None = None):
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        n_in, n_out = _nnx.get(base.kernel).shape
        self.base = base
        self.rank = rank
        self.scale = float(alpha) / rank
        self.slices = tuple((int(a), int(b)) for a, b in (slices or [(0, n_out)]))
        bound = 1.0 / math.sqrt(n_in)
        dtype = _nnx.get(base.kernel).dtype
        self.lora_a = nnx.List([
            nnx.LoRAParam(jax.random.uniform(rngs.params(), (n_in, rank), dtype, -bound, bound))
            for _ in self.slices])
        self.lora_b = nnx.List([nnx.LoRAParam(jnp.zeros((rank, b - a), dtype)) for a, b in self.slices])

    def delta(self) -> jax.Array:
        """The dense weight update ``scale * A B`` placed in its columns (shape of the base kernel)."""
        w = jnp.zeros_like(_nnx.get(self.base.kernel))
        for (a, b), la, lb in zip(self.slices, self.lora_a, self.lora_b):
            w = w.at[:, a:b].add(self.scale * (_nnx.get(la) @ _nnx.get(lb)))
        return w

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        n_out = y.shape[-1]
        for (a, b), la, lb in zip(self.slices, self.lora_a, self.lora_b):
            d = (x @ _nnx.get(la)) @ _nnx.get(lb) * self.scale
            if (a, b) == (0, n_out):
                y = y + d
            else:
                pad = [(0, 0)] * (d.ndim - 1) + [(a, n_out - b)]
                y = y + jnp.pad(d, pad)
        return y


def _targets(targets: Sequence[str]) -> set[str]:
    ts = set(targets)
    unknown = ts - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {TARGETS}")
    if "c_attn" in ts and ts & {"q", "k", "v"}:
        raise ValueError("target either the whole 'c_attn' or its slices 'q'/'k'/'v', not both")
    if "c_proj" in ts:
        ts |= {"attn.c_proj", "mlp.c_proj"}
    return ts


def apply_lora(model: GPT2, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("q", "v"), *,
               rngs: nnx.Rngs, layers: Sequence[int] | None = None) -> GPT2:
    """Wrap the target dense layers of ``model`` in :class:`LoRALinear` (in place; returns ``model``).

    Args:
      rank, alpha: LoRA rank ``r`` and scale numerator (update scaled by ``alpha / r``).
      targets: which projections get adapters (see :data:`TARGETS`); default query and value, as in the
        LoRA paper.
      rngs: PRNG streams for the adapters' initialisation (required: no hidden default randomness).
      layers: block indices to adapt (default: all).
    """
    ts = _targets(targets)
    D = model.cfg.n_embd
    qkv = {"q": (0, D), "k": (D, 2 * D), "v": (2 * D, 3 * D)}
    for i, block in enumerate(model.h):
        if layers is not None and i not in layers:
            continue
        attn, mlp = block.attn, block.mlp
        if isinstance(attn.c_attn, LoRALinear) or isinstance(attn.c_proj, LoRALinear):
            raise ValueError("the model already has LoRA adapters; merge_lora() it first")
        if "c_attn" in ts:
            attn.c_attn = LoRALinear(attn.c_attn, rank, alpha, rngs=rngs)
        sl = [qkv[t] for t in ("q", "k", "v") if t in ts]
        if sl:
            attn.c_attn = LoRALinear(attn.c_attn, rank, alpha, rngs=rngs, slices=sl)
        if "attn.c_proj" in ts:
            attn.c_proj = LoRALinear(attn.c_proj, rank, alpha, rngs=rngs)
        if "mlp.c_fc" in ts:
            mlp.c_fc = LoRALinear(mlp.c_fc, rank, alpha, rngs=rngs)
        if "mlp.c_proj" in ts:
            mlp.c_proj = LoRALinear(mlp.c_proj, rank, alpha, rngs=rngs)
    return model


def merge_lora(model: GPT2) -> GPT2:
    """Fold every adapter into its base kernel (``W <- W + (alpha/r) A B``) and remove it (in place).

    The merged model computes the same function with no extra cost, and saves with Hugging Face names.
    """
    for block in model.h:
        for owner, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                            (block.mlp, "c_proj")):
            layer = getattr(owner, name)
            if isinstance(layer, LoRALinear):
                base = layer.base
                _nnx.put(base.kernel, _nnx.get(base.kernel) + layer.delta())
                setattr(owner, name, base)
    return model


# ----------------------------------------------------------------------------------------------------------
# What to train

#: An NNX filter: a variable type (``nnx.LoRAParam``) or a predicate on ``(path, variable)``.
Filter = type | Callable[[tuple, nnx.Variable], bool]

lora_filter: Filter = nnx.LoRAParam
"""``nnx`` filter selecting the LoRA adapter weights (everything else frozen)."""


def last_k_filter(model: GPT2, k: int, *, head: bool = True) -> Filter:
    """``nnx`` filter that trains the last ``k`` blocks (and, with ``head``, ``ln_f`` and the tied head ``wte``).

    GPT-2 ties the output head to the token embedding, so training "the head" trains ``wte`` (both uses).
    With ``k = 0`` and ``head = True`` only the head is trained.
    """
    n = model.cfg.n_layer
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, n_layer={n}], got {k!r}")
    if k == 0 and not head:
        raise ValueError("k=0 with head=False trains nothing")

    def filt(path, var) -> bool:
        if not isinstance(var, nnx.Param):
            return False
        if path[0] == "h":
            return int(path[1]) >= n - k
        return head and path[0] in ("ln_f", "wte")

    return filt


def count_params(state) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(state)))
