"""DP-LoRA step speed on a tiny GPT-2: jaxdp (DP vs non-private) and Opacus + PEFT (DP vs non-private).

Same model (GPT-2 architecture, byte vocabulary 257, ``--layers`` x ``--d-model``), same LoRA (rank 8,
alpha 16, on the fused ``c_attn``, no dropout), same fixed batch of ``--batch`` sequences of ``--seq-len``
tokens, per-sequence loss = mean token NLL. Rows alternate step by step in one process (docs/privacy.md);
median of ``--steps`` timed steps after 2 warm-up steps; compile time reported separately.

Memory: ``xla_bytes`` = XLA's memory analysis of the compiled JAX step (temp + arguments + outputs);
``rss_step_mb`` = peak of the process's current RSS (``/proc/self/statm``, sampled every ms) during 3 steps
minus the RSS after set-up, measured for each row in a fresh subprocess (the step's buffers, not the
framework; torch's set-up includes one step, so its first-step allocations are partly in the baseline).

    PYTHONPATH=. python benchmarks/lm_lora_speed.py --json benchmarks/results/lm_lora_speed.json
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

import numpy as np

ROWS = ("jax_nonprivate", "jax_dp_vmap", "jax_dp_auto", "jax_dp_ghost", "torch_nonprivate", "opacus_dp")


def _cfg(a):
    return dict(vocab_size=257, n_positions=a.seq_len, n_embd=a.d_model, n_layer=a.layers, n_head=4)


def make_jax(row, a, data):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxdp.lm import GPT2, GPT2Config, apply_lora, lora_filter, make_dp_step, make_nonprivate_step
    from jaxdp.lm import split_trainable

    m = GPT2(GPT2Config(**_cfg(a)), rngs=nnx.Rngs(0))
    apply_lora(m, 8, 16.0, ("c_attn",), rngs=nnx.Rngs(1))
    graphdef, params = split_trainable(m, lora_filter)
    batch = {"tokens": jnp.asarray(data), "mask": jnp.ones(data.shape, bool)}
    mask = jnp.ones((data.shape[0],), bool)
    if row == "jax_nonprivate":
        step, tx = make_nonprivate_step(graphdef, learning_rate=1e-3, optimizer=optax.sgd)
        state = [params, tx.init(params["trainable"])]
    else:
        method = row.split("_")[-1]
        step, tx = make_dp_step(graphdef, l2_clip_norm=1.0, noise_multiplier=1.0,
                                expected_batch_size=data.shape[0], learning_rate=1e-3, key=jax.random.key(0),
                                method=method, optimizer=optax.sgd)
        state = [params, tx.init(params)]
    t0 = time.perf_counter()
    compiled = step.lower(state[0], state[1], batch, mask).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = None if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                             + mem.output_size_in_bytes)

    def run():
        p, o, _ = compiled(state[0], state[1], batch, mask)
        jax.block_until_ready(p)
        state[0], state[1] = p, o

    return run, dict(compile_s=compile_s, xla_bytes=xla_bytes)


def make_torch(row, a, data):
    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    torch.set_num_threads(a.torch_threads or os.cpu_count())
    torch.manual_seed(0)
    c = _cfg(a)
    model = GPT2LMHeadModel(HFConfig(**c, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    try:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0, bias="none"))
        lora_impl = "peft"
    except ImportError:  # hand-written LoRA on c_attn (same math) when peft is missing
        lora_impl = "hand-written"
        for p in model.parameters():
            p.requires_grad_(False)

        class LoRA(torch.nn.Module):
            def __init__(self, base):
                super().__init__()
                self.base = base
                n_in, n_out = base.weight.shape
                self.lora_A = torch.nn.Linear(n_in, 8, bias=False)
                self.lora_B = torch.nn.Linear(8, n_out, bias=False)
                torch.nn.init.zeros_(self.lora_B.weight)

            def forward(self, x):
                return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))

        for blk in model.transformer.h:
            blk.attn.c_attn = LoRA(blk.attn.c_attn)
    model.train()
    x = torch.tensor(data, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)

    def loss_of(m):
        logits = m(input_ids=x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="none").view(x.shape[0], -1)
        return nll.mean(dim=1).mean()     # mean over sequences of the per-sequence mean NLL

    if row == "opacus_dp":
        from opacus import PrivacyEngine
        engine = PrivacyEngine(accountant="prv")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=x.shape[0])
        model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)

    def run():
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        opt.step()

    t0 = time.perf_counter()
    run()
    return run, dict(compile_s=time.perf_counter() - t0, lora_impl=lora_impl)


def make(row, a, data):
    return make_jax(row, a, data) if row.startswith("jax") else make_torch(row, a, data)


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(row, a) -> None:
    """Current RSS sampled every millisecond during 3 steps; report the peak minus the RSS after set-up
    (model built, JAX step compiled; torch's first step in make() excluded by re-measuring after gc)."""
    import gc
    import threading

    data = np.random.default_rng(0).integers(0, 256, (a.batch, a.seq_len))
    run, _ = make(row, a, data)
    gc.collect()
    before = rss_now_mb()
    peak = [before]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_now_mb())
            time.sleep(0.001)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    for _ in range(3):
        run()
    done.set()
    th.join()
    peak[0] = max(peak[0], rss_now_mb())
    print(json.dumps({"rss_step_mb": peak[0] - before, "rss_peak_mb": peak[0],
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads (default: os.cpu_count(), docs/privacy.md; on a shared, loaded machine "
                        "1 avoids OpenMP spin contention that made torch ~10x slower in our runs)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    p.add_argument("--json")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        memory_child(a.memory_child, a)
        return
    rows = [r for r in a.rows.split(",") if r]
    data = np.random.default_rng(0).integers(0, 256, (a.batch, a.seq_len))
    runners, info = {}, {}
    for r in rows:
        try:
            runners[r], info[r] = make(r, a, data)
        except (ImportError, NotImplementedError) as e:   # no torch/peft/opacus, or no jaxdp.ghost
            print(f"skipping {r}: {e}", file=sys.stderr)
    for r in runners:             # warm-up
        for _ in range(2):
            runners[r]()
    times = {r: [] for r in runners}
    for _ in range(a.steps):       # alternate rows step by step
        for r, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[r].append(time.perf_counter() - t0)
    tokens = a.batch * a.seq_len
    results = {}
    for r in runners:
        med = statistics.median(times[r])
        results[r] = dict(median_s=med, tokens_per_s=tokens / med, **info[r])
        if not a.no_memory:
            out = subprocess.run([sys.executable, __file__, "--memory-child", r, "--layers", str(a.layers),
                                  "--d-model", str(a.d_model), "--seq-len", str(a.seq_len),
                                  "--batch", str(a.batch), "--torch-threads", str(a.torch_threads)],
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")})
            try:
                results[r].update(json.loads(out.stdout.strip().splitlines()[-1]))
            except (IndexError, ValueError):
                print(f"memory measurement of {r} failed: {out.stderr[-500:]}", file=sys.stderr)
    ratios = {}
    if "jax_nonprivate" in results:
        for r in ("jax_dp_vmap", "jax_dp_auto", "jax_dp_ghost"):
            if r in results:
                ratios[f"{r}/jax_nonprivate"] = results[r]["median_s"] / results["jax_nonprivate"]["median_s"]
    if "opacus_dp" in results and "torch_nonprivate" in results:
        ratios["opacus_dp/torch_nonprivate"] = (results["opacus_dp"]["median_s"]
                                                / results["torch_nonprivate"]["median_s"])
    if "opacus_dp" in results:
        for r in ("jax_dp_vmap", "jax_dp_auto", "jax_dp_ghost"):
            if r in results:
                ratios[f"{r}/opacus_dp"] = results[r]["median_s"] / results["opacus_dp"]["median_s"]

    import jax
    versions = {"jax": jax.__version__}
    for mod in ("flax", "optax", "torch", "opacus", "peft", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    out = dict(machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                            device_kind=jax.devices()[0].device_kind, backend=jax.default_backend()),
               versions=versions, config=dict(layers=a.layers, d_model=a.d_model, seq_len=a.seq_len,
                                              batch=a.batch, vocab=257, torch_threads=a.torch_threads or os.cpu_count(),
                                              lora_rank=8, lora_alpha=16,
                                              lora_targets=["c_attn"], steps=a.steps),
               results=results, ratios=ratios)
    print(f"{'row':18s} {'median ms':>10s} {'tokens/s':>10s} {'compile s':>10s} {'XLA MB':>8s} {'RSS+ MB':>8s}")
    for r, v in results.items():
        xla = v.get("xla_bytes")
        print(f"{r:18s} {1e3 * v['median_s']:10.2f} {v['tokens_per_s']:10.0f} {v['compile_s']:10.2f} "
              f"{(xla / 2**20 if xla else float('nan')):8.2f} {v.get('rss_step_mb', float('nan')):8.1f}")
    for k, v in ratios.items():
        print(f"{k:34s} {v:.2f}x")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
