"""DP step time vs the non-private step: jaxdp (vmap / ghost / auto) against Opacus and jax-privacy.

Protocol (docs/privacy.md): every contender runs on the same inputs in one process; the timed steps
ALTERNATE between contenders (round robin) so machine noise hits all of them alike; median of ``--steps``
timed steps after 2 warm-up steps; ``jax.block_until_ready`` on every result; compile time reported
separately; torch uses ``torch.set_num_threads(os.cpu_count())``. Peak memory: XLA's memory analysis of the
compiled step (temp + output bytes; arguments excluded), jax rows only.

A DP step is: per-example clipped sum + Gaussian noise (added once) + SGD update, all in one jitted function.
The non-private step is ``grad(sum of losses)`` + SGD update.

    python benchmarks/step_speed.py                      # all models, writes benchmarks/results/step_speed.json
    python benchmarks/step_speed.py --models mlp --steps 20 --no-torch
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxdp  # noqa: E402
from jaxdp.noise import gaussian_like  # noqa: E402

C, SIGMA, LR = 1.0, 1.0, 0.1
SLOW_S, SLOW_STEPS = 1.5, 5
BLOCK = 3                     # steps per row per round; the first of each block is not timed
# rows slower than SLOW_S per step (vmap-style) are timed SLOW_STEPS times only


# ----------------------------------------------------------------------------------------------------------
# Models (pure JAX; the torch twins below have the same shapes)


def _dense(key, a, b):
    return {"w": jax.random.normal(key, (a, b)) * (1.0 / np.sqrt(a)), "b": jnp.zeros((b,))}


def _xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def mlp_model(key, B):
    ks = jax.random.split(key, 5)
    sizes = [784, 512, 512, 10]
    params = {f"fc{i}": _dense(ks[i], a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

    def loss(p, b):
        h = b["x"]
        for i in range(3):
            h = h @ p[f"fc{i}"]["w"] + p[f"fc{i}"]["b"]
            if i < 2:
                h = jax.nn.relu(h)
        return _xent(h, b["y"])

    batch = {"x": jax.random.normal(ks[3], (B, 784)), "y": jax.random.randint(ks[4], (B,), 0, 10)}
    return params, loss, batch


def _pool(x):  # maxpool 2x2 stride 1, NHWC
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")


def cnn_model(key, B):
    ks = jax.random.split(key, 6)
    params = {"conv1": {"w": jax.random.normal(ks[0], (8, 8, 1, 16)) / 8.0, "b": jnp.zeros(16)},
              "conv2": {"w": jax.random.normal(ks[1], (4, 4, 16, 32)) / 16.0, "b": jnp.zeros(32)},
              "fc1": _dense(ks[2], 32 * 4 * 4, 32), "fc2": _dense(ks[3], 32, 10)}
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(p, b):
        h = jax.lax.conv_general_dilated(b["x"], p["conv1"]["w"], (2, 2), ((3, 3), (3, 3)), dimension_numbers=dn)
        h = _pool(jax.nn.relu(h + p["conv1"]["b"]))                                      # 13x13x16
        h = jax.lax.conv_general_dilated(h, p["conv2"]["w"], (2, 2), "VALID", dimension_numbers=dn)
        h = _pool(jax.nn.relu(h + p["conv2"]["b"]))                                      # 4x4x32
        h = h.reshape(h.shape[0], -1)
        h = jax.nn.relu(h @ p["fc1"]["w"] + p["fc1"]["b"])
        return _xent(h @ p["fc2"]["w"] + p["fc2"]["b"], b["y"])

    batch = {"x": jax.random.normal(ks[4], (B, 28, 28, 1)), "y": jax.random.randint(ks[5], (B,), 0, 10)}
    return params, loss, batch


TF = dict(V=256, d=128, T=64, heads=4, layers=2, classes=2)


def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * p["g"] + p["b"]


def transformer_model(key, B):
    V, d, T, H, L, K = (TF[k] for k in ("V", "d", "T", "heads", "layers", "classes"))
    ks = iter(jax.random.split(key, 64))
    params = {"emb": jax.random.normal(next(ks), (V, d)) * 0.02, "pos": jax.random.normal(next(ks), (T, d)) * 0.02}
    for i in range(L):
        params[f"layer{i}"] = {
            "ln1": {"g": jnp.ones(d), "b": jnp.zeros(d)}, "ln2": {"g": jnp.ones(d), "b": jnp.zeros(d)},
            "q": _dense(next(ks), d, d), "k": _dense(next(ks), d, d), "v": _dense(next(ks), d, d),
            "o": _dense(next(ks), d, d), "up": _dense(next(ks), d, 4 * d), "down": _dense(next(ks), 4 * d, d)}
    params["head"] = _dense(next(ks), d, K)

    def lin(x, p):
        return x @ p["w"] + p["b"]

    def loss(p, b):
        h = p["emb"][b["t"]] + p["pos"]
        n = h.shape[0]
        for i in range(L):
            q = p[f"layer{i}"]
            x = _ln(h, q["ln1"])
            def heads(z):
                return z.reshape(n, T, H, d // H).transpose(0, 2, 1, 3)
            qq, kk, vv = heads(lin(x, q["q"])), heads(lin(x, q["k"])), heads(lin(x, q["v"]))
            att = jax.nn.softmax(qq @ kk.transpose(0, 1, 3, 2) / np.sqrt(d // H), -1)
            h = h + lin((att @ vv).transpose(0, 2, 1, 3).reshape(n, T, d), q["o"])
            h = h + lin(jax.nn.gelu(lin(_ln(h, q["ln2"]), q["up"])), q["down"])
        return _xent(lin(h.mean(1), p["head"]), b["y"])

    batch = {"t": jax.random.randint(next(ks), (B, T), 0, V), "y": jax.random.randint(next(ks), (B,), 0, K)}
    return params, loss, batch


EMB = dict(V=10000, d=64, T=32, classes=2)


def embedding_model(key, B):
    V, d, T, K = (EMB[k] for k in ("V", "d", "T", "classes"))
    ks = jax.random.split(key, 4)
    params = {"emb": jax.random.normal(ks[0], (V, d)) * 0.1, "head": _dense(ks[1], d, K)}

    def loss(p, b):
        h = p["emb"][b["t"]].mean(1)
        return _xent(h @ p["head"]["w"] + p["head"]["b"], b["y"])

    batch = {"t": jax.random.randint(ks[2], (B, T), 0, V), "y": jax.random.randint(ks[3], (B,), 0, K)}
    return params, loss, batch


MODELS = {"mlp": (mlp_model, 256), "cnn": (cnn_model, 256), "transformer": (transformer_model, 64),
          "embedding": (embedding_model, 256)}


# ----------------------------------------------------------------------------------------------------------
# Torch twins for Opacus


def torch_model(name):
    import torch
    from torch import nn

    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
                             nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1), nn.Flatten(),
                             nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    if name == "embedding":
        class Emb(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(EMB["V"], EMB["d"])
                self.head = nn.Linear(EMB["d"], EMB["classes"])

            def forward(self, t):
                return self.head(self.emb(t).mean(1))
        return Emb()
    V, d, T, H, L, K = (TF[k] for k in ("V", "d", "T", "heads", "layers", "classes"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, h):
            n = h.shape[0]
            x = self.ln1(h)
            def heads(z):
                return z.reshape(n, T, H, d // H).transpose(1, 2)
            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // H) ** 0.5, -1)
            h = h + self.o((att @ v).transpose(1, 2).reshape(n, T, d))
            return h + self.down(torch.nn.functional.gelu(self.up(self.ln2(h))))

    class TFM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, d)
            self.pos = nn.Embedding(T, d)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.head = nn.Linear(d, K)

        def forward(self, t):
            h = self.emb(t) + self.pos(torch.arange(T))
            for b in self.blocks:
                h = b(h)
            return self.head(h.mean(1))
    return TFM()


def torch_steppers(name, batch):
    """{row name: step()} for the non-private torch step and Opacus hooks / ghost modes."""
    import torch
    from opacus import PrivacyEngine

    torch.set_num_threads(os.cpu_count())
    x = torch.from_numpy(np.asarray(batch["x" if "x" in batch else "t"]))
    if name == "cnn":
        x = x.permute(0, 3, 1, 2).contiguous()
    if x.dtype == torch.int32:
        x = x.long()
    y = torch.from_numpy(np.asarray(batch["y"])).long()
    out = {}

    torch.manual_seed(0)
    m = torch_model(name)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    crit = torch.nn.CrossEntropyLoss()

    def plain():
        opt.zero_grad()
        crit(m(x), y).backward()
        opt.step()
    out["torch non-private"] = plain

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        mm = torch_model(name)
        o = torch.optim.SGD(mm.parameters(), lr=LR)
        eng = PrivacyEngine()
        kw = dict(module=mm, optimizer=o, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=C,
                  poisson_sampling=False)
        if mode == "ghost":
            pm, po, pc, _ = eng.make_private(criterion=torch.nn.CrossEntropyLoss(), grad_sample_mode="ghost", **kw)
        else:
            pm, po, _ = eng.make_private(**kw)
            pc = torch.nn.CrossEntropyLoss()

        def step(pm=pm, po=po, pc=pc):
            po.zero_grad()
            pc(pm(x), y).backward()
            po.step()
        out[f"opacus {mode}"] = step
    return out


# ----------------------------------------------------------------------------------------------------------
# JAX steps


def _noise_per_leaf(key, leaves):
    """N(0, (SIGMA C)^2) with ``jax.random.normal`` per leaf: what the jax-privacy row and a naive step do."""
    ks = jax.random.split(key, len(leaves))
    return [SIGMA * C * jax.random.normal(k, g.shape) for g, k in zip(leaves, ks)]


def jax_steps(params, loss, batch, methods):
    def sgd(p, g):
        return jax.tree.map(lambda a, b: a - LR * b, p, g)

    def nonpriv(p, b, key):
        g = jax.grad(lambda q: jnp.mean(loss(q, b)))(p)
        return sgd(p, g)

    B = jax.tree.leaves(batch)[0].shape[0]
    out = {"jax non-private": nonpriv}
    for m in methods:
        cg = jaxdp.clipped_grad(loss, C, method=m)

        def dp(p, b, key, cg=cg):
            s, _ = cg(p, b)
            leaves, tdef = jax.tree.flatten(s)
            noise = gaussian_like(key, leaves, SIGMA * C)   # jaxdp.add_noise's sampler
            noisy = [(g + z) / B for g, z in zip(leaves, noise)]
            return sgd(p, jax.tree.unflatten(tdef, noisy))
        out[f"jaxdp {m}"] = dp
    try:
        import jax_privacy
        jp = jax_privacy.clipped_grad(lambda p, b: jnp.sum(loss(p, b)), l2_clip_norm=C, batch_argnums=1)

        def jpstep(p, b, key):
            leaves, tdef = jax.tree.flatten(jp(p, b))
            noisy = [(g + z) / B for g, z in zip(leaves, _noise_per_leaf(key, leaves))]
            return sgd(p, jax.tree.unflatten(tdef, noisy))
        out["jax-privacy clipped_grad"] = jpstep
    except Exception as e:  # noqa: BLE001
        print(f"jax-privacy unavailable: {e!r}", file=sys.stderr)
    return out


def _mem(compiled):
    try:
        ma = compiled.memory_analysis()
        return int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def bench_model(name, steps, methods, use_torch):
    make, B = MODELS[name]
    params, loss, batch = make(jax.random.key(0), B)
    key = jax.random.key(1)
    rows, fns = {}, {}
    for row, f in jax_steps(params, loss, batch, methods).items():
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(f).lower(params, batch, key).compile()
        except Exception as e:  # noqa: BLE001
            print(f"{name}/{row}: {e!r}", file=sys.stderr)
            continue
        rows[row] = {"compile_s": time.perf_counter() - t0, "peak_bytes": _mem(compiled)}
        fns[row] = lambda c=compiled: jax.block_until_ready(c(params, batch, key))
    if use_torch:
        try:
            for row, f in torch_steppers(name, batch).items():
                rows[row] = {"compile_s": None, "peak_bytes": None}
                fns[row] = f
        except Exception as e:  # noqa: BLE001
            print(f"{name}/opacus: {e!r}", file=sys.stderr)
    times = _time_rows(fns, steps)
    base = float(np.median(times["jax non-private"]))
    tbase = float(np.median(times["torch non-private"])) if "torch non-private" in times else None
    opacus_best = min((float(np.median(times[r])) for r in times if r.startswith("opacus")), default=None)
    for r in fns:
        med = float(np.median(times[r]))
        rows[r].update(median_s=med, examples_per_s=B / med, steps=len(times[r]),
                       ratio_vs_own_nonprivate=med / (tbase if r.startswith(("opacus", "torch")) else base),
                       opacus_best_over_this=(opacus_best / med) if opacus_best else None)
    return {"batch_size": B, "rows": rows, "breakdown": breakdown(params, loss, batch, steps)}


def _time_rows(fns, steps):
    """Median-ready step times per row, measured side by side in blocks.

    Rounds alternate between rows (machine noise hits all rows alike). Within a round each row runs
    ``BLOCK`` consecutive steps and only the last ``BLOCK - 1`` are timed: the first step after a switch between
    frameworks pays for the other framework's thread pool still spinning (torch's OpenMP and XLA's pool both
    busy-wait after work), which measured +40-70% on the first JAX step after an Opacus step on 2 cores.
    Rows slower than ``SLOW_S`` per step are timed ``SLOW_STEPS`` times only.
    """
    times = {r: [] for r in fns}
    slow = set()
    for r, f in fns.items():       # warm-up
        f()
        t0 = time.perf_counter()
        f()
        if time.perf_counter() - t0 > SLOW_S:
            slow.add(r)
    rounds = -(-steps // (BLOCK - 1))
    for i in range(rounds):  # noqa: B007 (the round counter is not needed)
        for r, f in fns.items():
            if r in slow:
                if len(times[r]) < SLOW_STEPS:
                    t0 = time.perf_counter()
                    f()
                    times[r].append(time.perf_counter() - t0)
                continue
            f()                        # absorbs the switch
            for _ in range(BLOCK - 1):
                t0 = time.perf_counter()
                f()
                times[r].append(time.perf_counter() - t0)
    return times


def breakdown(params, loss, batch, steps):
    """Where a DP step's time goes (JAX only, side by side): the plain gradient, the clipped per-example sum
    (method auto) and the Gaussian noise draw for every parameter (threefry + inverse-erf, as ``add_noise``)."""
    cg = jaxdp.clipped_grad(loss, C, method="auto")

    def grad(p, b, key):
        return jax.grad(lambda q: jnp.sum(loss(q, b)))(p)

    def clipped(p, b, key):
        return cg(p, b)[0]

    def noise(p, b, key):  # jaxdp's sampler (one flat draw, both threefry words)
        leaves, tdef = jax.tree.flatten(p)
        return jax.tree.unflatten(tdef, gaussian_like(key, leaves, SIGMA * C))

    def noise_per_leaf(p, b, key):
        leaves, tdef = jax.tree.flatten(p)
        return jax.tree.unflatten(tdef, _noise_per_leaf(key, leaves))

    key = jax.random.key(2)
    fns = {}
    for row, f in (("gradient", grad), ("clipped gradient (auto)", clipped), ("noise draw", noise),
                   ("noise draw, jax.random.normal per leaf", noise_per_leaf)):
        c = jax.jit(f).lower(params, batch, key).compile()
        fns[row] = lambda c=c: jax.block_until_ready(c(params, batch, key))
    med = {r: float(np.median(t)) for r, t in _time_rows(fns, steps).items()}
    return {"median_s": med,
            "clipped_over_gradient": med["clipped gradient (auto)"] / med["gradient"],
            "noise_over_gradient": med["noise draw"] / med["gradient"],
            "per_leaf_noise_over_jaxdp_noise": med["noise draw, jax.random.normal per leaf"] / med["noise draw"]}


def virtual_memory(models, logical=4096, physical=256):
    """XLA memory of the clipped sum: one physical chunk vs a logical batch processed in physical chunks.

    ``temp`` is XLA's temp allocation; ``temp+output`` adds the returned gradient (for one chunk the gradient
    is written straight to the output, for a virtual batch the running sum is the output and each chunk's
    sum is a temp, so a model whose parameters outweigh one chunk's activations pays one gradient more)."""
    out = {}
    for name in models:
        make, _ = MODELS[name]
        res = {}
        for label, B, mb in (("one chunk", physical, None), ("virtual", logical, physical)):
            params, loss, b = make(jax.random.key(0), B)
            f = jaxdp.clipped_grad(loss, C, microbatch_size=mb)
            ma = jax.jit(f).lower(params, b).compile().memory_analysis()
            res[label] = {"temp_bytes": int(ma.temp_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes)}
        one, vir = res["one chunk"], res["virtual"]
        res["temp_ratio"] = vir["temp_bytes"] / one["temp_bytes"]
        res["temp_plus_output_ratio"] = ((vir["temp_bytes"] + vir["output_bytes"])
                                         / (one["temp_bytes"] + one["output_bytes"]))
        out[name] = res
    return {"logical_batch": logical, "physical_batch": physical,
            "measure": "XLA memory_analysis of jit(clipped_grad(..., microbatch_size)); arguments excluded",
            "models": out}


