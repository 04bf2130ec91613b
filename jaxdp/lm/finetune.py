"""Differentially private (and non-private) fine-tuning of the GPT-2 in :mod:`jaxdp.lm.model`.

Privacy unit: one sequence (one row of ``tokens``). Its loss is the mean next-token negative log-likelihood
over its real (unpadded) positions,

    loss_i = sum_t m_{i,t+1} * -log p(x_{i,t+1} | x_{i,<=t}) / max(1, sum_t m_{i,t+1}),

and no operation mixes sequences, so per-example clipping bounds each sequence's influence.

The model is split with NNX filters into ``params = {"trainable": State, "frozen": State}``; only the
``"trainable"`` part is differentiated per example (``jaxdp.clipped_grad(..., trainable=TRAINABLE)``), clipped,
and noised (``jaxdp.add_noise(..., trainable=TRAINABLE)``); frozen weights get no gradient, no noise and no
optimizer state, and stay bit-for-bit unchanged. ``method="auto"`` uses ghost norms for the dense layers when
:mod:`jaxdp.ghost` is present and otherwise per-example gradients by ``vmap``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp
from jaxdp.lm.model import GPT2

__all__ = ["TRAINABLE", "split_trainable", "merge_model", "sequence_nll", "make_loss_fn", "FinetuneResult",
           "finetune", "make_dp_step", "make_nonprivate_step"]

TRAINABLE = {"trainable": True, "frozen": False}
"""The ``trainable`` prefix mask for params built by :func:`split_trainable`."""


def split_trainable(model: GPT2, trainable: Any = nnx.Param) -> tuple[nnx.GraphDef, dict]:
    """Split ``model`` into ``graphdef`` and ``{"trainable": State, "frozen": State}`` with an NNX filter.

    ``trainable``: an NNX filter -- ``nnx.LoRAParam`` (:data:`jaxdp.lm.lora.lora_filter`) for LoRA,
    :func:`jaxdp.lm.lora.last_k_filter` for the last k blocks, ``nnx.Param`` for everything.
    """
    graphdef, train, *rest = nnx.split(model, trainable, ...)   # two filters: exactly one state after train
    frozen = rest[0]
    if not jax.tree_util.tree_leaves(train):
        raise ValueError("the `trainable` filter selects no parameters (did you forget apply_lora?)")
    return graphdef, {"trainable": train, "frozen": frozen}


def merge_model(graphdef: nnx.GraphDef, params: dict) -> GPT2:
    """Rebuild the NNX model from :func:`split_trainable`'s output."""
    return nnx.merge(graphdef, params["trainable"], params["frozen"])


def sequence_nll(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sequence mean next-token NLL (nats): ``logits [B, T, V]`` at t predict ``tokens[:, t+1]``;
    ``mask [B, T]`` True on real tokens. Returns ``[B]``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(nll.dtype)
    return jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[dict, dict], jax.Array]:
    """Pure ``loss_fn(params, batch) -> [B]`` with ``batch = {"tokens": int [B, T], "mask": bool [B, T]}``."""

    def loss_fn(params, batch):
        model = merge_model(graphdef, params)
        return sequence_nll(model(batch["tokens"]), batch["tokens"], batch["mask"])

    return loss_fn


