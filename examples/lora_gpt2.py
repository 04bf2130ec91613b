"""DP-LoRA fine-tuning of a GPT-2 language model (``jaxdp.lm``): only the LoRA adapters are trained, each
sequence's gradient is clipped, and Gaussian noise calibrated to a target epsilon is added to the adapters.

By default a tiny GPT-2 is initialised at random and fine-tuned on a small generated corpus (nothing is
downloaded); with ``--checkpoint DIR`` a local Hugging Face GPT-2 directory (``config.json``,
``model.safetensors``, ``tokenizer.json``) is loaded instead.

    PYTHONPATH=. python examples/lora_gpt2.py                       # tiny model, epsilon 8, ~1 min on CPU
    PYTHONPATH=. python examples/lora_gpt2.py --checkpoint ~/gpt2   # your local GPT-2 small
    PYTHONPATH=. python examples/lora_gpt2.py --tiny                # a few steps (the test)
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdp.accounting import calibrate_noise_multiplier, compute_epsilon, steps_for_epochs
from jaxdp.lm import (GPT2, GPT2Config, apply_lora, encode_batch, finetune, load_pretrained, load_tokenizer,
                      lora_filter, make_loss_fn, merge_lora, split_trainable)

WORDS = ["the cat", "a dog", "my sister", "the pilot", "our teacher", "a bird"]
VERBS = ["likes", "sees", "paints", "finds", "visits"]
THINGS = ["the river", "a blue car", "the garden", "an apple", "the moon", "a paper boat"]


def corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(WORDS)} {rng.choice(VERBS)} {rng.choice(THINGS)}." for _ in range(n)]


def mean_loss(model, tokens, mask) -> float:
    graphdef, params = split_trainable(model, lora_filter)
    return float(jnp.mean(make_loss_fn(graphdef)(params, {"tokens": jnp.asarray(tokens),
                                                           "mask": jnp.asarray(mask)})))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="local Hugging Face GPT-2 directory (default: a tiny random GPT-2)")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--seed", type=int, default=0, help="batch selection and noise; keep it secret")
    ap.add_argument("--tiny", action="store_true", help="a few steps on a tiny model (a smoke test)")
    args = ap.parse_args(argv)
    n, batch_size, max_len = (64, 16, 24) if args.tiny else (2000, 64, 32)
    if args.tiny:
        args.epochs = 1.0
    if args.checkpoint:
        model, tok = load_pretrained(args.checkpoint), load_tokenizer(args.checkpoint)
    else:
        tok = load_tokenizer(None)                    # byte-level: vocabulary 257
        size = dict(n_embd=32, n_layer=1, n_head=2) if args.tiny else dict(n_embd=64, n_layer=2, n_head=4)
        model = GPT2(GPT2Config(vocab_size=257, n_positions=64, **size), rngs=nnx.Rngs(args.seed))
    tokens, mask = encode_batch(tok, corpus(n, args.seed), max_len)
    apply_lora(model, rank=args.rank, alpha=2.0 * args.rank, targets=("q", "v"), rngs=nnx.Rngs(args.seed + 1))

    q = batch_size / n
    delta = 1.0 / n ** 1.1
    steps = steps_for_epochs(args.epochs, q)
    sigma = calibrate_noise_multiplier(args.epsilon, delta, q, steps=steps)
    before = mean_loss(model, tokens, mask)
    res = finetune(model, tokens, mask, steps=steps, learning_rate=1e-2, seed=args.seed, trainable=lora_filter,
                   batch_size=batch_size, private=True, noise_multiplier=sigma, l2_clip_norm=1.0,
                   key=jax.random.fold_in(jax.random.key(args.seed), 7))
    eps = compute_epsilon(sigma, q, res.steps, delta)
    after = mean_loss(res.model, tokens, mask)
    merged = merge_lora(res.model)                   # plain GPT-2 again, adapters folded into the weights
    print(f"DP-LoRA: {res.steps} steps, sigma {sigma:.3f}, epsilon {eps:.3f} (delta {delta:.2g}); "
          f"loss {before:.3f} -> {after:.3f}")
    return {"epsilon": eps, "target_epsilon": args.epsilon, "steps": res.steps, "loss_before": before,
            "loss_after": after, "merged": type(merged).__name__}


if __name__ == "__main__":
    main()
