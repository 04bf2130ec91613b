"""Shared harness for the Opacus parity tests and ``benchmarks/parity_report.py``.

Each model exists twice, as a Flax (linen) module and as a PyTorch module, with the Flax parameters copied
into the PyTorch one. A *conversion table* lists, for every torch parameter, the Flax leaf it comes from and
how the layout changes (Dense kernels are transposed, Conv kernels go HWIO -> OIHW, attention kernels are
reshaped). Gradients computed by jaxdp are mapped through the same table and compared with Opacus's
``p.summed_grad`` and ``p.grad`` element by element.

This module imports torch and opacus unconditionally: `make test` installs the ``parity`` extra, so a missing
torch must fail loudly rather than skip. The core package never imports this file.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

import jaxdp

torch.set_num_threads(2)

ATOL = 1e-5
RTOL = 1e-4

# ----------------------------------------------------------------------------------------------------------
# Layout conversions Flax -> torch (applied to weights and to gradients alike)


def _dense_w(a):  # flax (in, out) -> torch (out, in)
    return a.T


def _conv_w(a):  # flax HWIO -> torch OIHW
    return np.transpose(a, (3, 2, 0, 1))


def _ident(a):
    return a


def _mha_in_w(a):  # flax (D, H, Dh) -> torch Linear weight (H*Dh, D)
    d = a.shape[0]
    return a.reshape(d, -1).T


def _mha_in_b(a):  # flax (H, Dh) -> torch (H*Dh,)
    return a.reshape(-1)


def _mha_out_w(a):  # flax (H, Dh, D) -> torch Linear weight (D, H*Dh)
    return a.reshape(-1, a.shape[-1]).T


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@dataclass
class ModelPair:
    name: str
    flax_module: nn.Module
    flax_params: Any                 # the 'params' collection
    torch_module: torch.nn.Module    # weights already copied from flax_params
    table: list                      # [(torch_name, flax_path, convert)]
    make_batch: Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]  # (B, seed) -> jax x, torch x, y

    def to_torch(self, flax_tree) -> dict[str, np.ndarray]:
        """Map a tree shaped like the Flax params (weights or gradients) to {torch_name: array}."""
        return {tn: np.asarray(conv(np.asarray(_get(flax_tree, path)))) for tn, path, conv in self.table}

    def loss_fn(self, params, batch):
        """Per-example cross-entropy losses [B] (jaxdp's contract: unreduced)."""
        x, y = batch
        logits = self.flax_module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _copy_into_torch(pair_table, flax_params, module: torch.nn.Module):
    named = dict(module.named_parameters())
    assert set(named) == {t for t, _, _ in pair_table}, (sorted(named), [t for t, _, _ in pair_table])
    with torch.no_grad():
        for tn, path, conv in pair_table:
            w = np.array(conv(np.asarray(_get(flax_params, path))), dtype=np.float32, order="C")
            assert named[tn].shape == w.shape, (tn, named[tn].shape, w.shape)
            named[tn].copy_(torch.from_numpy(w))


# ----------------------------------------------------------------------------------------------------------
# Models. Sizes are tiny: the tests compare numbers, not accuracy.

_DIGITS = None


def digits():
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = jaxdp.data.load_digits()
    return _DIGITS


def _digit_batch(flat: bool):
    def make(batch_size: int, seed: int):
        d = digits()
        idx = np.random.default_rng(seed).choice(len(d.y_train), batch_size, replace=False)
        x = d.x_train[idx]  # [B, 8, 8, 1]
        y = d.y_train[idx]
        if flat:
            xj = x.reshape(batch_size, -1)
            return xj, xj.copy(), y
        return x, np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))), y  # NHWC for flax, NCHW for torch
    return make


