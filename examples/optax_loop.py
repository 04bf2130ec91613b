"""DP-SGD from the pieces, in a plain optax loop: ``PoissonSampler`` + ``clipped_grad`` + ``add_noise`` +
``Accountant``, for any pure-JAX model (here logistic regression on the embedded digits).

    summed = sum_i clip_C(grad loss_i)                    jaxdp.clipped_grad (padding examples contribute 0)
    update = adam((summed + N(0, (sigma C)^2 I)) / (q N))  jaxdp.add_noise, chained with any optax optimiser
    accountant.step(sigma, q)                             one Poisson-sampled Gaussian step, empty batches too

    PYTHONPATH=. python examples/optax_loop.py                # 20 epochs, sigma 1.0
    PYTHONPATH=. python examples/optax_loop.py --tiny         # 1 epoch (the test)
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jaxdp
from jaxdp.accounting import Accountant


def loss_fn(params, batch):
    """Per-example losses [B] of a linear classifier."""
    logits = batch["x"].reshape(batch["x"].shape[0], -1) @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    data = jaxdp.data.load_digits()
    n, batch_size, clip, sigma = len(data.y_train), 128, 1.0, args.noise_multiplier
    epochs = 1 if args.tiny else args.epochs
    q = batch_size / n
    delta = 1.0 / n ** 1.1

    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    sampler = jaxdp.PoissonSampler(n, q, seed=args.seed, pad_to_multiple=256)   # one padded shape: one compile
    grad_fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=clip)
    tx = optax.chain(jaxdp.add_noise(noise_multiplier=sigma, l2_clip_norm=clip, expected_batch_size=q * n,
                                     key=jax.random.fold_in(jax.random.key(args.seed), 1)),
                     optax.adam(0.05))
    opt_state = tx.init(params)
    accountant = Accountant("prv")

    @jax.jit
    def step(params, opt_state, batch, mask):
        summed, stats = grad_fn(params, batch, mask)
        updates, opt_state = tx.update(summed, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    for epoch in range(epochs):
        for idx, mask in sampler:                    # one epoch: ceil(k/q) - ceil((k-1)/q) steps
            batch = {"x": data.x_train[idx], "y": data.y_train[idx]}
            params, opt_state, stats = step(params, opt_state, batch, mask)
            accountant.step(sigma, q)
        logits = data.x_test.reshape(len(data.y_test), -1) @ params["w"] + params["b"]
        acc = float(jnp.mean(jnp.argmax(logits, -1) == data.y_test))
        print(f"epoch {epoch + 1:2d}  test acc {acc:.4f}  epsilon {accountant.get_epsilon(delta):.3f}  "
              f"clipped {100 * float(stats.clip_fraction):.0f}%")
    return {"accuracy": acc, "epsilon": accountant.get_epsilon(delta), "steps": accountant.steps,
            "planned_steps": sampler.steps_for_epochs(epochs)}


if __name__ == "__main__":
    main()
