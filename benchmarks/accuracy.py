"""Accuracy at the same epsilon on the embedded 8x8 digits (1,437 train / 360 test): DP-SGD vs BandMF vs BLT vs
DP-SGD + EMA + augmentation multiplicity vs the best recipe found on a validation split, and non-private.

Every row is a RECIPE: a fixed set of hyperparameters (model, optimiser, learning rate, expected batch size B,
epochs, clip norm C, mechanism, augmentation multiplicity K, EMA decay) whose noise multiplier is calibrated to the
target epsilon (delta = 1e-5, add/remove-one, PRV accountant by default: ``--accountant``). ``dpsgd`` is ``make
demo``'s recipe (jaxdp/configs/digits_dp.yaml: MLP 64 -> 128 -> 10 tanh, adam lr 0.02, B = 256, 30 epochs, C = 1).

* ``dpsgd``:     Poisson sampling q = B/N, T = ceil(epochs / q) steps, independent noise (``jaxdp.add_noise``).
* ``bandmf-b``:  cyclic Poisson sampling over b groups at rate p = bB/N, b-banded MF noise optimised for T steps
                 (``jaxdp.bandmf_noise``), accounted as DP-SGD with rate p and ceil(T/b) steps.
* ``bandmf-auto``: BandMF with b in {1, 2, 4} chosen by ``jaxdp.matrix_factorization.select_bands`` (smallest
                 expected prefix-sum error at the calibrated sigma; data-independent; b = 1 is DP-SGD).
* ``blt-d``:     BLT noise with d buffers (``jaxdp.blt.blt_noise``) over a fixed secret batch order
                 (``FixedOrderSampler``: floor(N/B) batches of exactly B, min-separation floor(N/B)), strategy
                 optimised for T steps and ceil(T / sep) participations: ONE Gaussian mechanism, no amplification.
* ``dpsgd+aug``: DP-SGD with augmentation multiplicity K = 4 (MLP: pixel jitter N(0, 0.1^2); CNN: random +-1
                 pixel shifts); views averaged before clipping, so sensitivity and accounting are DP-SGD's.
* ``cnn``:       DP-SGD, a small CNN (conv3x3 16 -> GroupNorm -> tanh -> avgpool, conv3x3 32 -> GroupNorm -> tanh
                 -> avgpool, dense 10), otherwise the demo's recipe.
* ``best``:      the recipe selected on the validation split (``--val``; benchmarks/results/accuracy_sweep.txt):
                 the demo's MLP on FIXED, data-independent Gabor features (``jaxdp.models.gabor_features``;
                 Tramer & Boneh 2021), adam lr 0.01 with cosine decay, B = 256, 150 epochs; ``best+bandmf-4``
                 the same with BandMF noise (b = 4, cyclic Poisson sampling).
* every row is also evaluated with the EMA of its parameters (``+ema``): post-processing, no privacy cost.
* ``non-private (r)``: recipe r without clipping or noise (``non-private (dpsgd)`` is the demo's twin).

Options of a recipe (``--grid`` keys): ``model`` mlp | linear | cnn, ``features`` none | gabor, ``act``, ``hidden``,
``width`` (CNN), ``opt`` adam | sgd, ``lr``, ``schedule`` const | cosine, ``momentum``, ``batch_size``, ``epochs``,
``clip``, ``mech`` dpsgd | bandmf | blt, ``bands`` (BandMF bands / BLT buffers), ``aug_k``, ``augment`` jitter |
shift, ``jitter``, ``ema_decay``, ``center`` (pixels to [-1, 1]).

``--val``: carve a validation split from TRAIN (a fixed, data-independent permutation, seed 12345: the last 20%
of the training set, 287 examples) and report accuracy on it (training on the other 1,150; sigma calibrated for
N = 1,150); the test set is not read. All selection is done that way; the final table is then run once on the
full training set and the test set with the selected, fixed recipe. ``--grid key=v1,v2 ...`` runs every
combination of the given overrides on each recipe (a sweep).

    PYTHONPATH=. python benchmarks/accuracy.py [--recipes dpsgd bandmf-4 blt-2 dpsgd+aug cnn best best+bandmf-4]
        [--epsilons 1 3 8] [--seeds 0 1 2 3 4] [--val] [--grid batch_size=256,512 epochs=30,60] [--plot out.png]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp
from jaxdp import accounting
from jaxdp.blt import blt_noise
from jaxdp.data import load_digits
from jaxdp.matrix_factorization import select_bands
from jaxdp.models import gabor_features
from jaxdp.recipe import augmentation_keys, augmentation_multiplicity, ema_update
from jaxdp.sampling import CyclicPoissonSampler, FixedOrderSampler, PoissonSampler

DELTA = 1e-5
VAL_FRACTION, VAL_SEED = 0.2, 12345
# make demo's recipe (jaxdp/configs/digits_dp.yaml); every recipe below overrides a few keys.
DEMO = dict(model="mlp", act="tanh", hidden=128, width=16, opt="adam", lr=0.02, momentum=0.0, batch_size=256,
            epochs=30.0, clip=1.0, mech="dpsgd", bands=1, aug_k=1, augment="jitter", jitter=0.1, ema_decay=0.95,
            center=False, features="none", schedule="const")
RECIPES: dict[str, dict] = {
    "dpsgd": {},
    "bandmf-4": {"mech": "bandmf", "bands": 4},
    "bandmf-8": {"mech": "bandmf", "bands": 8},
    "bandmf-auto": {"mech": "bandmf", "bands": "auto"},
    "blt-2": {"mech": "blt", "bands": 2},
    "blt-4": {"mech": "blt", "bands": 4},
    "dpsgd+aug": {"aug_k": 4},
    "cnn": {"model": "cnn", "augment": "shift"},
    "cnn+aug": {"model": "cnn", "augment": "shift", "aug_k": 4},
    # selected on the validation split (benchmarks/results/accuracy_sweep.txt): the demo's MLP on fixed Gabor
    # features, adam lr 0.01 with cosine decay to 0, B = 256, 150 epochs (T = 843 steps), C = 1
    "best": {"features": "gabor", "schedule": "cosine", "lr": 0.01, "epochs": 150.0, "ema_decay": 0.99},
}
RECIPES["best+bandmf-4"] = {**RECIPES["best"], "mech": "bandmf", "bands": 4}
# The best recipe with momentum SGD (lr 0.03, momentum 0.9: chosen on the validation split from lr 0.03 .. 2 at
# epsilon 3, 2 seeds), the optimiser BandMF's momentum-aware strategy is built for, with and without BandMF.
RECIPES["best-sgd"] = {**RECIPES["best"], "opt": "sgd", "lr": 0.03, "momentum": 0.9}
RECIPES["best-sgd+bandmf-4"] = {**RECIPES["best-sgd"], "mech": "bandmf", "bands": 4}
RECIPES["best-sgd+bandmf-auto"] = {**RECIPES["best-sgd"], "mech": "bandmf", "bands": "auto"}
_STATIC = ("model", "act", "hidden", "width", "opt", "lr", "momentum", "batch_size", "clip", "mech", "bands",
           "aug_k", "augment", "jitter", "ema_decay", "center", "features", "schedule")


# ----------------------------------------------------------------------------------------------------- models
def _features(x, cfg):
    """``none``: the 64 pixels. ``gabor``: :func:`jaxdp.models.gabor_features` (fixed, data-independent Gabor
    moduli of the image + the low-pass image, 2x2-pooled, normalised per example: 144 features)."""
    return x if cfg["features"] == "none" else gabor_features(x.reshape(-1, 8, 8, 1))


def _init(key, cfg) -> dict:
    ks = jax.random.split(key, 4)
    n_in = 64 if cfg["features"] == "none" else 144
    if cfg["model"] == "mlp":
        h = cfg["hidden"]
        return {"w1": jax.random.normal(ks[0], (n_in, h)) / math.sqrt(n_in), "b1": jnp.zeros(h),
                "w2": jax.random.normal(ks[1], (h, 10)) / math.sqrt(h), "b2": jnp.zeros(10)}
    if cfg["model"] == "linear":
        return {"w": jnp.zeros((n_in, 10)), "b": jnp.zeros(10)}
    c1, c2 = cfg["width"], 2 * cfg["width"]
    return {"k1": jax.random.normal(ks[0], (3, 3, 1, c1)) / 3.0, "g1": jnp.ones(c1), "a1": jnp.zeros(c1),
            "k2": jax.random.normal(ks[1], (3, 3, c1, c2)) / math.sqrt(9 * c1), "g2": jnp.ones(c2),
            "a2": jnp.zeros(c2), "w": jax.random.normal(ks[2], (4 * c2, 10)) / math.sqrt(4 * c2),
            "b": jnp.zeros(10)}


def _group_norm(x, gamma, beta, groups=4):
    """GroupNorm over (H, W, C/groups) of each example: per-example, so clipping's sensitivity bound holds."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mu = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mu) * jax.lax.rsqrt(var + 1e-5)).reshape(b, h, w, c) * gamma + beta


