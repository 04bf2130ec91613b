"""jaxdp quickstart: DP-SGD on the embedded 8x8 digits, with Flax NNX and with Flax Linen.

    python examples/quickstart.py               # both frameworks, 15 epochs each (~10-20 s on 2 CPU cores)
    python examples/quickstart.py --framework nnx --epochs 5

The recipe is the same in both loops:

1. a loss function of (params, batch) that returns one loss PER EXAMPLE (shape [B], not reduced);
2. ``jaxdp.clipped_grad(loss_fn, l2_clip_norm)``: the SUM over the batch of per-example gradients, each
   clipped to L2 norm <= C (padding examples, mask False, contribute exactly zero);
3. ``optax.chain(jaxdp.add_noise(noise_multiplier=sigma, l2_clip_norm=C, expected_batch_size=E, key=key),
   optax.adam(lr))``: Gaussian noise N(0, (sigma C)^2) is added to the sum once per step, which is then divided
   by the PUBLIC expected batch size E = q N (the arguments are keyword-only: sigma and C cannot be swapped);
4. ``jaxdp.PoissonSampler``: each example joins each batch independently with probability q (what the
   accountant assumes); batches are padded to a few fixed shapes so ``jax.jit`` compiles only a few times.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp

# Privacy and optimisation settings (public): C, sigma, expected batch size, delta.
L2_CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
BATCH_SIZE = 64            # expected batch size E; sample rate q = E / N
LEARNING_RATE = 1e-2
DELTA = 1e-5
HIDDEN = 64


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy, shape [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_dp(loss_fn: Callable, params: Any, predict: Callable, data: jaxdp.data.Dataset, *, epochs: int,
             seed: int, verbose: bool = True, name: str = "") -> tuple[Any, dict]:
    """DP-SGD (clipped_grad + add_noise + adam) with Poisson sampling; returns (params, history)."""
    n = len(data.y_train)
    # Padding to a multiple of 128 gives one shape here (jit compiles once): B ~ Binomial(N, q) has mean 64 and
    # sd 7.8, so P(B > 128) ~ 1e-16. The default pad_to_multiple gives a few shapes and less padding.
    sampler = jaxdp.PoissonSampler(n, BATCH_SIZE / n, seed=seed, pad_to_multiple=128)
    grad_fn = jaxdp.clipped_grad(loss_fn, L2_CLIP_NORM)
    tx = optax.chain(
        jaxdp.add_noise(noise_multiplier=NOISE_MULTIPLIER, l2_clip_norm=L2_CLIP_NORM,
                        expected_batch_size=sampler.expected_batch_size,
                        key=jax.random.key(seed + 1)),     # keep the seed secret in a real deployment
        optax.adam(LEARNING_RATE),
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, mask):
        summed, stats = grad_fn(params, {"x": x, "y": y}, mask)
        updates, opt_state = tx.update(summed, opt_state, params)
        # Mean loss over the real examples (a diagnostic only: it is not privatised, do not publish it).
        loss = jnp.sum(jnp.where(mask, stats.per_example_losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
        return optax.apply_updates(params, updates), opt_state, loss, stats.clip_fraction

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(predict(params, x), axis=-1) == y)

    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    history = {"loss": [], "accuracy": [], "clip_fraction": []}
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        losses, clip = [], []
        for idx, mask in sampler:     # one epoch = ceil(1/q) Poisson steps; empty batches are steps too
            params, opt_state, loss, frac = step(params, opt_state, x_train[idx], y_train[idx], mask)
            losses.append(loss)
            clip.append(frac)
        acc = float(accuracy(params, jnp.asarray(data.x_test), jnp.asarray(data.y_test)))
        history["loss"].append(float(np.mean(losses)))
        history["accuracy"].append(acc)
        history["clip_fraction"].append(float(np.mean(clip)))
        if verbose:
            print(f"[{name}] epoch {epoch:2d}  loss {history['loss'][-1]:.4f}  test accuracy {acc:.3f}  "
                  f"clipped {history['clip_fraction'][-1]:.2f}  ({time.perf_counter() - t0:.1f}s)")
    history["steps"] = sampler.step
    history["sample_rate"] = sampler.sample_rate
    history["epsilon"] = epsilon(sampler.sample_rate, sampler.step)
    if verbose and history["epsilon"] is not None:
        print(f"[{name}] ({history['epsilon']:.2f}, {DELTA})-DP after {sampler.step} steps "
              f"(q = {sampler.sample_rate:.4f}, sigma = {NOISE_MULTIPLIER})")
    return params, history


def epsilon(sample_rate: float, steps: int) -> float | None:
    """Epsilon of the run if :mod:`jaxdp.accounting` is available, else None."""
    try:
        from jaxdp import accounting
    except ImportError:
        return None
    return float(accounting.compute_epsilon(NOISE_MULTIPLIER, sample_rate, steps, DELTA))


# ---------------------------------------------------------------------------------------------------------
# Flax NNX: the model is a Python object; nnx.split / nnx.merge give a pure loss function of its params.


class NNXMLP(nnx.Module):
    def __init__(self, in_features: int, num_classes: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.out(nnx.relu(self.hidden(x)))


def run_nnx(epochs: int = 15, seed: int = 0, verbose: bool = True) -> dict:
    data = jaxdp.data.load_digits()
    model = NNXMLP(int(np.prod(data.input_shape)), data.num_classes, nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def predict(params, x):
        return nnx.merge(graphdef, params)(x)

    def loss_fn(params, batch):          # pure function of params: jaxdp can vmap/grad it per example
        return cross_entropy(predict(params, batch["x"]), batch["y"])

    params, history = train_dp(loss_fn, params, predict, data, epochs=epochs, seed=seed, verbose=verbose,
                               name="nnx")
    nnx.update(model, params)            # write the trained params back into the model object
    return history


# ---------------------------------------------------------------------------------------------------------
# Flax Linen: params are a pytree already; model.apply is the pure function.


class LinenMLP(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(HIDDEN)(x)))


def run_linen(epochs: int = 15, seed: int = 0, verbose: bool = True) -> dict:
    data = jaxdp.data.load_digits()
    model = LinenMLP(data.num_classes)
    params = model.init(jax.random.key(seed), jnp.asarray(data.x_train[:1]))["params"]

    def predict(params, x):
        return model.apply({"params": params}, x)

    def loss_fn(params, batch):
        return cross_entropy(predict(params, batch["x"]), batch["y"])

    _, history = train_dp(loss_fn, params, predict, data, epochs=epochs, seed=seed, verbose=verbose,
                          name="linen")
    return history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=["nnx", "linen", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {}
    if args.framework in ("nnx", "both"):
        results["nnx"] = run_nnx(args.epochs, args.seed)
    if args.framework in ("linen", "both"):
        results["linen"] = run_linen(args.epochs, args.seed)
    return results


if __name__ == "__main__":
    main()
