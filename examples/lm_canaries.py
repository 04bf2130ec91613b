"""The Secret Sharer on a tiny GPT-2: canary exposure without DP and with DP-LoRA at epsilon = 8.

1. Generate a small templated corpus (no downloads): a public one for pre-training, a private one for
   fine-tuning into which random canaries "my account number is ____-_" are inserted 1, 4 and 16 times
   (3 different canaries for each count).
2. Pre-train a tiny GPT-2 (byte-level, 2 layers, d = 64) on the public corpus (non-private).
3. Fine-tune LoRA adapters on the private corpus twice: non-private, and DP (Poisson sampling, per-sequence
   clipping, noise calibrated to epsilon = 8 at delta = 1e-5 with the PRV accountant).
4. For every canary (and 3 that were never inserted) compute the exact exposure
   ``log2 |R| - log2 rank`` over all |R| = 10^5 candidates, and the paper's skew-normal extrapolation.

    PYTHONPATH=. python examples/lm_canaries.py            # a few minutes on a 2-core CPU
    PYTHONPATH=. python examples/lm_canaries.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import jax
import numpy as np
from flax import nnx

from jaxdp.lm import (GPT2, GPT2Config, ByteTokenizer, CanaryFormat, all_candidate_scores, apply_lora,
                      encode_batch, exposure, extrapolated_exposure, finetune, lora_filter, merge_lora,
                      sample_candidate_scores)

SUBJECTS = ["the cat", "a dog", "my sister", "the old man", "our teacher", "the baker", "a small bird",
            "the pilot", "my neighbour", "the doctor", "a young girl", "the farmer"]
VERBS = ["likes", "sees", "paints", "finds", "watches", "visits", "carries", "follows", "draws", "feeds"]
OBJECTS = ["the red ball", "a green tree", "the river", "a blue car", "the garden", "an apple", "the moon",
           "a wooden box", "the market", "a yellow kite", "the bridge", "a paper boat"]
TIMES = ["today", "every day", "on monday", "at night", "in may", "after lunch", "before dinner", "again"]


def make_corpus(n: int, rng: np.random.Generator, fmt: CanaryFormat, n_numbers: int = 0) -> list[str]:
    """``n`` templated sentences; ``n_numbers`` of them state a fresh random account number (so the model
    learns the format, but no particular number)."""
    out = []
    for _ in range(n):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."
        out.append(s)
    for _ in range(n_numbers):
        out.append(fmt.fill(fmt.random_secret(rng)))
    rng.shuffle(out)
    return out


def run(*, seed: int = 0, n_private: int = 1000, repeats=(1, 4, 16), per_group: int = 3, pretrain_steps: int = 200,
        epochs: float = 24.0, batch_size: int = 64, target_epsilon: float = 8.0, delta: float = 1e-5,
        lora_rank: int = 8, d_model: int = 64, n_layer: int = 2, lr_pre: float = 3e-3,
        lr_ft: float = 1e-2, lr_dp: float = 3e-3, clip: float = 1.0, verbose: bool = True) -> dict:
    from jaxdp.accounting import calibrate_noise_multiplier, compute_epsilon

    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    tok = ByteTokenizer()
    fmt = CanaryFormat("my account number is ", "____-_")
    max_len = 48

    # --- data -----------------------------------------------------------------------------------------
    public = make_corpus(3000, rng, fmt, n_numbers=300)
    private = make_corpus(n_private, rng, fmt)
    canaries = {r: [fmt.random_secret(rng) for _ in range(per_group)] for r in repeats}
    never = [fmt.random_secret(rng) for _ in range(per_group)]
    for r, secrets in canaries.items():
        for secret in secrets:
            private += [fmt.fill(secret)] * r
    rng.shuffle(private)
    pub_tok, pub_mask = encode_batch(tok, public, max_len)
    prv_tok, prv_mask = encode_batch(tok, private, max_len)
    N = len(private)

    def log(msg):
        if verbose:
            print(msg, flush=True)

    # --- pre-training (public data, non-private, all weights) -------------------------------------------
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=max_len, n_embd=d_model, n_layer=n_layer,
                     n_head=4)
    base = GPT2(cfg, rngs=nnx.Rngs(seed))
    log(f"pre-training {n_layer}x{d_model} GPT-2 on {len(public)} public sentences, {pretrain_steps} steps")
    pre = finetune(base, pub_tok, pub_mask, steps=pretrain_steps, learning_rate=lr_pre, seed=seed + 1,
                   batch_size=64, private=False, log_every=max(1, pretrain_steps // 3) if verbose else 0)
    base = pre.model

    # --- fine-tuning: LoRA, non-private and DP ----------------------------------------------------------
    q = batch_size / N
    steps = math.ceil(epochs / q)
    sigma = calibrate_noise_multiplier(target_epsilon, delta, q, steps=steps, accountant="prv")
    eps = compute_epsilon(sigma, q, steps, delta, accountant="prv")
    log(f"private corpus: {N} sequences ({per_group * sum(repeats)} canary copies); {steps} steps, q = {q:.4f}, "
        f"sigma = {sigma:.3f} -> epsilon = {eps:.3f} at delta = {delta}")

    def lora_model():
        m = nnx.clone(base)
        return apply_lora(m, lora_rank, 2.0 * lora_rank, ("c_attn", "c_proj", "mlp.c_fc"),
                          rngs=nnx.Rngs(seed + 7))

    models = {"pretrained": base}
    log("non-private LoRA fine-tuning")
    nonpriv = finetune(lora_model(), prv_tok, prv_mask, steps=steps, learning_rate=lr_ft, seed=seed + 2,
                       trainable=lora_filter, batch_size=batch_size, private=False,
                       log_every=max(1, steps // 3) if verbose else 0)
    models["non-private LoRA"] = merge_lora(nonpriv.model)
    log(f"DP LoRA fine-tuning (epsilon = {eps:.2f})")
    dp = finetune(lora_model(), prv_tok, prv_mask, steps=steps, learning_rate=lr_dp, seed=seed + 3,
                  trainable=lora_filter, batch_size=batch_size, private=True, noise_multiplier=sigma,
                  l2_clip_norm=clip, key=jax.random.key(seed + 4), pad_to_multiple=32,
                  log_every=max(1, steps // 3) if verbose else 0)
    models[f"DP LoRA (eps={target_epsilon:g})"] = merge_lora(dp.model)

    # --- exposure ---------------------------------------------------------------------------------------
    srng = np.random.default_rng(seed + 99)
    sample = [fmt.random_secret(srng) for _ in range(2000)]
    results = {}
    for name, model in models.items():
        scores = all_candidate_scores(model, tok, fmt, batch_size=1000)
        sampled = sample_candidate_scores(model, tok, fmt, sample, batch_size=1000)
        row = {}
        groups = [*((f"inserted x{r}", s) for r, s in canaries.items()), ("never inserted", never)]
        for label, secrets in groups:
            sc = [float(scores[fmt.index(s)]) for s in secrets]
            exact = [exposure(v, scores) for v in sc]
            extra = [extrapolated_exposure(v, sampled) for v in sc]
            row[label] = {"exposure": float(np.mean(exact)), "extrapolated": float(np.mean(extra)),
                          "per_canary_exposure": exact, "per_canary_extrapolated": extra,
                          "log_perplexity_bits": sc}
        results[name] = row
    out = {
        "config": dict(seed=seed, n_private=N, repeats=list(repeats), canary_format=fmt.prefix + fmt.pattern,
                       space_size=fmt.space_size, max_exposure=math.log2(fmt.space_size), model=cfg.to_dict(),
                       lora_rank=lora_rank, steps=steps, sample_rate=q, noise_multiplier=sigma,
                       l2_clip_norm=clip, epsilon=eps, delta=delta, accountant="prv", epochs=epochs),
        "final_train_loss": {"pretrain": float(np.mean(pre.losses[-10:])),
                             "non-private LoRA": float(np.mean(nonpriv.losses[-10:])),
                             "DP LoRA": float(np.mean(dp.losses[-10:]))},
        "exposure": results,
        "seconds": time.perf_counter() - t_start,
    }
    if verbose:
        labels = list(next(iter(results.values())).keys())
        print(f"\nexposure in bits (exact rank over |R| = {fmt.space_size}; max {math.log2(fmt.space_size):.1f};"
              " skew-normal extrapolation in brackets;"
              f" mean over {per_group} canaries per row)")
        print(f"{'model':24s}" + "".join(f"{lab:>22s}" for lab in labels))
        for name, row in results.items():
            print(f"{name:24s}" + "".join(
                f"{row[lab]['exposure']:>13.2f} [{row[lab]['extrapolated']:5.2f}] " for lab in labels))
        print(f"total {out['seconds']:.0f} s")
    return out


def main() -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)   # dp-accounting's RDP order warnings during calibration
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--epochs", type=float, default=24.0)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--json", help="write the results to this JSON file")
    a = p.parse_args()
    out = run(seed=a.seed, target_epsilon=a.epsilon, epochs=a.epochs, pretrain_steps=a.pretrain_steps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
