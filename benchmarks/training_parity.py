"""Training parity: the same MLP, data and hyperparameters trained with jaxdp and with Opacus, 3 seeds each.

Model 64 -> 32 (ReLU) -> 10 on the embedded 8x8 digits (1,437 train / 360 test), DP-SGD with Poisson sampling.
Both runs use Opacus's sample rate q = 1/ceil(N/B) and expected batch size int(N q) (jaxdp through
``jaxdp.compat(..., opacus_compat=True)``) so that the hyperparameters are identical; each seed starts both
libraries from the same initial weights (Flax init copied into torch). Epsilon is reported by each library's
own accountants (PRV and RDP, delta = 1e-5).

    PYTHONPATH=. python benchmarks/training_parity.py [--epochs 10] [--seeds 0 1 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import jaxdp  # noqa: E402
from jaxdp import compat  # noqa: E402
import parity_harness as h  # noqa: E402

CONFIG = dict(batch_size=64, noise_multiplier=1.0, max_grad_norm=1.0, lr=0.5, delta=1e-5)


def _data():
    d = h.digits()
    return (d.x_train.reshape(len(d.x_train), -1), d.y_train, d.x_test.reshape(len(d.x_test), -1), d.y_test)


def train_jaxdp(seed: int, epochs: int) -> dict:
    xtr, ytr, xte, yte = _data()
    n = len(ytr)
    q = compat.sample_rate(n, CONFIG["batch_size"], opacus_compat=True)
    e = compat.expected_batch_size(n, q, opacus_compat=True)
    module = h.FlaxMLP()
    params = module.init(jax.random.key(seed), jnp.zeros((1, 64)))["params"]

    def loss_fn(p, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": p}, x), y)

    grad_fn = jaxdp.clipped_grad(loss_fn, CONFIG["max_grad_norm"], method="vmap")
    tx = jaxdp.dpsgd(CONFIG["lr"], l2_clip_norm=CONFIG["max_grad_norm"], noise_multiplier=CONFIG["noise_multiplier"],
                     expected_batch_size=e, key=jax.random.key(1000 + seed))
    state = tx.init(params)

    @jax.jit
    def step(p, s, x, y, m):
        g, _ = grad_fn(p, (x, y), m)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    sampler = jaxdp.PoissonSampler(n, q, seed=2000 + seed)
    steps = sampler.steps_for_epochs(epochs)
    t0 = time.perf_counter()
    for i in range(steps):
        idx, mask = sampler.sample(i)
        params, state = step(params, state, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]), jnp.asarray(mask))
    wall = time.perf_counter() - t0
    logits = module.apply({"params": params}, jnp.asarray(xte))
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == yte))
    eps = {a: jaxdp.accounting.compute_epsilon(CONFIG["noise_multiplier"], q, steps, CONFIG["delta"], accountant=a)
           for a in ("prv", "rdp")}
    return {"library": "jaxdp", "seed": seed, "steps": steps, "sample_rate": q, "expected_batch_size": e,
            "accuracy": acc, "epsilon_prv": eps["prv"], "epsilon_rdp": eps["rdp"], "train_seconds": wall}


def train_opacus(seed: int, epochs: int) -> dict:
    xtr, ytr, xte, yte = _data()
    module = h.TorchMLP()
    flax_params = h.FlaxMLP().init(jax.random.key(seed), jnp.zeros((1, 64)))["params"]
    table = h._dense("fc1", "fc1") + h._dense("fc2", "fc2")
    h._copy_into_torch(table, flax_params, module)   # same initial weights as the jaxdp run of this seed
    torch.manual_seed(3000 + seed)
    data = TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr).long())
    opt = torch.optim.SGD(module.parameters(), lr=CONFIG["lr"])
    res = {}
    for acct in ("prv", "rdp"):
        res[acct] = PrivacyEngine(accountant=acct)
    engine = res["prv"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = engine.make_private(
            module=module, optimizer=opt, data_loader=DataLoader(data, batch_size=CONFIG["batch_size"]),
            noise_multiplier=CONFIG["noise_multiplier"], max_grad_norm=CONFIG["max_grad_norm"],
            poisson_sampling=True, noise_generator=torch.Generator().manual_seed(4000 + seed))
        steps = 0
        t0 = time.perf_counter()
        for _ in range(epochs):
            for xb, yb in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                steps += 1
        wall = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xte)).argmax(-1).numpy() == yte).mean())
    q = 1 / len(loader)
    rdp = res["rdp"].accountant
    rdp.history = [(CONFIG["noise_multiplier"], q, steps)]
    return {"library": "opacus", "seed": seed, "steps": steps, "sample_rate": q,
            "expected_batch_size": opt.expected_batch_size, "accuracy": acc,
            "epsilon_prv": engine.get_epsilon(CONFIG["delta"]), "epsilon_rdp": rdp.get_epsilon(CONFIG["delta"]),
            "train_seconds": wall}


def same_batch_trajectory(seed: int = 0, epochs: int = 10) -> dict:
    """Noise 0, identical batches (jaxdp's Poisson sampler drives both): the whole training trajectory must
    coincide, so any systematic difference between the libraries' DP-SGD steps would show up here."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    xtr, ytr, xte, yte = _data()
    n = len(ytr)
    q = compat.sample_rate(n, CONFIG["batch_size"], opacus_compat=True)
    e = compat.expected_batch_size(n, q, opacus_compat=True)
    module = h.FlaxMLP()
    params = module.init(jax.random.key(seed), jnp.zeros((1, 64)))["params"]
    torch_mlp = h.TorchMLP()
    table = h._dense("fc1", "fc1") + h._dense("fc2", "fc2")
    h._copy_into_torch(table, params, torch_mlp)
    gsm = GradSampleModule(torch_mlp, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=CONFIG["lr"]), noise_multiplier=0.0,
                      max_grad_norm=CONFIG["max_grad_norm"], expected_batch_size=e, loss_reduction="sum")
    # loss_reduction="sum" in Opacus does not divide by E; do it in SGD's lr instead: lr / E (same update).
    for g in opt.param_groups:
        g["lr"] = CONFIG["lr"] / e

    def loss_fn(p, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": p}, x), y)

    grad_fn = jaxdp.clipped_grad(loss_fn, CONFIG["max_grad_norm"], method="vmap")
    tx = jaxdp.dpsgd(CONFIG["lr"], l2_clip_norm=CONFIG["max_grad_norm"], noise_multiplier=0.0, expected_batch_size=e,
                     key=jax.random.key(0))
    state = tx.init(params)

    @jax.jit
    def step(p, s, x, y, m):
        g, _ = grad_fn(p, (x, y), m)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    sampler = jaxdp.PoissonSampler(n, q, seed=2000 + seed)
    steps = sampler.steps_for_epochs(epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            idx, mask = sampler.sample(i)
            params, state = step(params, state, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]), jnp.asarray(mask))
            real = idx[mask]
            opt.zero_grad()
            if real.size:
                out = gsm(torch.from_numpy(xtr[real]))
                torch.nn.functional.cross_entropy(out, torch.from_numpy(ytr[real]).long(), reduction="sum").backward()
                opt.step()
    ours = h.ModelPair("mlp", module, params, torch_mlp, table, None).to_torch(params)
    theirs = {k: v.detach().numpy() for k, v in torch_mlp.named_parameters()}
    max_diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs)
    acc_j = float(np.mean(np.argmax(np.asarray(module.apply({"params": params}, jnp.asarray(xte))), -1) == yte))
    with torch.no_grad():
        acc_o = float((torch_mlp(torch.from_numpy(xte)).argmax(-1).numpy() == yte).mean())
    return {"seed": seed, "steps": steps, "max_abs_param_diff": max_diff, "accuracy_jaxdp": acc_j,
            "accuracy_opacus": acc_o}