def _token_batch(vocab: int, seq: int, classes: int):
    def make(batch_size: int, seed: int):
        rng = np.random.default_rng(seed)
        x = rng.integers(0, vocab, size=(batch_size, seq)).astype(np.int32)
        y = rng.integers(0, classes, size=(batch_size,)).astype(np.int32)
        return x, x.astype(np.int64), y
    return make


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 8, 8, 1]
        x = nn.Conv(8, (3, 3), padding="SAME", name="conv")(x)
        x = nn.GroupNorm(num_groups=2, epsilon=1e-5, use_fast_variance=False, name="gn")(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))       # [B, 4, 4, 8]
        x = x.reshape(x.shape[0], -1)                     # NHWC flatten order
        return nn.Dense(10, name="fc")(x)


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.gn = torch.nn.GroupNorm(2, 8, eps=1e-5)
        self.fc = torch.nn.Linear(128, 10)

    def forward(self, x):  # [B, 1, 8, 8]
        x = F.avg_pool2d(F.relu(self.gn(self.conv(x))), 2)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # same (H, W, C) order as flax
        return self.fc(x)


VOCAB, SEQ, DIM, HEADS, CLASSES = 50, 6, 16, 2, 4


class FlaxText(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(VOCAB, DIM, name="emb")(tokens)
        h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln")(h)
        h = jnp.mean(h, axis=1)
        h = jnp.tanh(nn.Dense(DIM, name="fc1")(h))
        return nn.Dense(CLASSES, name="fc2")(h)


class TorchText(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.ln = torch.nn.LayerNorm(DIM, eps=1e-5)
        self.fc1 = torch.nn.Linear(DIM, DIM)
        self.fc2 = torch.nn.Linear(DIM, CLASSES)

    def forward(self, tokens):
        h = self.ln(self.emb(tokens)).mean(dim=1)
        return self.fc2(torch.tanh(self.fc1(h)))


class FlaxBlock(nn.Module):
    """Pre-LN transformer block (attention + MLP) over token and position embeddings, mean-pooled head."""

    @nn.compact
    def __call__(self, tokens):
        b, t = tokens.shape
        h = nn.Embed(VOCAB, DIM, name="tok")(tokens) + nn.Embed(SEQ, DIM, name="pos")(jnp.arange(t))[None]
        a = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln1")(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=DIM, out_features=DIM,
                                                deterministic=True, name="attn")(a, a)
        m = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln2")(h)
        h = h + nn.Dense(DIM, name="mlp_out")(nn.gelu(nn.Dense(2 * DIM, name="mlp_in")(m), approximate=False))
        return nn.Dense(CLASSES, name="head")(jnp.mean(h, axis=1))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Embedding(SEQ, DIM)
        self.ln1 = torch.nn.LayerNorm(DIM, eps=1e-5)
        self.q = torch.nn.Linear(DIM, DIM)
        self.k = torch.nn.Linear(DIM, DIM)
        self.v = torch.nn.Linear(DIM, DIM)
        self.o = torch.nn.Linear(DIM, DIM)
        self.ln2 = torch.nn.LayerNorm(DIM, eps=1e-5)
        self.mlp_in = torch.nn.Linear(DIM, 2 * DIM)
        self.mlp_out = torch.nn.Linear(2 * DIM, DIM)
        self.head = torch.nn.Linear(DIM, CLASSES)

    def forward(self, tokens):
        b, t = tokens.shape
        pos = torch.arange(t).unsqueeze(0).expand(b, t)
        h = self.tok(tokens) + self.pos(pos)
        a = self.ln1(h)
        dh = DIM // HEADS

        def heads(z):
            return z.view(b, t, HEADS, dh).transpose(1, 2)  # [B, H, T, Dh]

        q, k, v = heads(self.q(a)), heads(self.k(a)), heads(self.v(a))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(b, t, DIM))
        m = self.ln2(h)
        h = h + self.mlp_out(F.gelu(self.mlp_in(m)))
        return self.head(h.mean(dim=1))


def _dense(tname, fname):
    return [(f"{tname}.weight", (fname, "kernel"), _dense_w), (f"{tname}.bias", (fname, "bias"), _ident)]


