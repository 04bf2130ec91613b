"""A CNN (your own Flax NNX module, with dropout) trained through ``jaxdp.PrivacyEngine`` on images.

The Opacus recipe in JAX: define the model and a per-example loss, let ``make_private_with_epsilon`` calibrate
the noise for a target epsilon over the planned epochs, then loop over epochs of Poisson batches. An epoch of
``private.batches`` is the epoch the plan counts, so the loop ends exactly at the planned steps, within the
target. Data: the embedded 8x8 digits (``jaxdp.data.load_digits``); for your own images use
``jaxdp.data.load_npz`` (uint8 images are scaled to [0, 1]; float images must already be) or ``load_idx``.

    PYTHONPATH=. python examples/cnn_images.py                # 15 epochs at epsilon 3 (~1 min on 2 CPU cores)
    PYTHONPATH=. python examples/cnn_images.py --tiny         # 1 epoch on 256 examples (the test)
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp
from jaxdp import models


class DigitCNN(nnx.Module):
    """conv 16 3x3 -> maxpool -> conv 32 3x3 -> maxpool -> dropout -> dense 10. No BatchNorm (it mixes examples;
    ``jaxdp.fix`` would replace it by GroupNorm). Dropout gets a key per example from the engine."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), padding="SAME", rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(2 * 2 * 32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jnp.tanh(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.max_pool(jnp.tanh(self.conv2(x)), (2, 2), strides=(2, 2))
        return self.head(self.drop(x.reshape(x.shape[0], -1)))


def loss_fn(model, batch):
    """One loss PER EXAMPLE, shape [B] (clipping needs each example's gradient): no mean."""
    return models.cross_entropy(model(batch["x"]), batch["y"])


def accuracy(model, x, y) -> float:
    model.eval()                                     # dropout off for evaluation
    return float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == jnp.asarray(y)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0, help="batch selection, noise, dropout; keep it secret")
    ap.add_argument("--tiny", action="store_true", help="1 epoch on 256 examples (a smoke test)")
    args = ap.parse_args(argv)
    data = jaxdp.data.load_digits()
    x, y = data.x_train, data.y_train
    if args.tiny:
        x, y, args.epochs = x[:256], y[:256], 1
    n = len(y)
    delta = 1.0 / n ** 1.1                           # delta < 1/N, as the guarantee needs

    engine = jaxdp.PrivacyEngine(accountant="prv")
    private = engine.make_private_with_epsilon(
        model=DigitCNN(rngs=nnx.Rngs(args.seed)), loss_fn=loss_fn, optimizer=optax.adam(2e-3),
        dataset_size=n, batch_size=64, l2_clip_norm=1.0, target_epsilon=args.epsilon, target_delta=delta,
        epochs=args.epochs, seed=args.seed)
    print(f"noise multiplier {private.noise_multiplier:.3f} for epsilon {args.epsilon} over {args.epochs} epochs "
          f"({private.planned_steps} steps, delta {delta:.2g})")
    state = private.init()
    for epoch in range(args.epochs):
        for batch, mask in private.batches({"x": x, "y": y}):
            state, stats = private.step(state, batch, mask)
        acc = accuracy(private.model(state), data.x_test, data.y_test)
        print(f"epoch {epoch + 1:2d}  test acc {acc:.4f}  epsilon {private.get_epsilon():.3f}  "
              f"clipped {100 * float(stats.clip_fraction):.0f}%")
    return {"accuracy": acc, "epsilon": private.get_epsilon(), "steps": private.steps_taken,
            "planned_steps": private.planned_steps, "target_epsilon": args.epsilon}


if __name__ == "__main__":
    main()