def versions():
    v = {"python": platform.python_version(), "jax": jax.__version__, "jaxdp": jaxdp.__version__}
    for mod in ("jaxlib", "flax", "torch", "opacus", "jax_privacy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            v[mod] = None
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn,transformer,embedding")
    ap.add_argument("--methods", default="vmap,ghost,auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_speed.json"))
    ap.add_argument("--plot", default=None, help="PNG bar chart path (default: next to the JSON)")
    a = ap.parse_args(argv)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "device": str(jax.devices()[0].device_kind)},
              "versions": versions(),
              "config": {"clip_norm": C, "noise_multiplier": SIGMA, "steps": a.steps, "warmup": 2,
                         "timing": f"median; rounds alternate rows, each row runs {BLOCK} steps per round and the "
                                   "first is not timed; jax.block_until_ready; rows slower than "
                                   f"{SLOW_S} s/step timed {SLOW_STEPS} times only (see rows[*].steps)",
                         "memory": "XLA memory_analysis temp+output bytes of the compiled step"},
              "models": {}}
    for name in a.models.split(","):
        result["models"][name] = bench_model(name, a.steps, a.methods.split(","), not a.no_torch)
        print_table({name: result["models"][name]})
        print_breakdown(name, result["models"][name]["breakdown"])
    result["virtual_batch_memory"] = virtual_memory(a.models.split(","))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print_memory(result["virtual_batch_memory"])
    plot(result, a.plot or str(Path(a.out).with_suffix(".png")))
    print(f"wrote {a.out}")