def _norm(tname, fname):
    return [(f"{tname}.weight", (fname, "scale"), _ident), (f"{tname}.bias", (fname, "bias"), _ident)]


def _build(name, flax_module, torch_cls, table, make_batch, example, seed):
    params = flax_module.init(jax.random.key(seed), jnp.asarray(example))["params"]
    params = jax.tree_util.tree_map(lambda p: p, params)
    module = torch_cls()
    _copy_into_torch(table, params, module)
    return ModelPair(name, flax_module, params, module, table, make_batch)


@functools.lru_cache(maxsize=None)
def build(name: str, seed: int = 0) -> ModelPair:
    """Build the Flax and torch versions of model ``name`` with identical weights (cached: the steps below
    never modify the weights)."""
    if name == "mlp":
        table = _dense("fc1", "fc1") + _dense("fc2", "fc2")
        return _build(name, FlaxMLP(), TorchMLP, table, _digit_batch(True), np.zeros((1, 64), np.float32), seed)
    if name == "cnn":
        table = ([("conv.weight", ("conv", "kernel"), _conv_w), ("conv.bias", ("conv", "bias"), _ident)]
                 + _norm("gn", "gn") + _dense("fc", "fc"))
        return _build(name, FlaxCNN(), TorchCNN, table, _digit_batch(False), np.zeros((1, 8, 8, 1), np.float32),
                      seed)
    if name == "text":
        table = ([("emb.weight", ("emb", "embedding"), _ident)] + _norm("ln", "ln") + _dense("fc1", "fc1")
                 + _dense("fc2", "fc2"))
        return _build(name, FlaxText(), TorchText, table, _token_batch(VOCAB, SEQ, CLASSES),
                      np.zeros((1, SEQ), np.int32), seed)
    if name == "transformer":
        table = [("tok.weight", ("tok", "embedding"), _ident), ("pos.weight", ("pos", "embedding"), _ident)]
        table += _norm("ln1", "ln1")
        for t, f in (("q", "query"), ("k", "key"), ("v", "value")):
            table += [(f"{t}.weight", ("attn", f, "kernel"), _mha_in_w), (f"{t}.bias", ("attn", f, "bias"), _mha_in_b)]
        table += [("o.weight", ("attn", "out", "kernel"), _mha_out_w), ("o.bias", ("attn", "out", "bias"), _ident)]
        table += _norm("ln2", "ln2") + _dense("mlp_in", "mlp_in") + _dense("mlp_out", "mlp_out")
        table += _dense("head", "head")
        return _build(name, FlaxBlock(), TorchBlock, table, _token_batch(VOCAB, SEQ, CLASSES),
                      np.zeros((1, SEQ), np.int32), seed)
    raise ValueError(f"unknown model {name!r}")


MODELS = ("mlp", "cnn", "text", "transformer")

# ----------------------------------------------------------------------------------------------------------
# One clipped step with each library (noise 0 unless given)


