"""A small pure-JAX trainer for audits: many models at once with ``jax.vmap``.

Audits need many trainings of the same recipe on different data subsets (shadow models for LiRA; canary
inclusion for the one-run audit). :func:`make_train_fn` builds ONE pure function

    train(params0, include_mask, key) -> params

that trains an MLP (or logistic regression) on a fixed pool of examples ``(x, y)``, using only the examples with
``include_mask == True``. It is a pure function of arrays, so ``jax.vmap`` over ``(params0, include_mask, key)``
trains dozens of models in one compiled program (:func:`train_models`).

Batches are Poisson-sampled inside JAX: at step ``t`` each included example joins the batch independently with
probability ``q`` (``jax.random.bernoulli`` on the full pool, a fixed shape) -- the same distribution as
:class:`jaxdp.PoissonSampler`, which the accountant assumes. With ``dp=True`` the step is DP-SGD built from the
library's own pieces: :func:`jaxdp.clipped_grad` (sum of clipped per-example gradients), :func:`jaxdp.add_noise`
(Gaussian noise of std ``noise_multiplier * C`` once per step, division by the public ``E = q * N``), then an
optax optimiser. With ``dp=False`` it is plain minibatch training (no clipping, no noise).

Gradient canaries (white-box one-run audit): an example ``j`` with ``canary_coord[j] = k >= 0`` has loss
``-canary_scale * theta_k`` instead of a cross-entropy, i.e. its gradient is a Dirac ``-canary_scale * e_k`` on
the flat parameter vector. It goes through the same clipping and noise as every other example.

``clip=False`` (with ``dp=True``) is a deliberately broken recipe -- noise but no clipping -- used to test that
the audits catch missing clipping; never train a model you release with it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import jaxdp

PyTree = Any

__all__ = ["ShadowConfig", "init_params", "apply_model", "per_example_loss", "make_train_fn", "train_models",
           "logit_confidence", "per_example_losses", "balanced_masks", "batch_capacity"]


@dataclasses.dataclass(frozen=True)
class ShadowConfig:
    """Training recipe of the audit trainer (hashable: it is a static argument of the compiled program).

    Attributes:
      model: ``"mlp"`` or ``"logreg"`` (logistic regression = an MLP without hidden layers).
      hidden: hidden layer widths of the MLP (tanh activations).
      num_classes: number of labels.
      steps: optimisation steps ``T``.
      learning_rate: optimiser step size.
      optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
      momentum: SGD momentum (None = plain SGD).
      sample_rate: Poisson rate ``q`` (1.0 = full batch every step).
      expected_dataset_size: ``N`` used for the public normaliser ``E = q * N`` (the expected number of
        included examples; a public constant, never the realised count).
      dp: DP-SGD (clip + noise) if True, plain training if False.
      l2_clip_norm: ``C``, the per-example clip norm (DP only).
      noise_multiplier: ``sigma``, noise std = ``sigma * C`` (DP only). 0 = clipping without noise: NO privacy.
      canary_scale: gradient norm of a gradient canary before clipping, in absolute units
        (:func:`jaxdp.audit.one_run_audit` sets it to ``canary_scale * C``, default 10 C).
      clip: per-example clipping on (True). ``False`` is a DELIBERATELY BROKEN DP-SGD that sums unclipped
        per-example gradients before the noise -- no privacy; it exists to check that audits catch it.
    """

    model: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    num_classes: int = 10
    steps: int = 200
    learning_rate: float = 0.1
    optimizer: str = "sgd"
    momentum: float | None = 0.9
    sample_rate: float = 1.0
    expected_dataset_size: int = 1
    dp: bool = False
    l2_clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    canary_scale: float = 1.0
    clip: bool = True

    def __post_init__(self):
        if self.model not in ("mlp", "logreg"):
            raise ValueError(f"model must be 'mlp' or 'logreg', got {self.model!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {self.sample_rate}")
        if self.steps < 1 or self.expected_dataset_size < 1:
            raise ValueError("steps and expected_dataset_size must be >= 1")

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return () if self.model == "logreg" else tuple(int(h) for h in self.hidden)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.expected_dataset_size


def init_params(key: jax.Array, input_dim: int, config: ShadowConfig) -> PyTree:
    """LeCun-normal weights, zero biases: ``[{"w": [d_in, d_out], "b": [d_out]}, ...]``."""
    sizes = (int(input_dim), *config.layer_sizes, int(config.num_classes))
    keys = jax.random.split(key, len(sizes) - 1)
    return [dict(w=jax.random.normal(k, (a, b)) / jnp.sqrt(a), b=jnp.zeros((b,)))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def apply_model(params: PyTree, x: jax.Array) -> jax.Array:
    """Logits ``[B, num_classes]`` of flat inputs ``[B, d]``."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def per_example_loss(params: PyTree, batch: dict, canary_scale: float = 1.0) -> jax.Array:
    """Cross-entropy per example ``[B]``; rows with ``canary_coord >= 0`` are gradient canaries (module doc)."""
    logits = apply_model(params, batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    coord = batch.get("canary_coord")
    if coord is None:
        return ce
    flat, _ = ravel_pytree(params)
    canary = -canary_scale * flat[jnp.maximum(coord, 0)]
    return jnp.where(coord >= 0, canary, ce)


def optimizer_section(config: ShadowConfig) -> dict:
    """The recipe's optimiser as a trainer config's ``optimizer`` section: ``adam``, ``sgd`` (plain) or
    ``momentum`` (SGD with ``config.momentum``), built by the trainer's own
    :func:`jaxdp.train.components.build_optimizer`."""
    name = "adam" if config.optimizer == "adam" else ("momentum" if config.momentum else "sgd")
    return {"name": name, "learning_rate": config.learning_rate, "momentum": config.momentum}


def _build_optimizer(config: ShadowConfig) -> optax.GradientTransformation:
    from jaxdp.train.components import build_optimizer
    return build_optimizer(optimizer_section(config), config.steps)


def _optimizer(config: ShadowConfig) -> optax.GradientTransformation:
    """Deprecated: the audit builds its optimiser with the trainer's ``build_optimizer`` (:func:`optimizer_section`)."""
    import warnings
    from jaxdp._checks import JaxdpDeprecationWarning
    warnings.warn("jaxdp.audit.shadow._optimizer is deprecated: use "
                  "jaxdp.train.components.build_optimizer(optimizer_section(config))", JaxdpDeprecationWarning,
                  stacklevel=2)
    return _build_optimizer(config)


def batch_capacity(sample_rate: float, max_included: int) -> int:
    """Fixed batch size ``P`` for Poisson batches of ``max_included`` examples at rate ``q``: mean + 7 standard
    deviations + 8, so that ``P[Binomial > P] < 1e-11`` per step (a larger batch would be truncated)."""
    mean = sample_rate * max_included
    return int(min(max_included, np.ceil(mean + 7 * np.sqrt(mean * (1 - sample_rate)) + 8)))


def make_train_fn(config: ShadowConfig, x: jax.Array, y: jax.Array, canary_coord: jax.Array | None = None,
                  max_included: int | None = None) -> Callable[[PyTree, jax.Array, jax.Array], PyTree]:
    """Build ``train(params0, include_mask, key) -> params``, pure and vmappable (see module docstring).

    Args:
      config: the recipe.
      x: ``[N, d]`` float inputs of the pool (every candidate example; flattened images).
      y: ``[N]`` int labels.
      canary_coord: optional ``[N]`` int32, ``-1`` for ordinary examples, else the flat parameter index that
        the gradient canary in that row pushes on.
      max_included: the largest number of included examples of any mask (default ``N``); sets the fixed
        padded batch size :func:`batch_capacity` so each step computes per-example gradients for about
        ``q * N`` examples, not ``N``. A batch beyond the capacity (probability < 1e-11) is truncated.

    ``include_mask`` (``[N]`` bool) says which pool examples are in this model's training set; ``key`` drives
    the Poisson sampling and the DP noise. Privacy: with ``dp=True`` every included example (canaries too) is
    protected at the (q, sigma, T) of ``config``; excluded examples are never touched.
    """
    batch = _make_batch(x, y, canary_coord)
    cap = batch_capacity(config.sample_rate, batch["x"].shape[0] if max_included is None else int(max_included))

    def train(params0: PyTree, include_mask: jax.Array, key: jax.Array) -> PyTree:
        return _train_core(config, cap, batch, params0, include_mask, key)

    return train


def _make_batch(x, y, canary_coord=None) -> dict:
    batch = dict(x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.int32))
    if canary_coord is not None:
        batch["canary_coord"] = jnp.asarray(canary_coord, jnp.int32)
    return batch