def print_table(models):
    print(f"{'model':12s} {'row':26s} {'median ms':>10s} {'ex/s':>9s} {'vs own non-priv':>15s} "
          f"{'Opacus best / this':>18s} {'compile s':>9s} {'peak MB':>8s}")
    for name, m in models.items():
        for r, v in m["rows"].items():
            ob = v.get("opacus_best_over_this")
            cs = v.get("compile_s")
            pb = v.get("peak_bytes")
            print(f"{name:12s} {r:26s} {v['median_s'] * 1e3:10.2f} {v['examples_per_s']:9.0f} "
                  f"{v['ratio_vs_own_nonprivate']:15.2f} {'' if ob is None else f'{ob:.2f}':>18s} "
                  f"{'' if cs is None else f'{cs:.2f}':>9s} {'' if pb is None else f'{pb / 2**20:.1f}':>8s}")


def print_breakdown(name, bd):
    m = bd["median_s"]
    print(f"{name:12s} breakdown: gradient {m['gradient'] * 1e3:.2f} ms, clipped gradient (auto) "
          f"{m['clipped gradient (auto)'] * 1e3:.2f} ms ({bd['clipped_over_gradient']:.2f}x), noise draw "
          f"{m['noise draw'] * 1e3:.2f} ms ({bd['noise_over_gradient']:.2f}x the gradient; jax.random.normal per leaf "
          f"{m['noise draw, jax.random.normal per leaf'] * 1e3:.2f} ms)")


def print_memory(vm):
    print(f"virtual batch {vm['logical_batch']} in chunks of {vm['physical_batch']} vs one chunk (XLA memory):")
    for name, r in vm["models"].items():
        o = r["one chunk"]
        print(f"  {name:12s} temp {o['temp_bytes'] / 2**20:8.2f} MB -> {r['virtual']['temp_bytes'] / 2**20:8.2f} MB "
              f"({r['temp_ratio']:.3f}x); temp+output {r['temp_plus_output_ratio']:.3f}x")


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, n in zip(axes[0], names):
        rows = result["models"][n]["rows"]
        ax.barh(list(rows), [v["median_s"] * 1e3 for v in rows.values()])
        ax.set_xscale("log")
        ax.set_title(f"{n} (B={result['models'][n]['batch_size']})")
        ax.set_xlabel("median step time, ms (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
