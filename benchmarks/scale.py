"""DP training at scale: GPT-2 step time, compile time and memory, non-private vs jaxdp, looped vs scanned layers.

Rows (each in its own subprocess, so compile caches and memory peaks do not leak between rows; same random
tokens, same batch, random init -- nothing is downloaded):

    jax_nonprivate_loop / jaxdp_auto_loop / jaxdp_ghost_loop   jaxdp.lm.GPT2 (layers in a Python loop)
    jax_nonprivate_scan / jaxdp_auto_scan / jaxdp_ghost_scan   the same blocks stacked, in nnx.scan + nnx.remat
                                                               (checkpoint policy ``dots_saveable``)
    jaxprivacy_loop                                            jax-privacy 2.0 clipping.clipped_grad, looped model
    jax_nonprivate_lora / jaxdp_auto_lora                      LoRA rank 8 on q, v (jaxdp.lm.lora); adapters trained
    torch_nonprivate / opacus_ghost / opacus_hooks             transformers GPT2LMHeadModel; Opacus ghost clipping
                                                               (lm_head untied from wte: Opacus refuses tied weights)
                                                               and Opacus per-sample gradients (hooks)
    wrn_nonprivate / wrn_jaxdp_auto, vit_nonprivate / vit_jaxdp_auto
                                                               WRN-16-4 (GroupNorm) and ViT-Tiny (patch 4) on random
                                                               32x32x3 images, --vision-batch (scale_models.py)

The DP step is ``jaxdp.clipped_grad`` (per-sequence mean NLL, C = 1) + Gaussian noise (sigma = 1; jaxdp's
sampler ``jaxdp.noise.gaussian_like``, as ``jaxdp.add_noise`` draws it) + SGD; the
non-private step is the gradient of the mean loss + SGD. Columns: median step time (s) of ``--steps`` timed steps
after 1 warm-up step, DP / non-private ratio (same layer layout), compile time, XLA peak memory
(``memory_analysis()``: temp + arguments + outputs of the compiled step), the process's peak RSS, the plan
``jaxdp.ghost.explain`` chose (leaves per path), and with ``--fit-batch2 B2`` the largest batch within 16 GiB,
extrapolated from XLA's peak at the two batch sizes (affine in the batch; not run). A row that fails records its
error.

    PYTHONPATH=. python benchmarks/scale.py --layers 4 --d-model 256 --heads 4 --vocab 8192 --batch 8 \\
        --seq-len 128 --steps 3 --json benchmarks/results/scale_cpu_4layer.json
    PYTHONPATH=. python benchmarks/scale.py --preset gpt2 --batch 8 --seq-len 128      # GPT-2 124M config

Runs unchanged on a GPU (``JAX_PLATFORMS=cuda``; torch rows use cuda when available): ``make bench-gpu``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROWS = ("jax_nonprivate_loop", "jaxdp_auto_loop", "jaxdp_ghost_loop", "jaxprivacy_loop", "jax_nonprivate_scan",
        "jaxdp_auto_scan", "jaxdp_ghost_scan", "jax_nonprivate_lora", "jaxdp_auto_lora", "torch_nonprivate",
        "opacus_ghost", "opacus_hooks", "wrn_nonprivate", "wrn_jaxdp_auto", "vit_nonprivate", "vit_jaxdp_auto")
GIB16 = 16 * 2 ** 30
PRESETS = {"gpt2": dict(layers=12, d_model=768, heads=12, vocab=50257)}   # GPT-2 small, 124M parameters


def _cfg(a):
    from jaxdp.lm import GPT2Config
    return GPT2Config(vocab_size=a.vocab, n_positions=max(a.seq_len, 128), n_embd=a.d_model, n_layer=a.layers,
                      n_head=a.heads)


def _scanned_gpt2(cfg):
    """GPT-2 with its blocks stacked ([L, ...] leaves) and run by nnx.scan over nnx.remat'd blocks."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdp.lm.model import Block

    class ScanGPT2(nnx.Module):
        def __init__(self, cfg, rngs):
            init = nnx.initializers.normal(cfg.initializer_range)
            self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, rngs=rngs)
            self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, embedding_init=nnx.initializers.normal(0.01),
                                 rngs=rngs)

            @nnx.split_rngs(splits=cfg.n_layer)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return Block(cfg, r)
            self.h = make(rngs)
            self.ln_f = nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, rngs=rngs)

        def __call__(self, tokens):
            x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[-1]))

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            @nnx.remat(policy=jax.checkpoint_policies.dots_saveable)
            def run(h, blk):
                return blk(h)
            return self.wte.attend(self.ln_f(run(x, self.h)))

    return ScanGPT2(cfg, nnx.Rngs(0))


