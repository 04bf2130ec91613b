"""Small Flax NNX definitions of the two vision models of the scale benchmark (random init, nothing downloaded).

``WRN(depth=16, width=4)``: the wide ResNet of Zagoruyko & Komodakis (2016) with GroupNorm (16 groups) in place of
BatchNorm, as De et al. (2022) use for DP CIFAR-10: BatchNorm mixes examples of a batch, so a per-example gradient
(and hence per-example clipping) is not defined with it; GroupNorm normalises each example on its own. Pre-activation
blocks ``x + conv(act(gn(conv(act(gn(x))))))``, ``(depth - 4) / 6`` blocks per stage, widths ``16, 16w, 32w, 64w``,
strides 1, 2, 2, global average pool, linear head. WRN-16-4 on 32x32x3 has 2.75M parameters.

``ViT(patch=4, dim=192, depth=12, heads=3)``: ViT-Tiny (Dosovitskiy et al. 2021; Touvron et al. 2021's Tiny width)
on 32x32 images: 8x8 = 64 patch tokens plus a class token, pre-LayerNorm blocks, GELU MLP of width 4 * dim,
learned position embeddings, head on the class token. 5.4M parameters.

Both map images ``[B, 32, 32, 3]`` to logits ``[B, classes]``; every operation is per-example, so the per-example
loss ``cross_entropy(model(x), y)`` of example i depends on example i only (what per-example clipping needs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class _Block(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
        self.gn1 = nnx.GroupNorm(cin, num_groups=min(16, cin), rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs)
        self.gn2 = nnx.GroupNorm(cout, num_groups=min(16, cout), rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.short = (nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
                      if (cin != cout or stride != 1) else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.gn1(x))
        s = x if self.short is None else self.short(h)
        h = self.conv1(h)
        h = self.conv2(jax.nn.relu(self.gn2(h)))
        return s + h


class WRN(nnx.Module):
    """WRN-``depth``-``width`` with GroupNorm (see the module docstring)."""

    def __init__(self, depth: int = 16, width: int = 4, classes: int = 10, *, rngs: nnx.Rngs):
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        self.stem = nnx.Conv(3, 16, (3, 3), padding=1, use_bias=False, rngs=rngs)
        blocks, cin = [], 16
        for cout, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(n):
                blocks.append(_Block(cin, cout, stride if i == 0 else 1, rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.gn = nnx.GroupNorm(cin, num_groups=16, rngs=rngs)
        self.head = nnx.Linear(cin, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(jnp.mean(jax.nn.relu(self.gn(h)), axis=(1, 2)))


class _ViTBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
    """ViT with ``patch``-pixel patches on ``image``-pixel square images (see the module docstring)."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 192, depth: int = 12, heads: int = 3,
                 classes: int = 10, *, rngs: nnx.Rngs):
        n_tok = (image // patch) ** 2 + 1
        self.patch = nnx.Conv(3, dim, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n_tok, dim)))
        self.blocks = nnx.List([_ViTBlock(dim, heads, rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.patch(x)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        h = jnp.concatenate([jnp.broadcast_to(self.cls.value, (h.shape[0], 1, h.shape[-1])), h], axis=1)
        h = h + self.pos.value
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h)[:, 0])