def opacus_step(pair: ModelPair, x_torch, y, *, clip, expected_batch_size, loss_reduction="mean",
                noise_multiplier=0.0, generator=None):
    """One Opacus DP step. ``clip`` is a float (flat) or {torch_name: C} (per-layer, Opacus's per-parameter).

    Returns (per_example_norms [B], {name: summed_grad}, {name: p.grad after noise and scale_grad}).
    """
    gsm = GradSampleModule(pair.torch_module, loss_reduction=loss_reduction)
    names = [n for n, _ in pair.torch_module.named_parameters()]
    params = list(gsm.parameters())
    sgd = torch.optim.SGD(params, lr=1.0)
    if isinstance(clip, dict):
        opt = DPPerLayerOptimizer(sgd, noise_multiplier=noise_multiplier, max_grad_norm=[clip[n] for n in names],
                                  expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                                  generator=generator)
    else:
        opt = DPOptimizer(sgd, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                          expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                          generator=generator)
    opt.zero_grad()
    out = gsm(torch.from_numpy(np.asarray(x_torch)))
    loss = F.cross_entropy(out, torch.from_numpy(np.asarray(y)).long(), reduction=loss_reduction)
    with warnings.catch_warnings():  # "Full backward hook is firing ... no inputs require gradients": expected
        warnings.simplefilter("ignore", UserWarning)
        loss.backward()
    # Opacus's per-example norm: the norm over all parameters of its per-sample gradients (grad_sample),
    # computed exactly as DPOptimizer.clip_and_accumulate does.
    per_param = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=-1) for p in params]
    norms = torch.stack(per_param, dim=1).norm(2, dim=1).detach().numpy()
    layer_norms = {n: pn.detach().numpy() for n, pn in zip(names, per_param)}
    opt.pre_step()
    summed = {n: p.summed_grad.detach().numpy().copy() for n, p in zip(names, params)}
    update = {n: p.grad.detach().numpy().copy() for n, p in zip(names, params)}
    opt.zero_grad()
    gsm._close()
    return norms, layer_norms, summed, update


def jaxdp_step(pair: ModelPair, x_jax, y, *, clip, expected_batch_size, noise_multiplier=0.0, key=0,
               method="vmap"):
    """One jaxdp step: clipped_grad (per-example losses) then add_noise (noise, then divide by E).

    ``clip`` is a float (flat) or a Flax-shaped params tree of per-leaf C (per-layer).
    Returns (per_example_norms [B], {torch_name: summed}, {torch_name: update}) in torch layout.
    """
    grad_fn = jaxdp.clipped_grad(pair.loss_fn, clip, method=method)  # eager: tiny models, no compile
    summed, stats = grad_fn(pair.flax_params, (jnp.asarray(x_jax), jnp.asarray(y)))
    tx = jaxdp.add_noise(noise_multiplier=noise_multiplier, l2_clip_norm=clip,
                         expected_batch_size=expected_batch_size, key=key)
    update, _ = tx.update(summed, tx.init(pair.flax_params))
    return np.asarray(stats.per_example_norms), pair.to_torch(summed), pair.to_torch(update)