def _base(row: str) -> str:
    """The non-private row a row's DP / non-private ratio divides by (same model, same layer layout)."""
    if row.startswith(("torch", "opacus")):
        return "torch_nonprivate"
    if row.startswith(("wrn", "vit")):
        return row.split("_")[0] + "_nonprivate"
    if row == "jaxprivacy_loop":
        return "jax_nonprivate_loop"
    return "jax_nonprivate_" + row.rsplit("_", 1)[1]


def _jax_problem(row, a, bsz):
    """``(params, batch, loss, trainable)`` for a JAX row at batch size ``bsz``; ``loss(params, batch) -> [B]``."""
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(0)
    if row.startswith(("wrn", "vit")):
        from scale_models import WRN, ViT

        from jaxdp.models import cross_entropy
        model = WRN(16, 4, rngs=nnx.Rngs(0)) if row.startswith("wrn") else ViT(rngs=nnx.Rngs(0))
        graph, params = nnx.split(model)
        batch = {"x": jnp.asarray(rng.standard_normal((bsz, 32, 32, 3)), jnp.float32),
                 "y": jnp.asarray(rng.integers(0, 10, bsz))}

        def loss(p, b):
            return cross_entropy(nnx.merge(graph, p)(b["x"]), b["y"])
        return params, batch, loss, None

    from jaxdp.lm import GPT2
    from jaxdp.lm.finetune import TRAINABLE, make_loss_fn, sequence_nll, split_trainable
    from jaxdp.lm.lora import apply_lora

    cfg = _cfg(a)
    data = rng.integers(0, a.vocab, (bsz, a.seq_len))
    batch = {"tokens": jnp.asarray(data), "mask": jnp.ones(data.shape, bool)}
    if row.endswith("_lora"):            # rank-8 adapters on the q and v slices of c_attn; base weights frozen
        model = apply_lora(GPT2(cfg, rngs=nnx.Rngs(0)), 8, 16.0, ("q", "v"), rngs=nnx.Rngs(1))
        graph, params = split_trainable(model, nnx.LoRAParam)
        return params, batch, make_loss_fn(graph), TRAINABLE
    model = _scanned_gpt2(cfg) if row.endswith("_scan") else GPT2(cfg, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)

    def loss(p, b):
        return sequence_nll(nnx.merge(graph, p)(b["tokens"]), b["tokens"], b["mask"])
    return params, batch, loss, None