def _pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _logits(p, x, cfg):
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[cfg["act"]]
    if cfg["center"]:   # data-independent: pixels in [0, 1] -> [-1, 1]
        x = 2.0 * x - 1.0
    if cfg["model"] != "cnn":
        x = _features(x, cfg)
    if cfg["model"] == "mlp":
        return act(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    if cfg["model"] == "linear":
        return x @ p["w"] + p["b"]
    dn = ("NHWC", "HWIO", "NHWC")
    h = x.reshape(-1, 8, 8, 1)
    h = jax.lax.conv_general_dilated(h, p["k1"], (1, 1), "SAME", dimension_numbers=dn)
    h = _pool(act(_group_norm(h, p["g1"], p["a1"])))
    h = jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "SAME", dimension_numbers=dn)
    h = _pool(act(_group_norm(h, p["g2"], p["a2"])))
    return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]


def _shift(key, ex):
    """A random shift of the 8x8 image by -1, 0 or +1 pixel in each direction (zero fill)."""
    kx, ky = jax.random.split(key)
    img = jnp.pad(ex["x"].reshape(8, 8), 1)
    dx, dy = jax.random.randint(kx, (), 0, 3), jax.random.randint(ky, (), 0, 3)
    img = jax.lax.dynamic_slice(img, (dy, dx), (8, 8))
    return {"x": img.reshape(-1), "y": ex["y"]}