def per_layer_clips(pair: ModelPair, layer_norms: dict[str, np.ndarray]):
    """Per-parameter clip norms C_k = median over the batch of that parameter's per-example norms (so about
    half of the examples are clipped in every group). Returns ({torch_name: C}, flax-shaped tree of C)."""
    c_torch = {n: float(np.median(v)) for n, v in layer_norms.items()}
    by_path = {path: c_torch[tn] for tn, path, _ in pair.table}

    def leaf_c(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        return by_path[keys]

    c_flax = jax.tree_util.tree_map_with_path(leaf_c, pair.flax_params)
    return c_torch, c_flax


def max_violation(a: np.ndarray, b: np.ndarray, atol=ATOL, rtol=RTOL) -> float:
    """max |a - b| / (atol + rtol |b|): <= 1 means np.allclose(a, b, rtol, atol) holds."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (atol + rtol * np.abs(b))))


@functools.lru_cache(maxsize=None)
def compare_step(name: str, clipping: str, loss_reduction: str, batch_size: int = 16, seed: int = 0,
                 dataset_size: int = 1000):
    """Run both libraries on the same weights and batch with noise 0; return a dict of comparisons.

    flat: C = median of the per-example norms (half the batch clipped). per_layer: one C per parameter tensor
    (Opacus's per-layer mode), each the median of that tensor's per-example norms. The update is divided by
    E = batch_size for loss_reduction="mean"; Opacus does not divide for "sum", and neither does jaxdp when
    given E = 1.
    """
    pair = build(name, seed)
    xj, xt, y = pair.make_batch(batch_size, seed + 1)
    e = float(batch_size)
    # A first Opacus pass at a huge C reads the per-example norms to choose clip norms that bind.
    norms0, layer_norms, _, _ = opacus_step(pair, xt, y, clip=1e9, expected_batch_size=e, loss_reduction="mean")
    if clipping == "flat":
        c_torch = c_flax = float(np.median(norms0))
    else:
        c_torch, c_flax = per_layer_clips(pair, layer_norms)
    o_norms, _, o_summed, o_update = opacus_step(pair, xt, y, clip=c_torch, expected_batch_size=e,
                                                 loss_reduction=loss_reduction)
    j_e = e if loss_reduction == "mean" else 1.0
    j_norms, j_summed, j_update = jaxdp_step(pair, xj, y, clip=c_flax, expected_batch_size=j_e)
    return {
        "model": name, "clipping": clipping, "loss_reduction": loss_reduction, "batch_size": batch_size,
        "num_params": int(sum(v.size for v in j_summed.values())),
        "norms": (j_norms, o_norms),
        "summed": (j_summed, o_summed),
        "update": (j_update, o_update),
        "viol_norms": max_violation(j_norms, o_norms),
        "viol_summed": max(max_violation(j_summed[k], o_summed[k]) for k in o_summed),
        "viol_update": max(max_violation(j_update[k], o_update[k]) for k in o_update),
        "max_abs_diff_update": max(float(np.max(np.abs(j_update[k] - o_update[k]))) for k in o_update),
    }


# ----------------------------------------------------------------------------------------------------------
# Noise


class _Wide(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_out)
        self.fc2 = torch.nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def noise_samples(noise_multiplier: float, clip, expected_batch_size: float, seed: int = 0,
                  d_in: int = 64, d_out: int = 96):
    """The noise part of one update, from each library, flattened: ``update - clipped_sum / E``.

    ``clip``: float (flat) or a list of 4 per-parameter C (per-layer). Returns (jaxdp_noise, opacus_noise,
    predicted_std = sigma * ||C|| / E).
    """
    torch.manual_seed(seed)
    module = _Wide(d_in, d_out)
    names = [n for n, _ in module.named_parameters()]
    pair = ModelPair("wide", None, None, module, [], None)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, d_in)).astype(np.float32)
    y = rng.integers(0, d_out, 8)
    gen = torch.Generator().manual_seed(seed)
    c_torch = dict(zip(names, clip)) if isinstance(clip, (list, tuple)) else clip
    _, _, o_sum, o_upd = opacus_step(pair, x, y, clip=c_torch, expected_batch_size=expected_batch_size,
                                     noise_multiplier=noise_multiplier, generator=gen)
    o_noise = np.concatenate([(o_upd[n] - o_sum[n] / expected_batch_size).ravel() for n in names])
    # jaxdp: the noise transformation applied to a zero clipped sum of the same shapes.
    zeros = {n: jnp.zeros(o_sum[n].shape, jnp.float32) for n in names}
    c_tree = dict(zip(names, clip)) if isinstance(clip, (list, tuple)) else clip
    tx = jaxdp.add_noise(noise_multiplier=noise_multiplier, l2_clip_norm=c_tree,
                         expected_batch_size=expected_batch_size, key=jax.random.key(seed))
    upd, _ = tx.update(zeros, tx.init(zeros))
    j_noise = np.concatenate([np.asarray(upd[n]).ravel() for n in names])
    c_total = math.sqrt(sum(c * c for c in clip)) if isinstance(clip, (list, tuple)) else clip
    return j_noise, o_noise, noise_multiplier * c_total / expected_batch_size


# ----------------------------------------------------------------------------------------------------------
# Accounting (Opacus side)


def opacus_rdp_eps(sigma, q, steps, delta, orders=None):
    if orders is None:
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        return acc.get_epsilon(delta)
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def opacus_prv_interval(sigma, q, steps, delta, eps_error=0.01):
    """(eps_lower, eps_estimate, eps_upper) of Opacus's PRV accountant; get_epsilon returns eps_upper."""
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta / 1000)
    return tuple(float(x) for x in dprv.compute_epsilon(delta, delta / 1000, eps_error))