def _jax_step(row, loss, trainable, bsz):
    """The jitted ``step(params, batch, key) -> params``: SGD on the mean loss, or on the noisy clipped sum."""
    import jax
    import jax.numpy as jnp

    import jaxdp
    from jaxdp.noise import gaussian_like

    lr, C, sigma = 1e-3, 1.0, 1.0
    lora = trainable is not None

    def sgd(p, g, scale):        # g covers only the trainable part for LoRA rows
        if lora:
            return {"trainable": jax.tree.map(lambda x, y: x - scale * y, p["trainable"], g), "frozen": p["frozen"]}
        return jax.tree.map(lambda x, y: x - scale * y, p, g)

    def noisy(summed, key):      # jaxdp's own sampler (jaxdp.add_noise's draw), for every JAX DP row
        leaves, tdef = jax.tree.flatten(summed)
        return jax.tree.unflatten(tdef, [s + z for s, z in zip(leaves, gaussian_like(key, leaves, sigma * C))])

    if "nonprivate" in row:
        @jax.jit
        def step(p, b, key):
            if lora:
                g = jax.grad(lambda t: jnp.mean(loss({"trainable": t, "frozen": p["frozen"]}, b)))(p["trainable"])
            else:
                g = jax.grad(lambda q: jnp.mean(loss(q, b)))(p)
            return sgd(p, g, lr)
    elif row == "jaxprivacy_loop":
        from jax_privacy import clipping as jp_clipping  # type: ignore[import-untyped]
        # jax-privacy 2.0: vmap over examples (each keeps a batch axis of 1), clip each gradient to C, sum.
        grad_fn = jp_clipping.clipped_grad(lambda p, b: jnp.mean(loss(p, b)), l2_clip_norm=C, batch_argnums=1,
                                           keep_batch_dim=True)

        @jax.jit
        def step(p, b, key):
            return sgd(p, noisy(grad_fn(p, b), key), lr / bsz)
    else:
        method = "ghost" if "_ghost_" in row else "auto"
        grad_fn = jaxdp.clipped_grad(loss, C, method=method, trainable=trainable)

        @jax.jit
        def step(p, b, key):
            summed, _ = grad_fn(p, b)
            return sgd(p, noisy(summed["trainable"] if lora else summed, key), lr / bsz)
    return step


def _xla_bytes(compiled):
    mem = compiled.memory_analysis()
    return None if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                        + mem.output_size_in_bytes)


def make_jax(row, a, bsz):
    import jax

    from jaxdp import ghost

    params, batch, loss, trainable = _jax_problem(row, a, bsz)
    plan = None
    if "nonprivate" not in row and row.startswith(("jaxdp", "wrn", "vit")):
        method = "ghost" if "_ghost_" in row else "auto"
        if trainable is None:
            kinds = ghost.explain(loss, params, batch, method)
        else:                            # the plan for the trainable leaves only
            kinds = ghost.explain(lambda t, b: loss({"trainable": t, "frozen": params["frozen"]}, b),
                                  params["trainable"], batch, method)
        plan = plan_counts(kinds)
    step = _jax_step(row, loss, trainable, bsz)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(params, batch, key).compile()
    compile_s = time.perf_counter() - t0
    xla = _xla_bytes(compiled)
    fit = {}
    b2 = a.fit_batch2
    if b2 and b2 != bsz and xla is not None:
        # XLA's peak is affine in the batch size: peak(B) = c + m B; two compiles give c and m, and the largest B
        # with peak(B) <= 16 GiB is extrapolated (not run).
        p2, bt2, loss2, tr2 = _jax_problem(row, a, b2)
        x2 = _xla_bytes(_jax_step(row, loss2, tr2, b2).lower(p2, bt2, key).compile())
        if x2 is not None and x2 != xla:
            m = (xla - x2) / (bsz - b2)
            c = xla - m * bsz
            fit = dict(fit_16gb_batch=int((GIB16 - c) // m) if m > 0 else None, xla_peak_mb_batch2=x2 / 2 ** 20,
                       batch2=b2)
    state = [params]

    def run():
        state[0] = compiled(state[0], batch, key)
        jax.block_until_ready(state[0])

    n = params["trainable"] if trainable is not None else params
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(n))
    return run, dict(compile_s=compile_s, xla_peak_mb=None if xla is None else xla / 2 ** 20, plan=plan,
                     n_params=n_params, device=str(jax.devices()[0].device_kind), **fit)