def _jitter(scale):
    def f(key, ex):
        """Pixel jitter: each pixel plus N(0, scale^2), clipped to [0, 1]."""
        return {"x": jnp.clip(ex["x"] + scale * jax.random.normal(key, ex["x"].shape), 0.0, 1.0), "y": ex["y"]}
    return f


def _accuracy(p, x, y, cfg):
    return float(jnp.mean(jnp.argmax(_logits(p, x, cfg), -1) == y))


def _pad(b: int) -> int:
    """One padded batch size per run: B + 8 sd of the Poisson batch size (never exceeded in practice; checked),
    so each recipe compiles once."""
    return int(math.ceil((b + 8 * math.sqrt(b)) / 16) * 16)


# ------------------------------------------------------------------------------------------------- training
_RUNS: dict = {}   # static config -> (transform factory, jitted training loop); sigma and keys are traced


def _train_fn(cfg: dict, private: bool, steps: int, n_train: int):
    """One jitted ``lax.scan`` over all steps (batches precomputed by the sampler as index/mask arrays). The
    noise transform is built with sigma = 1 and each step computes ``sigma * noise(S / sigma) = (S + sigma w) /
    E``: the update of a transform built with sigma, but sigma is a traced argument, so runs at other epsilons
    and seeds reuse the compiled loop."""
    cache_key = (tuple(cfg[k] for k in _STATIC), private, steps, n_train)
    if cache_key in _RUNS:
        return _RUNS[cache_key]
    e, clip, bands = float(cfg["batch_size"]), cfg["clip"], cfg["bands"]
    lr = optax.cosine_decay_schedule(cfg["lr"], steps) if cfg["schedule"] == "cosine" else cfg["lr"]
    opt = (optax.adam(lr) if cfg["opt"] == "adam" else optax.sgd(lr, momentum=cfg["momentum"] or None))
    if cfg["mech"] == "bandmf":
        def noise(key):
            return jaxdp.bandmf_noise(noise_multiplier=1.0, l2_clip_norm=clip, expected_batch_size=e, key=key,
                                      bands=bands, steps=steps)
    elif cfg["mech"] == "blt":
        sep = n_train // cfg["batch_size"]

        def noise(key):
            return blt_noise(noise_multiplier=1.0, l2_clip_norm=clip, expected_batch_size=e, key=key, steps=steps,
                             buffers=bands, min_separation=sep, participations=-(-steps // sep),
                             momentum=cfg["momentum"] if cfg["opt"] == "sgd" else 0.0)
    else:
        def noise(key):
            return jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=clip, expected_batch_size=e, key=key)

    def loss(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(_logits(p, batch["x"], cfg), batch["y"])

    aug = cfg["aug_k"] > 1
    augment = _shift if cfg["augment"] == "shift" else _jitter(cfg["jitter"])
    grad_fn = jaxdp.clipped_grad(augmentation_multiplicity(loss, augment, cfg["aug_k"]) if aug else loss, clip,
                                 method="vmap")
    tx0 = noise(jax.random.key(0))   # update_fn reads the key from its state, not from this instance

    def make(key):
        return optax.chain(noise(key), opt) if private else opt

    @jax.jit
    def train(params, state, idxs, masks, sigma, aug_key, xtr, ytr):
        def body(carry, inp):
            p, s, ema = carry
            idx, mask, t = inp
            batch = {"x": xtr[idx], "y": ytr[idx]}
            if private:
                if aug:
                    batch = (batch, augmentation_keys(aug_key, t, idx.shape[0]))
                g, _ = grad_fn(p, batch, mask)
                ns, os_ = s
                u, ns = tx0.update(jax.tree_util.tree_map(lambda x: x / sigma, g), ns, p)
                u, os_ = opt.update(jax.tree_util.tree_map(lambda x: x * sigma, u), os_, p)
                s = (ns, os_)
            else:
                g = jax.grad(lambda pp: jnp.sum(jnp.where(mask, loss(pp, batch), 0.0)) / e)(p)
                u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s, ema_update(ema, p, t, cfg["ema_decay"])), None

        ts = jnp.arange(idxs.shape[0])
        (p, s, ema), _ = jax.lax.scan(body, (params, state, params), (idxs, masks, ts))
        return p, ema

    _RUNS[cache_key] = (make, train)
    return _RUNS[cache_key]


