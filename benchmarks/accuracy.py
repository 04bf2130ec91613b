"""Accuracy at the same epsilon: DP-SGD vs BandMF vs DP-SGD + augmentation multiplicity, each with and without
parameter EMA, on the embedded 8x8 digits (1,437 train / 360 test) with an MLP 64 -> 128 -> 10.

All rows share the model, the expected batch size B, the number of steps T, the clip norm, the optimiser and the
learning rate; each mechanism's noise multiplier is calibrated to the target epsilon (delta = 1e-5, RDP
accountant for all rows -- fast; PLD/PRV would lower every sigma a little):

* ``dpsgd``:      Poisson sampling q = B/N, T steps, independent noise (``jaxdp.add_noise``).
* ``bandmf-b``:   cyclic Poisson sampling over b groups at rate p = bB/N, b-banded MF noise optimised for T steps
                  (``jaxdp.bandmf_noise``), accounted as DP-SGD with rate p and ceil(T/b) steps.
* ``blt-d``:      BLT noise with d buffers (``jaxdp.blt.blt_noise``) over a fixed secret batch order
                  (``FixedOrderSampler``: b = floor(N/B) batches of exactly B, each example once per epoch, b steps
                  apart), strategy optimised for T steps with ceil(T/b) participations, noise scaled to that
                  sensitivity: ONE Gaussian mechanism, sigma calibrated as such (no amplification by sampling).
* ``dpsgd+aug``:  DP-SGD with augmentation multiplicity K = 4 (default views: pixel jitter N(0, 0.1^2);
                  ``--augment shift``: random +-1 pixel shifts, which hurt this MLP); views averaged before
                  clipping, so sensitivity and accounting are DP-SGD's.
* each also evaluated with the EMA of its parameters (``+ema``, decay 0.99 with warm-up): free post-processing.
* ``non-private``: the same training without clipping or noise (learning rate ``lr_nonprivate``: the DP rows'
  rate makes unclipped SGD diverge).

    PYTHONPATH=. python benchmarks/accuracy.py [--epsilons 1 3 8] [--seeds 0 1 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp
from jaxdp import accounting
from jaxdp.data import load_digits
from jaxdp.recipe import augmentation_keys, augmentation_multiplicity, ema_update
from jaxdp.blt import blt_noise
from jaxdp.sampling import CyclicPoissonSampler, FixedOrderSampler, PoissonSampler

DELTA = 1e-5
CFG = dict(batch_size=128, epochs=20, clip=1.0, lr=2.0, momentum=0.0, hidden=128, ema_decay=0.99, aug_k=4,
           augment="jitter", accountant="rdp", lr_nonprivate=0.5)


def _init(key, hidden):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (64, hidden)) * math.sqrt(2.0 / 64), "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 10)) * math.sqrt(1.0 / hidden), "b2": jnp.zeros(10)}


def _logits(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(p, batch["x"]), batch["y"])


def _shift(key, ex):
    """A random shift of the 8x8 image by -1, 0 or +1 pixel in each direction (zero fill)."""
    kx, ky = jax.random.split(key)
    img = jnp.pad(ex["x"].reshape(8, 8), 1)
    dx, dy = jax.random.randint(kx, (), 0, 3), jax.random.randint(ky, (), 0, 3)
    img = jax.lax.dynamic_slice(img, (dy, dx), (8, 8))
    return {"x": img.reshape(-1), "y": ex["y"]}


def _jitter(key, ex):
    """Pixel jitter: each pixel plus N(0, 0.1^2), clipped to [0, 1]."""
    return {"x": jnp.clip(ex["x"] + 0.1 * jax.random.normal(key, ex["x"].shape), 0.0, 1.0), "y": ex["y"]}


def _accuracy(p, x, y):
    return float(jnp.mean(jnp.argmax(_logits(p, x), -1) == y))


def _pad(b: int) -> int:
    """One padded batch size per run: B + 8 sd of the Poisson batch size (never exceeded in practice; checked),
    so each method compiles once."""
    return int(math.ceil((b + 8 * math.sqrt(b)) / 16) * 16)


def _sampler(method, n, q, bands, seed):
    if method.startswith("bandmf"):
        return CyclicPoissonSampler(n, q * bands, bands, seed, pad_to_multiple=_pad(CFG["batch_size"]))
    if method.startswith("blt"):
        return FixedOrderSampler(n, CFG["batch_size"], seed)
    return PoissonSampler(n, q, seed, pad_to_multiple=_pad(CFG["batch_size"]))


_RUNS: dict = {}   # method -> (transform factory, jitted training loop); sigma and keys are traced arguments


def _train_fn(method: str, steps: int, e: float, bands: int, n_train: int):
    """One jitted ``lax.scan`` over all steps per method (batches precomputed by the sampler as index/mask
    arrays). The noise transform is built with sigma = 1 and each step computes ``sigma * noise(S / sigma) =
    (S + sigma w) / E``: the update of a transform built with sigma, but sigma is a traced argument, so runs at
    other epsilons and seeds reuse the compiled loop."""
    if method in _RUNS:
        return _RUNS[method]
    private = method != "non-private"
    opt = optax.sgd(CFG["lr"] if private else CFG["lr_nonprivate"], momentum=CFG["momentum"] or None)
    if method.startswith("bandmf"):
        def noise(key):
            return jaxdp.bandmf_noise(noise_multiplier=1.0, l2_clip_norm=CFG["clip"], expected_batch_size=e, key=key,
                                      bands=bands, steps=steps)
    elif method.startswith("blt"):
        sep = int(n_train) // CFG["batch_size"]

        def noise(key):
            return blt_noise(noise_multiplier=1.0, l2_clip_norm=CFG["clip"], expected_batch_size=e, key=key,
                             steps=steps, buffers=bands, min_separation=sep, participations=-(-steps // sep),
                             momentum=CFG["momentum"])
    else:
        def noise(key):
            return jaxdp.add_noise(noise_multiplier=1.0, l2_clip_norm=CFG["clip"], expected_batch_size=e, key=key)
    aug = method.startswith("dpsgd+aug")
    augment = {"shift": _shift, "jitter": _jitter}[CFG["augment"]]
    loss = augmentation_multiplicity(_loss, augment, CFG["aug_k"]) if aug else _loss
    grad_fn = jaxdp.clipped_grad(loss, CFG["clip"], method="vmap")
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
                g = jax.grad(lambda pp: jnp.sum(jnp.where(mask, _loss(pp, batch), 0.0)) / e)(p)
                u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s, ema_update(ema, p, t, CFG["ema_decay"])), None

        ts = jnp.arange(idxs.shape[0])
        (p, s, ema), _ = jax.lax.scan(body, (params, state, params), (idxs, masks, ts))
        return p, ema

    _RUNS[method] = (make, train)
    return _RUNS[method]


def run(method: str, epsilon: float | None, seed: int, data) -> dict:
    xtr, ytr, xte, yte = data
    n, b_exp = len(ytr), CFG["batch_size"]
    q = b_exp / n
    steps = math.ceil(CFG["epochs"] / q)
    key = jax.random.key(seed)
    params = _init(jax.random.fold_in(key, 1), CFG["hidden"])
    bands = int(method.split("-")[1]) if method.startswith(("bandmf", "blt")) else 1   # blt: buffers
    sampler = _sampler(method, n, q, bands, seed)
    sigma = 1.0
    if method.startswith("bandmf"):   # DP-SGD with rate b q and ceil(T / b) steps
        sigma = accounting.calibrate_noise_multiplier(epsilon, DELTA, q * bands,
                                                      steps=accounting.cyclic_participations(steps, bands),
                                                      accountant=CFG["accountant"])
    elif method.startswith("blt"):   # one Gaussian mechanism for the whole horizon
        sigma = accounting.calibrate_noise_multiplier(epsilon, DELTA, 1.0, steps=1, accountant=CFG["accountant"])
    elif method != "non-private":
        sigma = accounting.calibrate_noise_multiplier(epsilon, DELTA, q, steps=steps, accountant=CFG["accountant"])
    make, train = _train_fn(method, steps, b_exp, bands, n)
    batches = [sampler.sample(t) for t in range(steps)]
    if method.startswith("blt"):   # exactly B real rows; pad to the shared shape (padding contributes nothing)
        pad = _pad(b_exp) - b_exp
        batches = [(np.concatenate([i, np.zeros(pad, np.int32)]), np.concatenate([m, np.zeros(pad, bool)]))
                   for i, m in batches]
    if any(b[0].shape[0] != _pad(b_exp) for b in batches):
        raise RuntimeError("a batch exceeded the fixed padded size; raise _pad")
    idxs = jnp.asarray(np.stack([b[0] for b in batches]))
    masks = jnp.asarray(np.stack([b[1] for b in batches]))
    tx = make(jax.random.fold_in(key, 2))
    t0 = time.perf_counter()
    params, ema = train(params, tx.init(params), idxs, masks, jnp.float32(sigma), jax.random.fold_in(key, 3),
                        xtr, ytr)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    return {"method": method, "epsilon": epsilon, "seed": seed,
            "noise_multiplier": None if method == "non-private" else sigma, "steps": steps,
            "bands": bands, "accuracy": _accuracy(params, xte, yte), "accuracy_ema": _accuracy(ema, xte, yte),
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["dpsgd", "bandmf-4", "bandmf-8", "dpsgd+aug"])
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "accuracy.json"))
    ap.add_argument("--plot", default=None, help="also write a PNG of accuracy against epsilon")
    for k in ("batch_size", "epochs", "lr", "aug_k", "augment"):
        ap.add_argument("--" + k.replace("_", "-"), type=type(CFG[k]), default=CFG[k])
    args = ap.parse_args()
    for k in ("batch_size", "epochs", "lr", "aug_k", "augment"):
        CFG[k] = getattr(args, k)
    d = load_digits()
    data = (jnp.asarray(d.x_train.reshape(len(d.x_train), -1)), jnp.asarray(d.y_train),
            jnp.asarray(d.x_test.reshape(len(d.x_test), -1)), jnp.asarray(d.y_test))
    rows, t_start = [], time.perf_counter()
    for seed in args.seeds:
        rows.append(run("non-private", None, seed, data))
    for eps in args.epsilons:
        for method in args.methods:
            for seed in args.seeds:
                rows.append(run(method, eps, seed, data))
                r = rows[-1]
                print(f"  eps={eps:g} {method:12s} seed={seed} sigma={r['noise_multiplier']:.3f} "
                      f"acc={r['accuracy']:.4f} ema={r['accuracy_ema']:.4f} ({r['seconds']:.1f}s)", flush=True)
    summary = []
    for eps in [None, *args.epsilons]:
        for method in (["non-private"] if eps is None else args.methods):
            rs = [r for r in rows if r["epsilon"] == eps and r["method"] == method]
            for col, label in (("accuracy", method), ("accuracy_ema", method + "+ema")):
                a = np.array([r[col] for r in rs])
                summary.append({"epsilon": eps, "method": label, "mean": float(a.mean()),
                                "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
                                "noise_multiplier": rs[0]["noise_multiplier"]})
    print(f"\nTest accuracy, mean +- std over {len(args.seeds)} seeds (digits MLP, B={CFG['batch_size']}, "
          f"T={rows[0]['steps']} steps, delta={DELTA:g}, {CFG['accountant']} calibration)")
    print(f"{'epsilon':>8} {'method':18} {'sigma':>7} {'accuracy':>17}")
    for s in summary:
        eps = "inf" if s["epsilon"] is None else f"{s['epsilon']:g}"
        sig = "-" if s["noise_multiplier"] is None else f"{s['noise_multiplier']:.3f}"
        print(f"{eps:>8} {s['method']:18} {sig:>7} {s['mean']:.4f} +- {s['std']:.4f}")
    out = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "device": str(jax.devices()[0].device_kind)},
           "versions": {"jax": jax.__version__, "optax": optax.__version__, "jaxdp": jaxdp.__version__},
           "config": {**CFG, "delta": DELTA, "seeds": args.seeds, "epsilons": args.epsilons,
                      "methods": args.methods},
           "runs": rows, "summary": summary, "total_seconds": time.perf_counter() - t_start}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(s["method"] for s in summary if s["epsilon"] is not None):
            ss = [s for s in summary if s["method"] == label]
            ax.errorbar([s["epsilon"] for s in ss], [s["mean"] for s in ss], [s["std"] for s in ss],
                        marker="o", capsize=3, label=label)
        np_acc = [s["mean"] for s in summary if s["epsilon"] is None and s["method"] == "non-private"][0]
        ax.axhline(np_acc, color="k", ls="--", label="non-private")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (delta = 1e-5)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