def make_dp_step(graphdef, *, l2_clip_norm: float, noise_multiplier: float, expected_batch_size: float,
                 learning_rate: float, key: jax.Array, method: str = "auto",
                 optimizer: Callable[[float], optax.GradientTransformation] = optax.adam):
    """DP step: ``(params, opt_state, batch, mask) -> (params, opt_state, stats)`` and its optimizer.

    ``summed = clipped_grad(loss, C, method, trainable=TRAINABLE)`` (sum of clipped per-sequence gradients of
    the trainable leaves), then ``add_noise`` (std ``sigma C`` on trainable leaves only, divided by the public
    expected batch size), then the optimizer on the trainable leaves only.
    """
    loss_fn = make_loss_fn(graphdef)
    grad_fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm, method=method, trainable=TRAINABLE)
    tx = optax.chain(
        jaxdp.add_noise(noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                        expected_batch_size=expected_batch_size, key=key, trainable=TRAINABLE),
        optax.masked(optimizer(learning_rate), TRAINABLE))

    @jax.jit
    def step(params, opt_state, batch, mask):
        summed, stats = grad_fn(params, batch, mask)
        updates, opt_state = tx.update(summed, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    return step, tx


def make_nonprivate_step(graphdef, *, learning_rate: float,
                         optimizer: Callable[[float], optax.GradientTransformation] = optax.adam):
    """Non-private step on the mean loss of the real sequences (same trainable split, no clipping/noise)."""
    loss_fn = make_loss_fn(graphdef)
    tx = optimizer(learning_rate)

    def mean_loss(train, frozen, batch, mask):
        losses = loss_fn({"trainable": train, "frozen": frozen}, batch)
        m = mask.astype(losses.dtype)
        return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0), losses

    @jax.jit
    def step(params, opt_state, batch, mask):
        (loss, losses), g = jax.value_and_grad(mean_loss, has_aux=True)(
            params["trainable"], params["frozen"], batch, mask)
        updates, opt_state = tx.update(g, opt_state, params["trainable"])
        new = {"trainable": optax.apply_updates(params["trainable"], updates), "frozen": params["frozen"]}
        return new, opt_state, losses

    return step, tx


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model, the per-step mean training loss, and the privacy
    parameters (``noise_multiplier`` None for non-private training)."""

    model: GPT2
    losses: list
    steps: int
    sample_rate: float
    noise_multiplier: float | None
    l2_clip_norm: float | None
    sampling: str
    seconds: float


def finetune(model: GPT2, tokens: np.ndarray, mask: np.ndarray, *, steps: int, learning_rate: float,
             seed: int, trainable: Any = nnx.Param, batch_size: int = 32, private: bool = True,
             noise_multiplier: float | None = None, l2_clip_norm: float = 1.0, key: jax.Array | None = None,
             method: str = "auto", pad_to_multiple: int | None = None, log_every: int = 0,
             optimizer: Callable[[float], optax.GradientTransformation] = optax.adam, ledger: Any = None,
             dataset_id: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
             reserve: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` on ``tokens [N, T]`` / ``mask [N, T]`` (see :func:`jaxdp.lm.tokenizer.encode_batch`).

    Private (``private=True``): Poisson sampling with rate ``q = batch_size / N`` (seeded by ``seed``), per-
    sequence clipping to ``l2_clip_norm``, Gaussian noise ``noise_multiplier * l2_clip_norm`` (``key`` required),
    normalised by ``q N``. Account ``steps`` steps at rate ``q`` with ``noise_multiplier`` (e.g.
    ``jaxdp.accounting.compute_epsilon``). Non-private: shuffled batches of ``batch_size``, mean loss.
    Only parameters selected by the ``trainable`` NNX filter change. Returns a :class:`FinetuneResult` whose
    ``model`` is a new model object (the input ``model`` is not modified).

    Privacy ledger (``ledger``, default ``$JAXDP_LEDGER``; with ``dataset_id``, ``run_id`` and, when the model
    was fine-tuned from a run on protected data, ``parent_run_id``): the run goes through the ledger gate
    (:class:`jaxdp.ledger.gate.LedgerGate`). It is refused on protected data without a reservation (and always
    when non-private); ``reserve=True`` reserves the ``steps`` steps; it never steps beyond its reservation
    (:class:`jaxdp.PrivacyBudgetExhausted`, after committing the steps taken), and it commits the steps taken
    when it ends.

    Raises:
      ReservationRequiredError: protected data and no reservation (or a non-private run on protected data).
      PrivacyBudgetExhausted: the reservation covers fewer than ``steps`` steps.
    """
    N = int(tokens.shape[0])
    if tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must have the same shape [N, T]")
    graphdef, params = split_trainable(model, trainable)
    params = jax.tree_util.tree_map(jnp.array, params)  # own copy: the input model stays as it was
    tokens_j, mask_j = jnp.asarray(tokens), jnp.asarray(mask)
    if private:
        if noise_multiplier is None:
            raise ValueError("private=True needs noise_multiplier (calibrate it with jaxdp.accounting)")
        if key is None:
            raise ValueError("private=True needs a PRNG `key` for the noise (no default key)")
        sampler: jaxdp.PoissonSampler | jaxdp.ShuffleSampler = jaxdp.PoissonSampler(
            N, batch_size / N, seed, pad_to_multiple=pad_to_multiple)
        step, tx = make_dp_step(graphdef, l2_clip_norm=l2_clip_norm, noise_multiplier=noise_multiplier,
                                expected_batch_size=sampler.expected_batch_size, learning_rate=learning_rate,
                                key=key, method=method, optimizer=optimizer)
        opt_state = tx.init(params)
    else:
        sampler = jaxdp.ShuffleSampler(N, batch_size, seed)
        step, tx = make_nonprivate_step(graphdef, learning_rate=learning_rate, optimizer=optimizer)
        opt_state = tx.init(params["trainable"])
    gate = _open_gate(ledger, dataset_id, run_id, parent_run_id, reserve, private, steps, noise_multiplier,
                      batch_size / N, l2_clip_norm)
    losses = []
    t0 = time.perf_counter()
    try:
        for s in range(steps):
            refusal = None if gate is None else gate.refusal(s)
            if refusal is not None:
                raise jaxdp.PrivacyBudgetExhausted(f"stopping: {refusal}")
            idx, m = sampler.sample(s)
            batch = {"tokens": tokens_j[idx], "mask": mask_j[idx]}
            params, opt_state, out = step(params, opt_state, batch, jnp.asarray(m))
            losses.append(float(jnp.sum(jnp.where(m, out.per_example_losses if private else out, 0.0))
                                / max(1, int(m.sum()))))
            if log_every and (s % log_every == 0 or s == steps - 1):
                print(f"  step {s:5d}  loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    finally:  # the data were touched: the steps taken are committed however the loop ends
        if gate is not None:
            gate.commit(len(losses))
    return FinetuneResult(
        model=merge_model(graphdef, params), losses=losses, steps=steps,
        sample_rate=batch_size / N, noise_multiplier=noise_multiplier if private else None,
        l2_clip_norm=l2_clip_norm if private else None,
        sampling=sampler.sampling, seconds=time.perf_counter() - t0)


def _open_gate(ledger, dataset_id, run_id, parent_run_id, reserve, private, steps, sigma, q, clip):
    """The run's ledger gate (None without a ledger): Poisson DP-SGD events, or non-private ones."""
    from jaxdp.ledger.gate import LedgerGate

    def events(n: int) -> list[dict]:
        if not private:
            return [{"sampling": "none", "steps": int(n)}]
        return [{"sampling": "poisson", "noise_multiplier": float(sigma), "sample_rate": float(q), "steps": int(n),
                 "l2_clip_norm": float(clip)}]

    return LedgerGate.open(ledger, dataset_id=dataset_id, run_id=run_id, events=events, private=private,
                           planned_steps=steps, parent_run_id=parent_run_id, reserve=reserve)