def _train_core(config: ShadowConfig, cap: int, batch: dict, params0: PyTree, include_mask: jax.Array,
                key: jax.Array) -> PyTree:
    """One training run (see :func:`make_train_fn`); ``cap`` is the fixed padded Poisson batch size."""
    n = batch["x"].shape[0]
    q, E = float(config.sample_rate), float(config.expected_batch_size)

    def loss_fn(p, b):
        return per_example_loss(p, b, config.canary_scale)

    sample_key, noise_key = jax.random.split(key)
    include = jnp.asarray(include_mask, bool)
    if config.dp:
        grad_fn = jaxdp.clipped_grad(loss_fn, config.l2_clip_norm, method="vmap")
        tx = optax.chain(jaxdp.add_noise(noise_multiplier=config.noise_multiplier, l2_clip_norm=config.l2_clip_norm,
                                         expected_batch_size=E, key=noise_key),
                         _build_optimizer(config))
    else:
        tx = _build_optimizer(config)

    def step(carry, t):
        params, opt_state = carry
        if q < 1.0:
            sampled = include & jax.random.bernoulli(jax.random.fold_in(sample_key, t), q, (n,))
            idx = jnp.nonzero(sampled, size=cap, fill_value=0)[0]
            mask = jnp.arange(cap) < jnp.sum(sampled)
            b = jax.tree_util.tree_map(lambda a: a[idx], batch)
        else:
            b, mask = batch, include
        if config.dp and config.clip:
            grads, _ = grad_fn(params, b, mask)
        elif config.dp:   # broken on purpose: the SUM of unclipped per-example gradients, then the noise
            grads = jax.grad(lambda p: jnp.sum(mask.astype(jnp.float32) * loss_fn(p, b)))(params)
        else:
            w = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1.0)
            grads = jax.grad(lambda p: jnp.sum(w * loss_fn(p, b)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params0, tx.init(params0)), jnp.arange(config.steps))
    return params


