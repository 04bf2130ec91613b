"""Flax Linen through ``jaxdp.PrivacyEngine``, with dropout.

A Linen module needs its ``variables``; the loss takes ``(params, batch)`` -- or ``(params, batch, rng)`` when
the model is stochastic: the engine then passes each example its own PRNG key (derived from the seed and the
step), to be used as ``rngs={"dropout": rng}``. BatchNorm is refused (``jaxdp.validate`` says how to fix it).

    PYTHONPATH=. python examples/linen_engine.py              # 10 epochs at epsilon 3 on the embedded digits
    PYTHONPATH=. python examples/linen_engine.py --tiny       # 1 epoch on 256 examples (the test)
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxdp
from jaxdp import models


class MLP(nn.Module):
    hidden: int = 128

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = jnp.tanh(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="1 epoch on 256 examples (a smoke test)")
    args = ap.parse_args(argv)
    data = jaxdp.data.load_digits()
    x, y = data.x_train, data.y_train
    if args.tiny:
        x, y, args.epochs = x[:256], y[:256], 1
    module = MLP()
    variables = module.init(jax.random.key(args.seed), jnp.zeros((1, *data.input_shape)), train=False)

    def loss_fn(params, batch, rng):                 # rng: this example's dropout key
        logits = module.apply({"params": params}, batch["x"], rngs={"dropout": rng})
        return models.cross_entropy(logits, batch["y"])

    engine = jaxdp.PrivacyEngine()
    private = engine.make_private_with_epsilon(
        model=module, variables=variables, loss_fn=loss_fn, optimizer=optax.adam(2e-3), dataset_size=len(y),
        batch_size=64, l2_clip_norm=1.0, target_epsilon=args.epsilon, target_delta=1.0 / len(y) ** 1.1,
        epochs=args.epochs, seed=args.seed)
    state = private.init()
    predict = jax.jit(lambda p, xx: module.apply({"params": p}, xx, train=False))
    for epoch in range(args.epochs):
        for batch, mask in private.batches({"x": x, "y": y}):
            state, _ = private.step(state, batch, mask)
        acc = float(jnp.mean(jnp.argmax(predict(state.params, data.x_test), -1) == data.y_test))
        print(f"epoch {epoch + 1:2d}  test acc {acc:.4f}  epsilon {private.get_epsilon():.3f}")
    return {"accuracy": acc, "epsilon": private.get_epsilon(), "steps": private.steps_taken,
            "planned_steps": private.planned_steps, "target_epsilon": args.epsilon}


if __name__ == "__main__":
    main()