def make_torch(row, a, data):
    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # Opacus ghost clipping refuses tied parameters ("Parameter tying is not supported"), so its row unties
    # lm_head from wte: vocab x d_model more parameters (reported in n_params), otherwise the same model.
    model = GPT2LMHeadModel(HFConfig(vocab_size=a.vocab, n_positions=max(a.seq_len, 128), n_embd=a.d_model,
                                     n_layer=a.layers, n_head=a.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, tie_word_embeddings=row != "opacus_ghost")).to(dev)
    model.train()
    x = torch.tensor(data, dtype=torch.long, device=dev)
    # Explicit per-example position ids [B, T] (contiguous): by default GPT-2 broadcasts a [1, T] position tensor,
    # which gives wpe a per-sample gradient of batch 1 and breaks Opacus's per-sample norms ("stack expects each
    # tensor to be equal size, but got [8] ... and [1]"); a broadcast (expand) view breaks its embedding norm.
    pos = torch.arange(x.shape[1], device=dev).repeat(x.shape[0], 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def per_seq(logits):
        logits = logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="none").view(x.shape[0], -1).mean(dim=1)

    if row == "opacus_hooks":
        from opacus import PrivacyEngine
        engine = PrivacyEngine(accountant="prv")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu()), batch_size=x.shape[0])
        model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                            max_grad_norm=1.0, poisson_sampling=False)

        def run():
            opt.zero_grad(set_to_none=True)
            per_seq(model(input_ids=x, position_ids=pos).logits).mean().backward()
            opt.step()
    elif row == "opacus_ghost":
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu()), batch_size=x.shape[0])
        model, opt, crit, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                  criterion=torch.nn.CrossEntropyLoss(reduction="mean"),
                                                  noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                                  grad_sample_mode="ghost")

        def run():
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=x, position_ids=pos).logits[:, :-1]
            # shape=[B, T-1, V] makes Opacus reduce the per-token losses to one mean loss per sequence (the
            # privacy unit); without it each token would be clipped as if it were an example.
            loss = crit(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), shape=logits.shape)
            loss.backward()
            opt.step()
    else:
        def run():
            opt.zero_grad(set_to_none=True)
            per_seq(model(input_ids=x, position_ids=pos).logits).mean().backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()

    t0 = time.perf_counter()
    run()
    return run, dict(compile_s=time.perf_counter() - t0, xla_peak_mb=None, plan=None, device=dev,
                     n_params=sum(p.numel() for p in model.parameters()))