# Compiled programs are cached by (config, cap, shapes): repeated audits of one recipe compile once.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_many(config, cap, batch, params0, masks, keys):
    return jax.vmap(lambda p, m, k: _train_core(config, cap, batch, p, m, k))(params0, masks, keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_one(config, cap, batch, params0, mask, key):
    return _train_core(config, cap, batch, params0, mask, key)


def train_models(config: ShadowConfig, x, y, include_masks, key: jax.Array, canary_coord=None,
                 *, vectorize: bool | None = None) -> tuple[PyTree, PyTree]:
    """Train ``M = len(include_masks)`` models; returns ``(params0, params)`` stacked on a leading axis ``M``.

    ``vectorize=True`` trains all models in one ``jax.vmap``-ed program over (initial params, data masks, keys);
    ``False`` trains them one after another with one compiled single-model program. ``None`` (default) picks
    vmap on accelerators and sequential on CPU, where XLA's batched matrix products made the vmapped program
    about 1-2x SLOWER than the loop on the 2-core development machine (benchmarks/audit_shadow_speed.py).
    Model ``i`` uses ``fold_in(key, i)``: the two modes give the same models up to float round-off.
    """
    masks = jnp.asarray(include_masks, bool)
    if masks.ndim != 2 or masks.shape[1] != np.shape(x)[0]:
        raise ValueError(f"include_masks must be [M, N] with N = {np.shape(x)[0]} pool examples, "
                         f"got {masks.shape}")
    batch = _make_batch(x, y, canary_coord)
    cap = batch_capacity(config.sample_rate, int(np.max(np.sum(np.asarray(masks), axis=1))))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(masks.shape[0]))
    init_keys, train_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    d = int(np.prod(np.shape(x)[1:]))
    init = jax.vmap(lambda k: init_params(k, d, config))
    params0 = init(init_keys)
    if vectorize is None:
        vectorize = jax.default_backend() != "cpu"
    if vectorize:
        return params0, _train_many(config, cap, batch, params0, masks, train_keys)
    outs = [_train_one(config, cap, batch, jax.tree_util.tree_map(lambda a: a[i], params0), masks[i],  # noqa: B023 (called at once, in this iteration)
                       train_keys[i])
            for i in range(masks.shape[0])]
    return params0, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


@jax.jit
def logit_confidence(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Carlini et al.'s logit-scaled confidence ``log(p_y / (1 - p_y))`` per example, computed stably as
    ``z_y - logsumexp_{j != y} z_j``. ``params`` may be stacked over models: returns ``[M, N]`` then."""
    def one(p):
        z = apply_model(p, x)
        zy = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
        others = jnp.where(jax.nn.one_hot(y, z.shape[1], dtype=bool), -jnp.inf, z)
        return zy - jax.nn.logsumexp(others, axis=1)
    if params[0]["w"].ndim == 3:
        return jax.vmap(one)(params)
    return one(params)


@jax.jit
def per_example_losses(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy of every example ``[N]`` (or ``[M, N]`` for params stacked over models).

    Computed as ``softplus(-logit_confidence)`` (the same number): keeps precision for well-fit examples
    whose loss would round to exactly 0 in float32 and tie."""
    return jax.nn.softplus(-logit_confidence(params, x, y))


def balanced_masks(num_models: int, num_examples: int, seed: int) -> np.ndarray:
    """``[M, N]`` inclusion masks where every example is IN for exactly ``M // 2`` models, at random
    (Carlini et al.'s design: balanced IN/OUT counts for every example's Gaussian fits)."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((num_models, num_examples)), axis=0)
    return ranks < num_models // 2
