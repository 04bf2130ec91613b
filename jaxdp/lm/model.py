"""A GPT-2 decoder in Flax NNX, loadable from a local Hugging Face checkpoint directory.

The architecture is GPT-2's (Radford et al. 2019), with Hugging Face's module names so that checkpoints map
one to one::

    x = wte[tokens] + wpe[positions]
    for each block h[i]:
        x = x + attn.c_proj(causal_self_attention(attn.c_attn(ln_1(x))))     # c_attn: D -> 3D (q | k | v)
        x = x + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(x))))                      # c_fc: D -> 4D
    logits = ln_f(x) @ wte^T                                                  # tied language-model head

Every dense layer is a :class:`flax.nnx.Linear` whose ``kernel`` has shape ``[in, out]`` -- the same layout as
the ``Conv1D`` weights in Hugging Face's GPT-2, so loading copies the arrays without transposing. There is no
dropout (DP fine-tuning here is deterministic given the data and the noise), and no cross-example operation:
the loss of one sequence never depends on another sequence in the batch, as per-example clipping requires.

Nothing is downloaded: :func:`load_pretrained` reads ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) from a directory you already have, e.g. one written by
``transformers``' ``save_pretrained`` or fetched by you with ``huggingface-cli download gpt2``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any
from collections.abc import Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdp import _nnx
from jaxdp._io import atomic_write

__all__ = ["GPT2Config", "GPT2", "load_pretrained", "save_pretrained", "load_hf_state_dict",
           "hf_to_nnx_name", "nnx_to_hf_name", "causal_lm_logits"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters (Hugging Face ``config.json`` names).

    The defaults are GPT-2 small (124M parameters). Tests and examples use tiny sizes, e.g.
    ``GPT2Config(vocab_size=257, n_positions=64, n_embd=64, n_layer=2, n_head=4)``.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None          # MLP width; None = 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPT2Config:
        """Build from a Hugging Face ``config.json`` dict (unknown keys are ignored)."""
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json describes model_type={model_type!r}; only 'gpt2' is supported")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {act!r} is not supported (GPT-2 uses 'gelu_new')")
        if d.get("tie_word_embeddings", True) is False:
            raise ValueError("untied lm_head is not supported: GPT-2 ties the head to wte")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function="gelu_new",
                 n_ctx=self.n_positions, tie_word_embeddings=True)
        return d


def _dense(cfg: GPT2Config, n_in: int, n_out: int, rngs: nnx.Rngs, std: float | None = None) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, kernel_init=nnx.initializers.normal(std or cfg.initializer_range),
                      bias_init=nnx.initializers.zeros, rngs=rngs)


class Attention(nnx.Module):
    """Causal multi-head self-attention with a fused ``c_attn`` (q | k | v) and an output ``c_proj``."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.n_head = cfg.n_head
        # (Any: an nnx.Linear, or the jaxdp.lm.lora.LoRALinear that apply_lora puts in its place)
        self.c_attn: Any = _dense(cfg, cfg.n_embd, 3 * cfg.n_embd, rngs)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at initialisation.
        self.c_proj: Any = _dense(cfg, cfg.n_embd, cfg.n_embd, rngs,
                             std=cfg.initializer_range / math.sqrt(2 * cfg.n_layer))

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, T, D = x.shape
        H = self.n_head
        qkv = self.c_attn(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)

        def heads(t):
            return jnp.swapaxes(t.reshape(*lead, T, H, D // H), -2, -3)   # [..., H, T, hd]

        q, k, v = heads(q), heads(k), heads(v)
        scores = jnp.einsum("...qd,...kd->...qk", q, k) / jnp.sqrt(jnp.asarray(D // H, x.dtype))
        causal = jnp.tril(jnp.ones((T, T), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        att = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("...qk,...kd->...qd", att, v)
        y = jnp.swapaxes(y, -2, -3).reshape(*lead, T, D)
        return self.c_proj(y)


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        # (Any: an nnx.Linear, or the jaxdp.lm.lora.LoRALinear that apply_lora puts in its place)
        self.c_fc: Any = _dense(cfg, cfg.n_embd, cfg.inner, rngs)
        self.c_proj: Any = _dense(cfg, cfg.inner, cfg.n_embd, rngs,
                             std=cfg.initializer_range / math.sqrt(2 * cfg.n_layer))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.ln_2 = nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, rngs=rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nnx.Module):
    """GPT-2 language model (decoder + tied head). ``model(tokens [..., T]) -> logits [..., T, vocab]``.

    Args:
      cfg: the :class:`GPT2Config`.
      rngs: ``nnx.Rngs(seed)`` for the random initialisation (GPT-2's: N(0, 0.02), residual projections
        scaled by ``1/sqrt(2 n_layer)``).
    """

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, embedding_init=nnx.initializers.normal(0.01),
                             rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        T = tokens.shape[-1]
        if T > self.cfg.n_positions:
            raise ValueError(f"sequence length {T} exceeds n_positions={self.cfg.n_positions}")
        x = self.wte(tokens) + self.wpe(jnp.arange(T))
        for block in self.h:
            x = block(x)
        return self.wte.attend(self.ln_f(x))


def causal_lm_logits(model: GPT2, tokens: jax.Array) -> jax.Array:
    """Logits ``[..., T, V]`` of ``model`` on ``tokens`` (position t predicts token t+1)."""
    return model(tokens)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face names <-> NNX paths

_LEAF_HF_TO_NNX = {
    "ln_1": {"weight": "scale", "bias": "bias"}, "ln_2": {"weight": "scale", "bias": "bias"},
    "ln_f": {"weight": "scale", "bias": "bias"},
    "c_attn": {"weight": "kernel", "bias": "bias"}, "c_proj": {"weight": "kernel", "bias": "bias"},
    "c_fc": {"weight": "kernel", "bias": "bias"},
    "wte": {"weight": "embedding"}, "wpe": {"weight": "embedding"},
}
# Buffers and duplicates in GPT-2 checkpoints that carry no parameters of ours.
_IGNORED = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")


def hf_to_nnx_name(name: str) -> tuple[str | int, ...] | None:
    """``"transformer.h.0.attn.c_attn.weight"`` -> ``("h", 0, "attn", "c_attn", "kernel")``.

    Returns None for checkpoint entries that are not parameters of the NNX model (the causal-mask buffers
    ``h.i.attn.bias`` / ``masked_bias`` of old checkpoints, and ``lm_head.weight``, which GPT-2 ties to wte).
    """
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    if _IGNORED.match(name):
        return None
    parts = name.split(".")
    owner, leaf = parts[-2], parts[-1]
    if owner not in _LEAF_HF_TO_NNX or leaf not in _LEAF_HF_TO_NNX[owner]:
        raise KeyError(f"unexpected GPT-2 checkpoint entry {name!r}")
    path = [int(p) if p.isdigit() else p for p in parts[:-1]]
    return (*path, _LEAF_HF_TO_NNX[owner][leaf])


def nnx_to_hf_name(path: tuple[Hashable, ...]) -> str:
    """Inverse of :func:`hf_to_nnx_name` (without the ``transformer.`` prefix)."""
    owner, leaf = str(path[-2]), str(path[-1])   # module and variable names
    inv = {v: k for k, v in _LEAF_HF_TO_NNX[owner].items()}
    return ".".join(str(p) for p in (*path[:-1], inv[leaf]))


def load_hf_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a local safetensors checkpoint (a file, or a directory with ``model.safetensors``
    or a sharded ``model.safetensors.index.json``) into numpy arrays. Needs the ``safetensors`` package."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("loading checkpoints needs `safetensors`: pip install 'jaxdp[lm]'") from e
    path = os.fspath(path)
    if os.path.isfile(path):
        return dict(load_file(path))
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return dict(load_file(single))
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(load_file(os.path.join(path, shard)))
        return out
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {path!r}; PyTorch .bin checkpoints are not "
        "read (convert them with transformers' save_pretrained(..., safe_serialization=True))")


def load_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32, strict: bool = True) -> GPT2:
    """Build a :class:`GPT2` from a local Hugging Face GPT-2 directory (``config.json`` + safetensors).

    Args:
      path: directory holding ``config.json`` and ``model.safetensors`` (nothing is downloaded).
      dtype: dtype of the loaded parameters.
      strict: raise if a model parameter is missing from the checkpoint (otherwise it keeps its random init).
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: give a local Hugging Face GPT-2 directory")
    with open(cfg_file) as f:
        cfg = GPT2Config.from_dict(json.load(f))
    tensors = load_hf_state_dict(path)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    seen = set()
    for name, arr in tensors.items():
        key = hf_to_nnx_name(name)
        if key is None:
            continue
        if key not in flat:
            raise KeyError(f"checkpoint entry {name!r} -> {key} has no counterpart in the model")
        var = flat[key]
        if tuple(arr.shape) != tuple(_nnx.get(var).shape):
            raise ValueError(f"{name}: checkpoint shape {arr.shape} != model shape {_nnx.get(var).shape}")
        _nnx.put(var, jnp.asarray(arr, dtype=dtype))
        seen.add(key)
    missing = [k for k in flat if k not in seen]
    if missing and strict:
        raise KeyError(f"parameters missing from the checkpoint: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    nnx.update(model, state)
    return model


def save_pretrained(model: GPT2, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` with Hugging Face GPT-2 names (``transformer.`` prefix
    and a tied ``lm_head.weight``), readable by :func:`load_pretrained` and by ``transformers``.
    Merge LoRA adapters first (:func:`jaxdp.lm.lora.merge_lora`)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "base" in key or any(str(k).startswith("lora_") for k in key):
            raise ValueError("the model has LoRA adapters: call jaxdp.lm.lora.merge_lora(model) before saving")
        tensors["transformer." + nnx_to_hf_name(key)] = np.asarray(_nnx.get(var), np.float32)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    atomic_write(os.path.join(path, "config.json"), json.dumps(model.cfg.to_dict(), indent=2))