def child(row, a) -> None:
    try:
        if row.startswith(("torch", "opacus")):
            run, info = make_torch(row, a, np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq_len)))
        else:
            run, info = make_jax(row, a, a.vision_batch if row.startswith(("wrn", "vit")) else a.batch)
        run()                                  # warm-up
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        info.update(median_s=statistics.median(times), times_s=[round(t, 4) for t in times])
    except Exception as e:                     # recorded, not hidden: the row says why it has no numbers
        info = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    info["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("ROW " + json.dumps(info))


def _versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "processor": platform.processor() or platform.platform()}
    from importlib import metadata
    for mod in ("jax", "jaxlib", "flax", "torch", "opacus", "transformers", "jax-privacy"):
        try:
            out[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            out[mod] = None
    try:
        out["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return out


def table(res) -> str:
    rows = res["rows"]
    opacus = [v["median_s"] for r, v in rows.items() if r.startswith("opacus") and "median_s" in v]
    jp = rows.get("jaxprivacy_loop", {}).get("median_s")
    lines = ["| row | median s | DP/non-private | / Opacus best | / jax-privacy | compile s | XLA peak MB | "
             "peak RSS MB | fits 16 GB (batch, extrap.) | params | plan |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"
    for r, v in rows.items():
        if "error" in v:
            lines.append(f"| {r} | failed: {v['error'][:90]} | | | | | | | | | |")
            continue
        base = rows.get(_base(r), {}).get("median_s")
        ratio = v["median_s"] / base if base else None
        full = r.endswith(("_loop", "_scan")) or r.startswith(("torch", "opacus"))   # full GPT-2 fine-tuning
        vs_op = v["median_s"] / min(opacus) if opacus and full and "nonprivate" not in r else None
        vs_jp = v["median_s"] / jp if jp and r.startswith("jaxdp") and full else None
        plan = ", ".join(f"{k} {n}" for k, n in sorted((v.get("plan") or {}).items())) or "-"
        fit = v.get("fit_16gb_batch")
        lines.append(f"| {r} | {f(v['median_s'], 3)} | {f(ratio)} | {f(vs_op)} | {f(vs_jp)} | "
                     f"{f(v.get('compile_s'), 1)} | {f(v.get('xla_peak_mb'), 0)} | {f(v.get('rss_peak_mb'), 0)} | "
                     f"{'-' if fit is None else fit} | {v.get('n_params', '-')} | {plan} |")
    return "\n".join(lines)


def plot(res, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {r: v for r, v in res["rows"].items() if "median_s" in v}
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    names = list(rows)
    ax[0].barh(names, [rows[r]["median_s"] for r in names])
    ax[0].set_xlabel("median step time (s)")
    ax[1].barh(names, [rows[r].get("xla_peak_mb") or 0 for r in names])
    ax[1].set_xlabel("XLA peak memory (MB; JAX rows)")
    c = res["config"]
    vision = (f"; WRN/ViT: batch {c.get('vision_batch')}, 32x32x3" if any(r.startswith(("wrn", "vit")) for r in rows)
              else "")
    fig.suptitle(f"GPT-2 {c['layers']}x{c['d_model']}, vocab {c['vocab']}, batch {c['batch']}, seq {c['seq_len']}"
                 f"{vision} ({res['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def model_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The GPT-2 size, batch, sequence length and timed steps options (shared with ghost_tolerance.py)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=steps)


def plan_counts(kinds: dict) -> dict:
    """``jaxdp.ghost.explain``'s per-leaf paths as counts per path."""
    out: dict = {}
    for v in kinds.values():
        out[v] = out.get(v, 0) + 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="gpt2: the real GPT-2 124M config (random init)")
    model_args(p, steps=3)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--vision-batch", type=int, default=64, help="batch of the WRN-16-4 / ViT-Tiny rows")
    p.add_argument("--fit-batch2", type=int, default=0,
                   help="also compile JAX rows at this batch and extrapolate the largest batch within 16 GiB")
    p.add_argument("--torch-threads", type=int, default=0)
    p.add_argument("--require-gpu", action="store_true", help="fail unless JAX sees a GPU (make bench-gpu)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    p.add_argument("--json", help="write the results here (plus .txt table and .png plot next to it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.preset:
        for k, val in PRESETS[a.preset].items():
            setattr(a, k, val)
    if a.child:
        child(a.child, a)
        return
    # The parent does not import JAX: a child's peak RSS (ru_maxrss) starts from its parent's at fork.
    device = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                             "print(f'{d.platform}: {d.device_kind}')"], capture_output=True, text=True
                            ).stdout.strip() or "unknown"
    if a.require_gpu and not device.startswith("gpu"):
        sys.exit(f"--require-gpu: JAX sees {device}, not a GPU (set JAX_PLATFORMS=cuda on a GPU machine)")
    config = dict(layers=a.layers, d_model=a.d_model, heads=a.heads, vocab=a.vocab, batch=a.batch,
                  seq_len=a.seq_len, steps=a.steps, preset=a.preset, vision_batch=a.vision_batch,
                  fit_batch2=a.fit_batch2)
    res: dict[str, Any] = {"config": config,
           "command": "python " + " ".join(sys.argv), "device": device, "versions": _versions(),
           "loadavg_start": os.getloadavg(), "rows": {}}
    argv = [a for a in sys.argv[1:]]
    for r in [r for r in a.rows.split(",") if r]:
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, __file__, *argv, "--child", r], capture_output=True, text=True,
                                 timeout=a.timeout)
            line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
            v: dict[str, Any] = (json.loads(line[-1][4:]) if line
                                 else {"error": f"exit {out.returncode}: {out.stderr[-300:]}"})
        except subprocess.TimeoutExpired:
            v = {"error": f"timed out after {a.timeout:.0f} s"}
        v["wall_s"] = time.perf_counter() - t0
        res["rows"][r] = v
        print(r, json.dumps({k: x for k, x in v.items() if k != "times_s"}), flush=True)
    res["loadavg_end"] = os.getloadavg()
    print(table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.splitext(a.json)[0] + ".txt", "w") as f:
            f.write(table(res) + "\n")
        try:
            plot(res, os.path.splitext(a.json)[0] + ".png")
        except ImportError as e:
            print(f"no plot: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