_SIGMAS: dict = {}


def _sigma(cfg: dict, epsilon: float, n: int, steps: int, accountant: str) -> float:
    """The noise multiplier of the recipe's mechanism at ``epsilon`` (cached: PRV calibration takes seconds)."""
    q, bands = cfg["batch_size"] / n, cfg["bands"]
    if cfg["mech"] == "bandmf":   # DP-SGD with rate b q and ceil(T / b) steps
        args = (q * bands, accounting.cyclic_participations(steps, bands))
    elif cfg["mech"] == "blt":    # one Gaussian mechanism for the whole horizon (sensitivity in the strategy)
        args = (1.0, 1)
    else:
        args = (q, steps)
    k = (epsilon, *args, accountant)
    if k not in _SIGMAS:
        _SIGMAS[k] = accounting.calibrate_noise_multiplier(epsilon, DELTA, args[0], steps=args[1],
                                                           accountant=accountant)
    return _SIGMAS[k]


@functools.cache
def _select_bands(steps: int, n: int, b: int, epsilon: float, accountant: str) -> int:
    return select_bands(steps, n, b, epsilon, DELTA, candidates=(1, 2, 4), accountant=accountant)[0]


def run(label: str, cfg: dict, epsilon: float | None, seed: int, data, accountant: str) -> dict:
    xtr, ytr, xte, yte = data
    n, b_exp = len(ytr), cfg["batch_size"]
    q = b_exp / n
    steps = math.ceil(cfg["epochs"] / q)
    if cfg["bands"] == "auto":   # data-independent choice (N, B, T, epsilon only): free; b = 1 is DP-SGD
        cfg = {**cfg, "bands": 1 if epsilon is None else
               _select_bands(steps, n, b_exp, epsilon, accountant)}
    private = epsilon is not None
    key = jax.random.key(seed)
    params = _init(jax.random.fold_in(key, 1), cfg)
    if cfg["mech"] == "bandmf":
        sampler = CyclicPoissonSampler(n, q * cfg["bands"], cfg["bands"], seed, pad_to_multiple=_pad(b_exp))
    elif cfg["mech"] == "blt":
        sampler = FixedOrderSampler(n, b_exp, seed)
    else:
        sampler = PoissonSampler(n, q, seed, pad_to_multiple=_pad(b_exp))
    sigma = _sigma(cfg, epsilon, n, steps, accountant) if private else None
    make, train = _train_fn(cfg, private, steps, n)
    batches = [sampler.sample(t) for t in range(steps)]
    if cfg["mech"] == "blt":   # exactly B real rows; pad to the shared shape (padding contributes nothing)
        pad = _pad(b_exp) - b_exp
        batches = [(np.concatenate([i, np.zeros(pad, np.int32)]), np.concatenate([m, np.zeros(pad, bool)]))
                   for i, m in batches]
    if any(b[0].shape[0] != _pad(b_exp) for b in batches):
        raise RuntimeError("a batch exceeded the fixed padded size; raise _pad")
    idxs = jnp.asarray(np.stack([b[0] for b in batches]))
    masks = jnp.asarray(np.stack([b[1] for b in batches]))
    tx = make(jax.random.fold_in(key, 2))
    t0 = time.perf_counter()
    params, ema = train(params, tx.init(params), idxs, masks, jnp.float32(sigma or 1.0), jax.random.fold_in(key, 3),
                        xtr, ytr)
    jax.block_until_ready(params)
    return {"recipe": label, "config": dict(cfg), "epsilon": epsilon, "seed": seed, "noise_multiplier": sigma,
            "steps": steps, "accuracy": _accuracy(params, xte, yte, cfg), "accuracy_ema": _accuracy(ema, xte, yte, cfg),
            "seconds": time.perf_counter() - t0}