def run(seeds=(0, 1, 2), epochs: int = 10) -> dict:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    runs = []
    for s in seeds:
        runs.append(train_jaxdp(s, epochs))
        runs.append(train_opacus(s, epochs))
    summary = {}
    for lib in ("jaxdp", "opacus"):
        rs = [r for r in runs if r["library"] == lib]
        accs = np.array([r["accuracy"] for r in rs])
        summary[lib] = {"accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                        "epsilon_prv": rs[0]["epsilon_prv"], "epsilon_rdp": rs[0]["epsilon_rdp"],
                        "steps": rs[0]["steps"], "sample_rate": rs[0]["sample_rate"],
                        "expected_batch_size": rs[0]["expected_batch_size"]}
    trajectory = same_batch_trajectory(seeds[0], epochs)
    return {"config": dict(CONFIG, epochs=epochs, seeds=list(seeds), model="MLP 64-32-10", data="digits"),
            "runs": runs, "summary": summary, "same_batch_trajectory": trajectory}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = run(tuple(args.seeds), args.epochs)
    print(f"{'library':8} {'acc mean':>9} {'acc std':>8} {'eps PRV':>8} {'eps RDP':>8} {'steps':>6} {'q':>8} {'E':>4}")
    for lib, s in out["summary"].items():
        print(f"{lib:8} {s['accuracy_mean']:9.4f} {s['accuracy_std']:8.4f} {s['epsilon_prv']:8.4f} "
              f"{s['epsilon_rdp']:8.4f} {s['steps']:6d} {s['sample_rate']:8.5f} {s['expected_batch_size']:4g}")
    t = out["same_batch_trajectory"]
    print(f"noise 0, same batches, {t['steps']} steps: max |param diff| {t['max_abs_param_diff']:.2e}, "
          f"accuracy jaxdp {t['accuracy_jaxdp']:.4f} opacus {t['accuracy_opacus']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