def _data(val: bool):
    d = load_digits()
    xtr, ytr = d.x_train.reshape(len(d.x_train), -1), d.y_train
    if val:   # a fixed, data-independent split of TRAIN; the test set is not read
        perm = np.random.default_rng(VAL_SEED).permutation(len(ytr))
        n_val = int(round(VAL_FRACTION * len(ytr)))
        tr, va = perm[:-n_val], perm[-n_val:]
        xte, yte, xtr, ytr = xtr[va], ytr[va], xtr[tr], ytr[tr]
    else:
        xte, yte = d.x_test.reshape(len(d.x_test), -1), d.y_test
    return tuple(jnp.asarray(a) for a in (xtr, ytr, xte, yte))


def _parse(v: str):
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["dpsgd", "bandmf-4", "bandmf-auto", "blt-2", "dpsgd+aug",
                                                       "cnn", "best", "best+bandmf-4"])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--accountant", default="prv", choices=["prv", "pld", "rdp"])
    ap.add_argument("--val", action="store_true", help="validation split of TRAIN instead of the test set")
    ap.add_argument("--nonprivate", nargs="*", default=["dpsgd", "best"],
                    help="recipes also trained without clipping or noise (none: --nonprivate with no names)")
    ap.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 overrides; every combination is run")
    ap.add_argument("--json", default=None, help="default: results/accuracy.json (accuracy_val.json with --val)")
    ap.add_argument("--plot", default=None, help="also write a PNG of accuracy against epsilon")
    ap.add_argument("--replot", default=None, help="only redraw --plot from this results JSON")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["summary"], args.plot or "accuracy.png")
        return
    grid = [(kv.split("=", 1)[0], [_parse(v) for v in kv.split("=", 1)[1].split(",")]) for kv in args.grid]
    for k, _ in grid:
        if k not in DEMO:
            raise SystemExit(f"unknown key {k!r}; keys: {sorted(DEMO)}")
    if args.json is None:
        args.json = os.path.join(os.path.dirname(__file__), "results",
                                 "accuracy_val.json" if args.val else "accuracy.json")
    data = _data(args.val)
    jobs = []   # (label, cfg)
    for name in args.recipes:
        for combo in itertools.product(*[vs for _, vs in grid]):
            over = dict(zip([k for k, _ in grid], combo))
            label = name + "".join(f" {k}={v}" for k, v in over.items())
            jobs.append((label, {**DEMO, **RECIPES[name], **over}))
    rows, t_start = [], time.perf_counter()
    for name in args.nonprivate:
        for seed in args.seeds:
            rows.append(run(f"non-private ({name})", {**DEMO, **RECIPES[name]}, None, seed, data, args.accountant))
    for eps in args.epsilons:
        for label, cfg in jobs:
            for seed in args.seeds:
                rows.append(run(label, cfg, eps, seed, data, args.accountant))
                r = rows[-1]
                print(f"  eps={eps:g} {label:40s} seed={seed} sigma={r['noise_multiplier']:.3f} "
                      f"acc={r['accuracy']:.4f} ema={r['accuracy_ema']:.4f} ({r['seconds']:.1f}s)", flush=True)
    summary = []
    for eps in [None, *args.epsilons]:
        for label in ([f"non-private ({r})" for r in args.nonprivate] if eps is None else [j[0] for j in jobs]):
            rs = [r for r in rows if r["epsilon"] == eps and r["recipe"] == label]
            if not rs:
                continue
            for col, suffix in (("accuracy", ""), ("accuracy_ema", "+ema")):
                a = np.array([r[col] for r in rs])
                summary.append({"epsilon": eps, "recipe": label + suffix, "mean": float(a.mean()),
                                "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
                                "noise_multiplier": rs[0]["noise_multiplier"], "steps": rs[0]["steps"],
                                "bands": rs[0]["config"]["bands"]})
    split = "validation split of train (287)" if args.val else "test (360)"
    print(f"\nAccuracy on {split}, mean +- std over {len(args.seeds)} seeds (digits, delta={DELTA:g}, "
          f"{args.accountant} calibration)")
    print(f"{'epsilon':>8} {'recipe':44} {'b':>2} {'sigma':>7} {'T':>5} {'accuracy':>17}")
    for s in summary:
        eps = "inf" if s["epsilon"] is None else f"{s['epsilon']:g}"
        sig = "-" if s["noise_multiplier"] is None else f"{s['noise_multiplier']:.3f}"
        print(f"{eps:>8} {s['recipe']:44} {s['bands']:>2} {sig:>7} {s['steps']:>5} {s['mean']:.4f} +- {s['std']:.4f}")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "device": str(jax.devices()[0].device_kind), "uptime": load},
           "versions": {"jax": jax.__version__, "optax": optax.__version__, "jaxdp": jaxdp.__version__},
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "config": {"demo": DEMO, "recipes": {r: RECIPES[r] for r in args.recipes}, "grid": args.grid,
                      "delta": DELTA, "accountant": args.accountant, "seeds": args.seeds,
                      "epsilons": args.epsilons, "split": split},
           "runs": rows, "summary": summary, "total_seconds": time.perf_counter() - t_start}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    if args.plot:
        plot(summary, args.plot)


def plot(summary: list, path: str) -> None:
    """Accuracy against epsilon, one colour per recipe (solid: final parameters, dashed: their EMA); the
    non-private rows as horizontal lines. ``--replot JSON`` redraws it from a results file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    labels = [r for r in dict.fromkeys(s["recipe"] for s in summary if s["epsilon"] is not None)
              if not r.endswith("+ema")]
    colors = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        for suffix, ls in (("", "-"), ("+ema", "--")):
            ss = [s for s in summary if s["recipe"] == label + suffix]
            ax.errorbar([s["epsilon"] * (1 + 0.015 * (i - len(labels) / 2)) for s in ss], [s["mean"] for s in ss],
                        [s["std"] for s in ss], marker="o" if not suffix else "x", ls=ls, capsize=2,
                        color=colors(i % 10), label=None if suffix else label,
                        alpha=0.6 if suffix else 1.0)
    for i, s in enumerate(x for x in summary if x["epsilon"] is None and not x["recipe"].endswith("+ema")):
        ax.axhline(s["mean"], color="k", ls=["--", ":", "-."][i % 3], lw=1, label=s["recipe"])
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 8], ["1", "3", "8"])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (delta = 1e-5); dashed: EMA of the parameters")
    ax.set_ylabel("test accuracy (mean +- std, 5 seeds)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
