"""The Opacus-shaped entry point: ``PrivacyEngine.make_private`` turns a model, a loss and an optax optimiser
into a private training object with a Poisson sampler, a jitted private step and a running accountant.

One private step on a batch selected by the sampler (indices with a padding mask) is

    S      = sum_i mask_i * clip_C(grad loss_i(params))           (jaxdp.clipped_grad)
    update = optimizer((S + N(0, (sigma C)^2 I)) / E)              (jaxdp.add_noise, then the optax optimiser)

with ``E = q N`` the public expected batch size, and the accountant records one sampled Gaussian step with
noise multiplier ``sigma`` and sampling rate ``q`` -- including steps whose batch is empty (privacy rule 6).
With a target epsilon the object knows the last step that stays within it, and refuses further steps
(:class:`PrivacyBudgetExhausted`) instead of silently overspending.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from jaxdp import _checks, _nnx, compat, models, validation
from jaxdp.clipping import ClipStats, clipped_grad, leaf_names, total_clip_norm
from jaxdp.noise import add_noise
from jaxdp.sampling import CyclicPoissonSampler, FixedOrderSampler, PoissonSampler, ShuffleSampler, steps_for_epochs
from jaxdp.training import NonPrivateTraining, PrivacyBudgetExhausted, Training, TrainState

if TYPE_CHECKING:
    from jaxdp.adaptive import AdaptiveClipConfig

PyTree = Any


class ExampleKeyedBatch(NamedTuple):
    """A batch with one PRNG key per example, for stochastic layers (dropout) under per-example clipping.

    ``keys`` is raw key data ``uint32 [B, 2]`` (an ordinary batch leaf: it is sliced, sharded and vmapped with
    the examples). The engine builds it in :meth:`PrivateTraining.step`; the pure loss it makes from an NNX model
    (or a ``loss_fn(params, batch, rng)``) runs each example with its own key, so example ``i``'s dropout mask
    depends only on ``(seed, step, i)`` -- never on the other examples -- and is the same whichever clipping
    method evaluates it (vmap, ghost, auto): the clip bound C holds per example.
    """

    batch: PyTree
    keys: jax.Array


_EXAMPLE_KEY_STREAM = 0x64726F70  # "drop": the per-example key stream, separate from noise and sampling


def _has_rng_state(state: PyTree) -> bool:
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return any(isinstance(v, (nnx.RngKey, nnx.RngCount)) for v in leaves)


def _rekeyed(state: PyTree, key: jax.Array | None) -> PyTree:
    """Fresh copies of the non-parameter variables of an NNX model, created in the current trace (so the model
    may update them, e.g. an RngStream's counter), with every RNG stream re-seeded from ``key``: stream ``j``
    gets ``fold_in(key, j)`` and a zero counter. ``key=None`` keeps the model's own keys."""
    leaves, treedef = jax.tree_util.tree_flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    out, j = [], 0
    for v in leaves:
        if isinstance(v, nnx.RngKey) and key is not None:
            out.append(v.replace(jax.random.fold_in(key, j)))
            j += 1
        elif isinstance(v, nnx.RngCount) and key is not None:
            out.append(v.replace(jnp.zeros_like(_nnx.get(v))))
        elif isinstance(v, nnx.Variable):
            out.append(v.replace())   # a copy with the same value
        else:
            out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out)


def _per_example(loss_one: Callable) -> Callable:
    """``loss(params, ExampleKeyedBatch) -> [B]``: ``loss_one(params, example_as_batch_of_one, key) -> [1]``
    vmapped over the examples and their keys."""

    def loss(params, kb):
        def one(kd, example):
            out = loss_one(params, jax.tree_util.tree_map(lambda x: x[None], example), jax.random.wrap_key_data(kd))
            if jnp.ndim(out) != 1 or jnp.shape(out)[0] != 1:
                raise ValueError(f"loss_fn must return per-example losses of shape [B] (here [1]), got shape "
                                 f"{jnp.shape(out)}: return the unreduced losses (no mean or sum over the batch)")
            return out[0]
        return jax.vmap(one)(kb.keys, kb.batch)

    return loss


def _wants_key(loss_fn: Callable) -> bool:
    """Whether a params-style loss takes a required third positional argument: ``loss_fn(params, batch, rng)``."""
    import inspect
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    return len(required) >= 3


@jax.jit(static_argnums=2)
def _example_keys(base: jax.Array, step: jax.Array, size: int) -> jax.Array:
    return jax.random.key_data(jax.random.split(jax.random.fold_in(base, step), size))


def _accounting():
    from jaxdp import accounting  # imported lazily: accounting pulls in dp-accounting
    return accounting


class PrivateTraining(Training):
    """The result of :meth:`PrivacyEngine.make_private`. Use :meth:`init`, then :meth:`step` per batch; the run
    lifecycle (ledger, ``state_dict``/``load_state_dict``, ``batches``) is :class:`jaxdp.training.Training`'s.

    Attributes:
      sampler: the :class:`~jaxdp.PoissonSampler` (or ShuffleSampler) that selects every batch.
      noise_multiplier, l2_clip_norm, sample_rate, expected_batch_size: the mechanism's parameters
        (``max_grad_norm``: deprecated name of ``l2_clip_norm``).
      accountant: the engine's accountant; every :meth:`step` records one step in it.
      max_steps: the last step allowed by the target epsilon (None when there is no target).
    """

    allow_large_delta: bool   # set by make_private (recorded: whether target_delta >= 1/N was accepted)

    def __init__(self, *, engine: PrivacyEngine, pure_loss: Callable, params: PyTree, optimizer,
                 dataset_size: int, sampler, noise_multiplier: float, l2_clip_norm, key, secure: bool,
                 method: str, microbatch_size: int | None, trainable, expected_batch_size: float,
                 target_epsilon: float | None, target_delta: float | None, planned_steps: int | None,
                 nnx_graph: tuple | None, noise_tx: Any = None, mechanism: str = "dpsgd",
                 adaptive: Any = None, defer_ledger: bool = False, bands: int | None = None,
                 buffers: int | None = None) -> None:
        self.engine = engine
        self._init_lifecycle(defer_ledger)
        self.sampler = sampler
        self.dataset_size = dataset_size
        self.noise_multiplier = float(noise_multiplier)
        self.l2_clip_norm = l2_clip_norm
        self.sample_rate = sampler.sample_rate
        self.expected_batch_size = float(expected_batch_size)
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.planned_steps = planned_steps
        self.method = method
        self.mechanism = mechanism   # "dpsgd" | "bandmf" (bands: self.sampler.bands) | "blt"
        self.bands = bands           # BandMF's b (None, or 1 = independent noise, for the other mechanisms)
        self.buffers = buffers       # BLT's d (None for the other mechanisms)
        # BLT: the noise is scaled for ceil(H / b) participations in the planned H steps; no step beyond H.
        self.horizon = planned_steps if sampler.sampling == "fixed_order" else None
        self._params0 = params
        self._nnx_graph = nnx_graph
        self._example_key: jax.Array | None = None  # set by make_private when the loss needs per-example keys (dropout)
        self.loss_fn = pure_loss
        self.grad_fn = clipped_grad(pure_loss, l2_clip_norm, method=method, microbatch_size=microbatch_size,
                                    trainable=trainable)
        self.tx = optax.chain(
            noise_tx if noise_tx is not None else add_noise(
                noise_multiplier=self.noise_multiplier, l2_clip_norm=l2_clip_norm,
                expected_batch_size=self.expected_batch_size, key=key, secure=secure, trainable=trainable),
            optimizer)
        self.max_steps = self._max_steps() if target_epsilon is not None else None
        # One step on one device or data-parallel over all local devices: each device clips and sums its
        # shard, the sums are psum-ed, and the noise is added ONCE to the global sum (jaxdp.distributed).
        # Several processes (jax.distributed): the same, over every process's devices; each process passes
        # only its rows of the global batch (see batches() / load_batch()).
        from jaxdp import distributed
        self.num_devices = jax.device_count()
        self.num_processes = jax.process_count()
        if self.num_processes > 1:
            if secure:
                raise ValueError("secure=True draws batches and noise from each process's own OS entropy, which "
                                 "would differ between the processes; it is not supported with several processes")
            distributed.check_same_on_all_processes(
                [getattr(sampler, "seed", None), sampler.sampling, sampler.sample_rate, dataset_size,
                 self.noise_multiplier, repr(l2_clip_norm), self.expected_batch_size, method, mechanism,
                 np.asarray(jax.random.key_data(key)).tolist()],
                "the sampler seed, noise key or mechanism (sigma, C, q, N, E)")
        self._update = distributed.private_update(self.grad_fn, self.tx)
        self._opt_init = self.tx.init
        self.adaptive: AdaptiveClipConfig | None = None
        if adaptive is not None:
            self._setup_adaptive(adaptive, optimizer, key, secure, microbatch_size, trainable)

    @property
    def max_grad_norm(self):
        """Deprecated name of :attr:`l2_clip_norm`."""
        import warnings
        warnings.warn("PrivateTraining.max_grad_norm is deprecated; use .l2_clip_norm (same value)",
                      _checks.JaxdpDeprecationWarning, stacklevel=2)
        return self.l2_clip_norm

    def _setup_adaptive(self, config, optimizer, key, secure, microbatch_size, trainable) -> None:
        """Adaptive clipping (jaxdp.adaptive): the step clips at the current C_t held in the optimiser state,
        noises the gradient with sigma_eff and the centred unclipped count with sigma_b; the accountant records
        ``self.noise_multiplier``, the sigma that composes both releases."""
        from jaxdp import adaptive
        if self.num_devices > 1:
            raise ValueError("adaptive clipping runs on one device; use fixed clipping for multi-device training")
        self.adaptive = cfg = adaptive.AdaptiveClipConfig.from_any(config)
        ada = adaptive.adaptive_clipping(
            self.loss_fn, noise_multiplier=self.noise_multiplier, expected_batch_size=self.expected_batch_size,
            key=key, initial_clip_norm=float(self.l2_clip_norm), target_quantile=cfg.target_quantile,
            learning_rate=cfg.learning_rate, count_noise_std=cfg.count_noise_std,
            normalize=cfg.normalize, method=self.method, microbatch_size=microbatch_size,
            trainable=trainable, secure=secure)
        self.effective_noise_multiplier = ada.effective_noise_multiplier
        self.count_noise_std = ada.count_noise_std
        self._opt_init, self._update = adaptive.private_update(ada, optimizer)

    @property
    def accountant(self):
        """The engine's accountant (shared by every private object of the engine); every step records in it."""
        return self.engine.accountant

    def clip_norm(self, state: TrainState) -> float:
        """The clip norm the next step uses: ``C_t`` with adaptive clipping, else ``l2_clip_norm``."""
        if self.adaptive is None:
            return float(total_clip_norm(self.l2_clip_norm))
        return float(state.opt_state.clip.clip_norm)

    # -- accounting ------------------------------------------------------------------------------------
    def event(self, steps: int):
        """The :class:`jaxdp.accounting.Event` of ``steps`` steps of this mechanism, as the sampler emits it."""
        if self.horizon is not None:   # fixed order: the event names the planned horizon its noise covers
            return self.sampler.event(self.noise_multiplier, steps, mechanism=self.mechanism, horizon=self.horizon)
        return self.sampler.event(self.noise_multiplier, steps, mechanism=self.mechanism)

    def events(self, steps: int) -> list[dict]:
        """The dp-accounting events of ``steps`` steps of this mechanism (for ledgers and planning)."""
        return [self.event(steps).to_dict()]

    def ledger_events(self, steps: int) -> list[dict]:
        """:meth:`events` with the clip norm the ledger records (``||(C_1..C_K)||`` per layer; the initial C
        with adaptive clipping)."""
        c = float(total_clip_norm(self.l2_clip_norm))
        return [dict(e, l2_clip_norm=c) for e in self.events(steps)]

    def privacy_record(self) -> dict:
        """The mechanism part of the run record (``metrics.json``, :class:`jaxdp.train.RunSummary`): the target
        epsilon, the clipping (``max_grad_norm`` is the sensitivity of the clipped sum: ``||(C_1..C_K)||`` per
        layer, the initial C with adaptive clipping), the accountant and neighbouring relation the epsilon is
        about, the noise mechanism, and for BLT the buffers, the min-separation ``b`` and the horizon ``H``."""
        c = self.l2_clip_norm
        out: dict[str, Any] = {"target_epsilon": self.target_epsilon, "max_grad_norm": total_clip_norm(c)}
        if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(c)):
            out["per_layer_clip_norms"] = dict(zip(leaf_names(c), map(float, jax.tree_util.tree_leaves(c))))
        if self.adaptive is not None:
            out["adaptive_clipping"] = dict(self.adaptive._asdict(), initial_clip_norm=float(c),
                                            effective_noise_multiplier=self.effective_noise_multiplier,
                                            count_noise_std=self.count_noise_std)
        out.update(accountant=self.accountant.method, neighboring_relation=self.accountant.neighboring_relation,
                   mechanism=self.mechanism, bands=self.bands)
        if self.horizon is not None:   # BLT over a fixed batch order
            out.update(buffers=self.buffers, min_separation=self.sampler.min_separation, horizon=self.horizon)
        return out

    def _record_step(self) -> None:
        self.accountant.record(self.event(1))

    def _epsilon_after(self, extra_steps: int) -> float:
        acc = _accounting()
        events = list(self.accountant.history) + self.events(extra_steps)
        return acc.events_epsilon(events, self.target_delta, accountant=self.accountant.method,
                                  neighboring_relation=self.accountant.neighboring_relation)

    def _max_steps(self) -> int:
        """Largest total number of steps (counting the accountant's history) within the target epsilon."""
        done = self.accountant.steps
        target = _checks.present(self.target_epsilon)   # called only with a target

        def ok(n: int) -> bool:
            return n == 0 or self._epsilon_after(n) <= target

        if self.horizon is not None:   # fixed order: never past the horizon (BLT: epsilon is the same for all T)
            lo, hi = 0, self.horizon - done
            if ok(hi):
                return done + hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if ok(mid) else (lo, mid)
            return done + lo
        lo = 0
        hi = max(1, self.planned_steps or self.sampler.steps_per_epoch)
        while ok(hi):
            lo, hi = hi, hi * 2
            if hi > 10_000_000:
                return done + lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return done + lo

    def plan_shortfall(self) -> str | None:
        """``None`` if the planned steps (``epochs=``) fit within the target epsilon; otherwise a message with
        the plan's epsilon and what would fit: the epochs the target allows, and the noise multiplier (or
        target epsilon) that would let the whole plan run. Checked by :meth:`PrivacyEngine.make_private` (a
        warning) and by ``jaxdp train`` (a refusal), before any step."""
        if self.max_steps is None or self.planned_steps is None or self.max_steps >= self.planned_steps:
            return None
        s, done = self.sampler, self.accountant.steps
        fit_steps = self.max_steps - done
        fit_epochs = fit_steps / s.steps_per_epoch if s.sampling in ("shuffle", "fixed_order") else \
            fit_steps * s.expected_batch_size / s.dataset_size
        plan_eps = self._epsilon_after(self.planned_steps - done)
        options = [f"epochs <= {fit_epochs:.4g} ({fit_steps} steps)",
                   f"a target epsilon >= {plan_eps:.4f}"]
        if s.sampling == "poisson" and done == 0:
            try:
                sigma = _accounting().calibrate_noise_multiplier(
                    self.target_epsilon, self.target_delta, s.sample_rate, steps=self.planned_steps,
                    accountant=self.accountant.method,
                    neighboring_relation=self.accountant.neighboring_relation)
                options.insert(1, f"noise_multiplier >= {sigma:.4f}")
            except ValueError:
                pass
        if s.sampling == "fixed_order" and self.mechanism == "blt" and done == 0:
            try:   # one Gaussian mechanism, whatever the number of steps
                sigma = _accounting().calibrate_noise_multiplier(
                    self.target_epsilon, self.target_delta, 1.0, steps=1, accountant=self.accountant.method,
                    neighboring_relation=self.accountant.neighboring_relation)
                options.insert(1, f"noise_multiplier >= {sigma:.4f}")
            except ValueError:
                pass
        return (f"the plan cannot finish: {self.planned_steps} steps at noise multiplier {self.noise_multiplier:g} "
                f"spend epsilon {plan_eps:.4f} > target {self.target_epsilon:g} (delta={self.target_delta:g}); "
                f"training would stop after {fit_steps} steps. What fits: " + ", or ".join(options))

    @property
    def steps_taken(self) -> int:
        return self.accountant.steps

    @property
    def budget_left(self) -> int | None:
        """Steps left before the target epsilon would be exceeded (None without a target)."""
        return None if self.max_steps is None else self.max_steps - self.accountant.steps

    # -- training ----------------------------------------------------------------------------------------
    def next_step_refusal(self) -> str | None:
        """Why the next step must not be taken: the ledger reservation (:class:`jaxdp.training.Training`), the
        planned horizon of a fixed-order run (BLT), or the target epsilon. None: it may be taken."""
        reason = super().next_step_refusal()
        if reason is None and self.horizon is not None and self.accountant.steps >= self.horizon:
            # The noise was scaled to the sensitivity of ceil(H / b) participations; a later step would add a
            # participation no analysis covers.
            spent = self.get_epsilon() if self.target_delta else "see get_epsilon"
            reason = (f"stopping: the planned horizon of {self.horizon} steps is reached. The {self.mechanism} noise "
                      f"of this run was scaled for at most {-(-self.horizon // self.sampler.min_separation)} "
                      f"participations per example ({self.horizon} steps, batches {self.sampler.min_separation} "
                      "apart); further steps are not covered. Plan more epochs from the start (epochs=) in a new "
                      f"run. Epsilon spent: {spent}")
        if reason is None and self.max_steps is not None and self.accountant.steps >= self.max_steps:
            reason = (f"stopping: step {self.accountant.steps + 1} would take epsilon above the target "
                      f"{self.target_epsilon} (delta={self.target_delta}); {self.accountant.steps} steps were taken, "
                      f"epsilon spent = {self.get_epsilon():.4f}")
        return reason

    def _accountant_dict(self) -> dict:
        return self.accountant.to_dict()

    def _load_accountant(self, d: dict | None, step: int) -> list[str]:
        """Replace the engine's accountant by the saved one (checked against this mechanism's accountant)."""
        if d is None:
            return ["no accountant in the state dict of a private run"]
        restored = _accounting().Accountant.from_dict(d)
        if (restored.method, restored.neighboring_relation) != (self.accountant.method,
                                                                 self.accountant.neighboring_relation):
            return [f"accountant {restored.method}/{restored.neighboring_relation} vs this engine's "
                    f"{self.accountant.method}/{self.accountant.neighboring_relation}"]
        if restored.steps < step:
            return [f"accountant steps {restored.steps} vs train state step {step}"]
        self.engine.accountant = restored
        return []

    def step(self, state: TrainState, batch: PyTree, mask: jax.Array | np.ndarray) -> tuple[TrainState, ClipStats]:
        """One private step on a sampled batch (with its padding mask); records the step in the accountant.

        Raises :class:`PrivacyBudgetExhausted`, before touching the data, if the step would exceed the target
        or (BLT, fixed batch order) the planned horizon.
        """
        self._check_next_step()
        self._check_loss_shape(state.params, batch)
        if self._example_key is not None:  # stochastic layers: one key per example, from (seed, step, position)
            batch = ExampleKeyedBatch(batch, _example_keys(self._example_key, state.step, int(np.shape(mask)[0])))
        perm = None
        if self.num_devices > 1 and self.num_processes == 1:  # spread the real examples evenly over the devices
            from jaxdp.distributed import shard_batch
            mask = np.asarray(mask)
            size = mask.shape[0]
            perm, mask = shard_batch(np.arange(size), mask, self.num_devices)
            batch = jax.tree_util.tree_map(lambda x: x[perm], batch)
        # several processes: batch and mask are this process's rows of the global layout (load_batch)
        params, opt_state, stats = self._update(state.params, state.opt_state, batch, mask)
        if perm is not None:  # per-example stats back in the caller's batch order (padding rows: 0)
            dest = jnp.asarray(np.where(mask, perm, size))
            back = lambda a: jnp.zeros((size,) + a.shape[1:], a.dtype).at[dest].set(a, mode="drop")  # noqa: E731
            stats = stats._replace(per_example_norms=back(stats.per_example_norms),
                                   per_example_losses=back(stats.per_example_losses),
                                   aux=jax.tree_util.tree_map(back, stats.aux))
        self._record_step()
        self._took_step()
        return TrainState(params, opt_state, state.step + 1), stats

    def _check_loss_shape(self, params: PyTree, batch: PyTree) -> None:
        """Refuse a loss that does not return one loss per example, naming the batch's real size B (the check
        inside clipping sees one example at a time). Shapes only (``jax.eval_shape``), once per batch shape."""
        leaves = jax.tree_util.tree_leaves(batch)
        shapes = tuple(np.shape(x) for x in leaves)
        checked = self.__dict__.setdefault("_loss_shapes_checked", set())
        if not leaves or shapes in checked:
            return
        try:
            out = jax.eval_shape(self.loss_fn, params, batch)
        except Exception:  # noqa: BLE001 -- the step itself reports any other problem with the loss
            return
        losses = out[0] if isinstance(out, tuple) else out
        b = shapes[0][0] if shapes[0] else None
        if getattr(losses, "shape", None) != (b,):
            raise ValueError(
                f"loss_fn must return per-example losses of shape [B] = [{b}] for this batch of {b} rows "
                f"(sampled examples plus padding), "
                f"got shape {tuple(getattr(losses, 'shape', ()))}. Return the unreduced losses (no mean or sum over "
                "the batch): clipping needs each example's loss.")
        checked.add(shapes)

    def get_epsilon(self, delta: float | None = None) -> float:
        delta = self.target_delta if delta is None else delta
        if delta is None:
            raise ValueError("get_epsilon needs delta (no target_delta was given)")
        return self.accountant.get_epsilon(delta)


def _keyed(loss_fn: Callable) -> Callable:
    """A ``loss_fn(params, batch, rng)`` (e.g. Linen dropout: ``rngs={"dropout": rng}``) as a pure loss over
    :class:`ExampleKeyedBatch`: each example gets its own key. Two-argument losses are returned unchanged."""
    if not _wants_key(loss_fn):
        return loss_fn
    per_example = _per_example(loss_fn)

    def pure(params, batch):
        if not isinstance(batch, ExampleKeyedBatch):
            raise ValueError("this loss_fn takes an rng (loss_fn(params, batch, rng)); call it through "
                             "PrivateTraining.step, which gives every example its own key")
        return per_example(params, batch)

    return _needs_example_keys(pure)


def _needs_example_keys(pure: Callable) -> Callable:
    """Mark a pure loss that reads per-example keys from an :class:`ExampleKeyedBatch` (stochastic layers):
    ``make_private`` then gives :meth:`PrivateTraining.step` a key stream of its own."""
    setattr(pure, "needs_example_keys", True)  # noqa: B010 (a function attribute; mypy knows no such field)
    return pure


class PrivacyEngine:
    """Make training differentially private, Opacus-style, for pure JAX, Flax NNX and Flax Linen.

    Args:
      accountant: ``"prv"`` (default, tight upper bound), ``"rdp"`` or ``"pld"`` (see :mod:`jaxdp.accounting`).
      secure: draw noise and batch selection from the OS entropy source (not reproducible), as
        :func:`jaxdp.add_noise` and the samplers do with ``secure=True``.
      neighboring_relation: ``"add_remove"`` (default) or ``"replace_one"``.
      secure_mode: deprecated name of ``secure`` (a DeprecationWarning says so).
    """

    def __init__(self, accountant: str = "prv", *, secure: bool = False,
                 neighboring_relation: str = "add_remove", secure_mode: bool | None = None) -> None:
        secure = _checks.renamed_keyword("PrivacyEngine", "secure", secure, "secure_mode", secure_mode,
                                         new_default=False)
        self.accountant = _accounting().Accountant(accountant, neighboring_relation=neighboring_relation)
        self.secure = bool(secure)

    @property
    def secure_mode(self) -> bool:
        """Deprecated name of :attr:`secure`."""
        import warnings
        warnings.warn("PrivacyEngine.secure_mode is deprecated; use .secure (same value)",
                      _checks.JaxdpDeprecationWarning, stacklevel=2)
        return self.secure

    def _check_seed(self, seed: int | None, who: str, what: str, use: str) -> None:
        """Refuse a run without a seed unless the engine draws from the OS entropy source (no default seed)."""
        if seed is None and not self.secure:
            raise ValueError(f"{who} needs seed= ({what}) for {use}, or PrivacyEngine(secure=True) to use the OS "
                             "entropy source")

    def _batch_sampler(self, n: int, b: float, q: float, seed: int | None, poisson_sampling: bool,
                       max_batch_size: int | None = None) -> PoissonSampler | ShuffleSampler:
        """The sampler of independent-noise runs (private or not): Poisson at rate ``q`` (optionally truncated to
        ``max_batch_size``), or shuffled fixed-size batches of ``round(B)``."""
        if poisson_sampling:
            return PoissonSampler(n, q, seed, max_batch_size=max_batch_size, secure=self.secure)
        return ShuffleSampler(n, int(round(b)), seed, secure=self.secure)

    def _prepare(self, loss_fn, model, variables, params, sample_input, check: bool = True):
        """``(pure loss(params, batch) -> [B], params, nnx graph)``; ``check``: refuse layers that mix examples
        (DP only: a non-private baseline may use BatchNorm)."""
        if model is not None and isinstance(model, nnx.Module):
            if check:
                validation.check(model)
            graphdef, p, rest = models.split_params(model)
            if not _has_rng_state(rest):
                def pure(pp, batch):
                    return loss_fn(nnx.merge(graphdef, pp, rest), batch)

                return pure, p, (graphdef, rest)

            # Stochastic layers (nnx.Dropout, ...): the model's RNG streams are re-seeded per example from the
            # keys PrivateTraining.step puts in the batch (ExampleKeyedBatch), inside the traced function.
            def loss_one(pp, batch, key):
                return loss_fn(nnx.merge(graphdef, pp, _rekeyed(rest, key)), batch)

            per_example = _per_example(loss_one)

            def pure(pp, batch):
                if isinstance(batch, ExampleKeyedBatch):
                    return per_example(pp, batch)
                return loss_fn(nnx.merge(graphdef, pp, _rekeyed(rest, None)), batch)

            return _needs_example_keys(pure), p, (graphdef, rest)
        if model is not None and isinstance(model, nn.Module):
            if variables is None:
                raise ValueError("a Linen model needs its variables: make_private(model=..., variables=...)")
            if check:
                validation.check(model, variables, sample_input)
            return _keyed(loss_fn), variables["params"] if params is None else params, None
        if model is not None:
            raise TypeError(f"model must be a Flax NNX or Linen module, got {type(model).__name__}")
        if params is None:
            raise ValueError("make_private needs params= (pure JAX) or model= (Flax NNX / Linen)")
        return _keyed(loss_fn), params, None

    def make_private(
        self,
        *,
        loss_fn: Callable,
        optimizer: optax.GradientTransformation,
        dataset_size: int,
        batch_size: float,
        noise_multiplier: float,
        l2_clip_norm: float | PyTree = None,
        seed: int | None = None,
        model: Any = None,
        variables: PyTree = None,
        params: PyTree = None,
        sample_input: Any = None,
        epochs: float | None = None,
        poisson_sampling: bool = True,
        max_batch_size: int | None = None,
        method: str = "auto",
        microbatch_size: int | None = None,
        trainable: PyTree = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        opacus_compat: bool = False,
        adaptive_clipping: Any = None,
        ledger: Any = None,
        dataset_id: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        mechanism: str = "dpsgd",
        bands: int | None = None,
        buffers: int | None = None,
        momentum: float = 0.0,
        allow_large_delta: bool = False,
        max_grad_norm: float | PyTree = None,
        reserve: bool = False,
        defer_ledger: bool = False,
    ) -> PrivateTraining:
        """Wrap a model, a per-example loss and an optax optimiser into a :class:`PrivateTraining`.

        Args:
          loss_fn: per-example losses ``[B]``. For an NNX ``model``: ``loss_fn(model, batch)``; for a Linen
            ``model`` or pure params: ``loss_fn(params, batch)``.
          optimizer: any optax optimiser; it receives the noisy average gradient.
          dataset_size: ``N``, the number of examples (one example = the privacy unit).
          batch_size: the EXPECTED batch size; the sampling rate is ``q = batch_size / N``.
          noise_multiplier: ``sigma``; noise std is ``sigma * l2_clip_norm``.
          l2_clip_norm: clip norm ``C`` (a number, or a per-layer pytree): the bound on each example's
            contribution, the name :func:`jaxdp.clipped_grad` and :func:`jaxdp.add_noise` use.
          seed: int seed for batch selection and noise (required unless ``secure``); keep it secret.
          epochs: planned epochs (sets the budget-stop search start; ``make_private_with_epsilon`` needs it).
          poisson_sampling: False = shuffled fixed-size batches, accounted as such (not as Poisson).
          opacus_compat: divide by ``int(N * q)`` as Opacus does instead of ``q * N``.
          adaptive_clipping: ``True``, a dict or a :class:`jaxdp.adaptive.AdaptiveClipConfig`: the clip norm
            starts at ``l2_clip_norm`` (a number) and tracks a private quantile of the gradient norms
            (Andrew et al. 2021; docs/adaptive.md). ``noise_multiplier`` stays the sigma the accountant records;
            the gradient gets ``effective_noise_multiplier`` and the unclipped count ``count_noise_std``.
          target_epsilon, target_delta: stop (PrivacyBudgetExhausted) at the step that would exceed epsilon.
          ledger, dataset_id, run_id, parent_run_id: a privacy ledger (:mod:`jaxdp.ledger`, object or path;
            default ``$JAXDP_LEDGER``): training on a protected dataset is refused unless ``run_id`` holds a
            reservation charged to it (and, when fine-tuning, to the parent model's datasets). The run never
            steps beyond its reservation (:class:`PrivacyBudgetExhausted`); ``commit_ledger()`` records the
            steps taken (:class:`jaxdp.ledger.gate.LedgerGate`).
          reserve: reserve the planned steps (``epochs=``) in the ledger when the run has no reservation yet.
          defer_ledger: do not open the ledger here; the caller calls ``open_ledger(...)`` before the first step
            (steps are refused until then). ``ledger=False`` is the deprecated spelling.
          mechanism, bands: ``"dpsgd"`` (default: independent noise, Poisson sampling) or ``"bandmf"``: b-banded
            matrix-factorization noise (:func:`jaxdp.matrix_factorization.bandmf_noise`, state ``(b-1) x |params|``,
            strategy optimised for the planned steps, so ``epochs`` is required) with cyclic Poisson sampling
            over ``b = bands`` groups at rate ``p = b * batch_size / N`` (needs ``b * batch_size <= N``), accounted
            as DP-SGD with rate ``p`` and ``ceil(T / b)`` steps. Needs a fresh engine (no earlier steps).
            Or ``"blt"``: buffered linear Toeplitz noise (:func:`jaxdp.blt.blt_noise`, state ``d x |params|`` with
            ``d = buffers``) over a fixed secret batch order (:class:`jaxdp.sampling.FixedOrderSampler`: ``b =
            floor(N / B)`` batches of exactly ``B = batch_size`` examples repeated every epoch, each example once
            per epoch, ``b`` steps apart). The noise is scaled for the planned horizon ``H = ceil(epochs * b)``
            with ``ceil(H / b)`` participations and accounted as ONE Gaussian mechanism with noise multiplier
            ``noise_multiplier`` (zero-out = add/remove relation; replace-one refused); training stops at ``H``
            (:class:`PrivacyBudgetExhausted`). No amplification by sampling. Needs ``epochs`` and a fresh engine.
          momentum: the heavy-ball momentum of ``optimizer`` (e.g. ``optax.sgd(lr, momentum=0.9)``): BandMF and
            BLT optimise their noise strategy for it (accuracy only; privacy does not depend on it).
          allow_large_delta: accept ``target_delta >= 1/N`` (refused by default: such a delta allows publishing
            an example outright); recorded as ``private.allow_large_delta``.
          max_grad_norm: deprecated name of ``l2_clip_norm`` (Opacus's name; a DeprecationWarning says so).

        Example: 100 examples, Poisson batches of expected size 10 (``q = 0.1``), noise multiplier 1, clip norm 1::

            >>> import jax.numpy as jnp, optax
            >>> run = PrivacyEngine(accountant="rdp").make_private(
            ...     loss_fn=lambda p, b: (b["x"] @ p["w"] - 1.0) ** 2, params={"w": jnp.zeros(2)},
            ...     optimizer=optax.sgd(0.1), dataset_size=100, batch_size=10, noise_multiplier=1.0,
            ...     l2_clip_norm=1.0, seed=0)
            >>> run.sample_rate, run.expected_batch_size, run.sampler.sampling
            (0.1, 10.0, 'poisson')
            >>> state = run.init()   # then per batch (run.batches(data)): state, stats = run.step(state, batch, mask)

        Raises:
          TypeError: no ``l2_clip_norm`` (or one that is not a number or a pytree of numbers).
          ValueError: an invalid ``dataset_size``, ``batch_size`` (or ``batch_size > dataset_size``) or
            ``noise_multiplier``; no ``seed`` without ``secure``; ``target_epsilon`` without ``target_delta``;
            ``target_delta >= 1/N`` without ``allow_large_delta``; an unknown ``mechanism`` or arguments that do
            not fit it (``bands``, ``buffers``, ``epochs``, the sampling); adaptive clipping that cannot work;
            a ledger without ``dataset_id`` and ``run_id``.
          jaxdp.ModelValidationError: a model with layers that mix examples (BatchNorm).
          jaxdp.LedgerError: the ledger refuses the run (:class:`~jaxdp.ReservationRequiredError`: protected data
            and no reservation; :class:`~jaxdp.BudgetExceededError`: ``reserve=True`` beyond the budget).
        """
        l2_clip_norm = _checks.renamed_keyword("make_private", "l2_clip_norm", l2_clip_norm, "max_grad_norm",
                                               max_grad_norm)
        if l2_clip_norm is None:
            raise TypeError("make_private needs l2_clip_norm= (the clip norm C: a number, or a per-layer pytree)")
        n, b, q = _sizes(dataset_size, batch_size)
        if opacus_compat and poisson_sampling:
            # Opacus's DPDataLoader: q = 1 / ceil(N / B), normaliser int(N * q) (63 for B=64, N=60,000).
            q = compat.sample_rate(n, int(round(b)), opacus_compat=True)
        sigma = _checks.non_negative("noise_multiplier", noise_multiplier)
        total_clip_norm(l2_clip_norm)
        if adaptive_clipping is not None and adaptive_clipping is not False:
            if mechanism != "dpsgd":
                raise ValueError("adaptive_clipping is for mechanism='dpsgd' (its count release is accounted as "
                                 f"part of a DP-SGD step); use a fixed l2_clip_norm with mechanism={mechanism!r}")
            _check_adaptive(adaptive_clipping, l2_clip_norm, b, sigma)
        else:
            adaptive_clipping = None
        self._check_seed(seed, "make_private", "an int you keep secret", "batch selection and noise")
        if target_epsilon is not None:
            _checks.positive("target_epsilon", target_epsilon)
            if target_delta is None:
                raise ValueError("target_epsilon needs target_delta")
        if target_delta is not None:
            _check_delta(target_delta, n, allow_large_delta)
        defer_ledger = _check_ledger_args(ledger, dataset_id, run_id, defer_ledger)
        if mechanism not in ("dpsgd", "bandmf", "blt"):
            raise ValueError(f"mechanism must be 'dpsgd', 'bandmf' or 'blt', got {mechanism!r}")
        from jaxdp.matrix_factorization import _check_momentum
        momentum = _check_momentum(momentum)
        if mechanism == "bandmf":
            bands = _check_bandmf(n, b, q, bands, epochs, poisson_sampling, max_batch_size, opacus_compat,
                                  self.accountant)
        elif bands not in (None, 1):
            raise ValueError(f"bands is for mechanism='bandmf'; {mechanism!r} has no bands")
        if mechanism == "blt":
            buffers = _check_blt(n, b, buffers, epochs, poisson_sampling, max_batch_size, opacus_compat,
                                 self.accountant)
        elif buffers is not None:
            raise ValueError(f"buffers is for mechanism='blt'; {mechanism!r} has no buffers")
        pure, p, graph = self._prepare(loss_fn, model, variables, params, sample_input)
        if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(l2_clip_norm)):
            from jaxdp.clip_groups import clip_norm_tree  # per-layer: check the group names, list the valid ones
            l2_clip_norm = clip_norm_tree(p, l2_clip_norm)
        sampler: CyclicPoissonSampler | FixedOrderSampler | PoissonSampler | ShuffleSampler
        if mechanism == "bandmf":
            bands = _checks.present(bands)   # _check_bandmf returned it
            sampler = CyclicPoissonSampler(n, q * bands, bands, seed, secure=self.secure)
        elif mechanism == "blt":
            sampler = FixedOrderSampler(n, int(b), seed, secure=self.secure)
        else:
            sampler = self._batch_sampler(n, b, q, seed, poisson_sampling, max_batch_size)
        # Opacus divides by int(N * q) (e.g. 63 for batch 64 on 60,000 examples); jaxdp by q * N.
        e = compat.expected_batch_size(n, q, opacus_compat=opacus_compat) if (
            poisson_sampling and mechanism == "dpsgd") else sampler.expected_batch_size
        # Refuse now, before any data is touched, a sampling this accountant cannot account for (rule 5).
        planned = None if epochs is None else sampler.steps_for_epochs(epochs)
        probe = _accounting().Accountant(self.accountant.method,
                                         neighboring_relation=self.accountant.neighboring_relation)
        # (isinstance below: mechanism "blt" is exactly the fixed-order sampler, "bandmf" the cyclic one)
        probe.record(sampler.event(sigma, 1, mechanism=mechanism, horizon=planned)
                     if isinstance(sampler, FixedOrderSampler) else sampler.event(sigma, 1, mechanism=mechanism))
        # The noise stream "nois" (secure: OS entropy instead; seed is required otherwise, checked above).
        key = None if self.secure else jax.random.fold_in(_checks.seed_key(_checks.present(seed)), 0x6E6F6973)
        noise_tx = None
        if isinstance(sampler, CyclicPoissonSampler):   # bandmf (bandmf and blt need epochs: planned is set)
            from jaxdp.matrix_factorization import bandmf_noise
            noise_tx = bandmf_noise(noise_multiplier=sigma, l2_clip_norm=l2_clip_norm, expected_batch_size=e,
                                    key=key, bands=sampler.bands, steps=max(_checks.present(planned), 1),
                                    momentum=momentum, secure=self.secure, trainable=trainable)
        elif isinstance(sampler, FixedOrderSampler):   # blt
            from jaxdp.blt import blt_noise
            horizon = _checks.present(planned)
            noise_tx = blt_noise(noise_multiplier=sigma, l2_clip_norm=l2_clip_norm, expected_batch_size=e, key=key,
                                 steps=horizon, buffers=buffers, min_separation=sampler.min_separation,
                                 participations=sampler.participations(horizon), momentum=momentum,
                                 secure=self.secure, trainable=trainable)
        private = PrivateTraining(
            engine=self, pure_loss=pure, params=p, optimizer=optimizer, dataset_size=n, sampler=sampler,
            noise_multiplier=sigma, l2_clip_norm=l2_clip_norm, key=key, secure=self.secure,
            method=method, microbatch_size=microbatch_size, trainable=trainable, expected_batch_size=e,
            target_epsilon=target_epsilon, target_delta=target_delta, planned_steps=planned, nnx_graph=graph,
            noise_tx=noise_tx, mechanism=mechanism, adaptive=adaptive_clipping, defer_ledger=defer_ledger,
            bands=bands, buffers=buffers)
        private.allow_large_delta = bool(allow_large_delta)
        shortfall = private.plan_shortfall()
        if shortfall is not None:
            import warnings
            warnings.warn(shortfall + " (training stops at the target: PrivacyBudgetExhausted).", stacklevel=2)
        if getattr(pure, "needs_example_keys", False):  # dropout: per-example keys, a stream of their own
            if private.num_processes > 1:  # keys follow batch positions, which are per process with several
                raise ValueError("a loss with stochastic layers (dropout: per-example keys) is not supported with "
                                 "several processes yet; train it in one process (several local devices work) "
                                 "or remove the dropout")
            import secrets
            private._example_key = (_checks.seed_key(secrets.randbits(63)) if self.secure else
                                    jax.random.fold_in(_checks.seed_key(_checks.present(seed)), _EXAMPLE_KEY_STREAM))
        if not defer_ledger:  # last: a reservation is made only for a run that was built
            private.open_ledger(ledger, dataset_id=dataset_id, run_id=run_id, parent_run_id=parent_run_id,
                                reserve=reserve)
        return private

    def make_nonprivate(
        self,
        *,
        loss_fn: Callable,
        optimizer: optax.GradientTransformation,
        dataset_size: int,
        batch_size: float,
        seed: int | None = None,
        model: Any = None,
        variables: PyTree = None,
        params: PyTree = None,
        sample_input: Any = None,
        epochs: float | None = None,
        poisson_sampling: bool = True,
        ledger: Any = None,
        dataset_id: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        defer_ledger: bool = False,
    ) -> NonPrivateTraining:
        """The non-private twin of :meth:`make_private` (a baseline): the same arguments for the model, the
        loss, the optimiser and the sampling, and an object with the same surface
        (:class:`jaxdp.training.NonPrivateTraining`). It is refused on data the ledger protects.

        Example::

            >>> import jax.numpy as jnp, numpy as np, optax
            >>> run = PrivacyEngine().make_nonprivate(loss_fn=lambda p, b: (b["x"] @ p["w"] - 1.0) ** 2,
            ...     params={"w": jnp.zeros(2)}, optimizer=optax.sgd(0.1), dataset_size=8, batch_size=4, seed=0)
            >>> run.get_epsilon(), run.noise_multiplier
            (inf, 0.0)

        Raises:
          ValueError: an invalid ``dataset_size`` or ``batch_size``, no ``seed`` without ``secure``, or a
            ledger without ``dataset_id`` and ``run_id``.
          jaxdp.ReservationRequiredError: the ledger protects the data (a non-private run is refused on it).
        """
        n, b, q = _sizes(dataset_size, batch_size)
        self._check_seed(seed, "make_nonprivate", "an int", "batch selection")
        defer_ledger = _check_ledger_args(ledger, dataset_id, run_id, defer_ledger)
        pure, p, graph = self._prepare(loss_fn, model, variables, params, sample_input, check=False)
        sampler = self._batch_sampler(n, b, q, seed, poisson_sampling)
        run = NonPrivateTraining(engine=self, pure_loss=pure, params=p, optimizer=optimizer, dataset_size=n,
                                 sampler=sampler, planned_steps=None if epochs is None else
                                 sampler.steps_for_epochs(epochs), nnx_graph=graph, defer_ledger=defer_ledger)
        if not defer_ledger:
            run.open_ledger(ledger, dataset_id=dataset_id, run_id=run_id, parent_run_id=parent_run_id)
        return run

    def make_private_with_epsilon(self, *, target_epsilon: float, target_delta: float, epochs: float,
                                  dataset_size: int, batch_size: float, **kwargs) -> PrivateTraining:
        """Like :meth:`make_private`, with the noise multiplier calibrated so that ``epochs`` epochs spend
        at most ``target_epsilon`` (the calibration never overshoots; training stops at the target)."""
        n, _, q = _sizes(dataset_size, batch_size)
        _checks.positive("target_epsilon", target_epsilon)
        _check_delta(target_delta, n, kwargs.get("allow_large_delta", False))
        _checks.positive("epochs", epochs)
        if kwargs.get("poisson_sampling", True) is False:
            raise ValueError("make_private_with_epsilon calibrates for Poisson sampling; use make_private with "
                             "an explicit noise_multiplier for shuffled batches")
        if kwargs.get("opacus_compat", False):
            # calibrate for the rate the sampler will actually use (Opacus's 1 / ceil(N / B)), not B / N
            q = compat.sample_rate(n, int(round(batch_size)), opacus_compat=True)
        steps = steps_for_epochs(epochs, q)   # the steps the sampler will take (the same rule)
        if kwargs.get("mechanism", "dpsgd") == "blt":   # ONE Gaussian mechanism, whatever the number of steps
            _check_blt(n, batch_size, kwargs.get("buffers"), epochs, kwargs.get("poisson_sampling", True),
                       kwargs.get("max_batch_size"), kwargs.get("opacus_compat", False), self.accountant)
            q, steps = 1.0, 1
        elif kwargs.get("mechanism", "dpsgd") == "bandmf":   # DP-SGD with rate b q and ceil(T / b) steps
            bands = _check_bandmf(n, batch_size, q, kwargs.get("bands"), epochs, kwargs.get("poisson_sampling", True),
                                  kwargs.get("max_batch_size"), kwargs.get("opacus_compat", False), self.accountant)
            sampler = CyclicPoissonSampler(n, q * bands, bands, 0)
            cyclic = sampler.event(1.0, sampler.steps_for_epochs(epochs), mechanism="bandmf").equivalent_poisson()
            q, steps = cyclic.sample_rate, cyclic.steps
        sigma = self.calibrate(target_epsilon, target_delta, q, steps)
        return self.make_private(noise_multiplier=sigma, dataset_size=n, batch_size=batch_size, epochs=epochs,
                                 target_epsilon=target_epsilon, target_delta=target_delta, **kwargs)

    def calibrate(self, target_epsilon: float, target_delta: float, sample_rate: float, steps: int) -> float:
        """Smallest noise multiplier whose ``steps`` steps (after what is already spent) stay within target."""
        acc = _accounting()
        if self.accountant.steps == 0:
            return acc.calibrate_noise_multiplier(target_epsilon, target_delta, sample_rate, steps=steps,
                                                  accountant=self.accountant.method)
        raise ValueError("calibration after steps were already taken is not supported: use a new PrivacyEngine")

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far by every private object of this engine, at ``delta``."""
        return self.accountant.get_epsilon(delta)


def _sizes(dataset_size: int, batch_size: float) -> tuple[int, float, float]:
    """``(N, B, q = B / N)`` validated: the dataset size and the (expected) batch size every run is built from
    (``make_private``, ``make_nonprivate``, ``make_private_with_epsilon``); refuses ``B > N``."""
    n = _checks.positive_int("dataset_size", dataset_size)
    b = _checks.positive("batch_size", batch_size)
    return n, b, _checks.sample_rate(b / n, "batch_size / dataset_size")


def _check_adaptive(config, l2_clip_norm, expected_batch_size: float, sigma: float) -> None:
    """Refuse, before any data is touched, an adaptive-clipping setting that cannot work."""
    from jaxdp import adaptive
    cfg = adaptive.AdaptiveClipConfig.from_any(config)
    if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(l2_clip_norm)):
        raise ValueError("adaptive clipping adapts one flat clip norm: give l2_clip_norm as a number (the "
                         "initial C), not a per-layer tree")
    sigma_b = expected_batch_size / 20.0 if cfg.count_noise_std is None else cfg.count_noise_std
    adaptive.effective_noise_multiplier(sigma, sigma_b)  # raises when 2 sigma_b <= sigma


def _check_bandmf(n, batch_size, q, bands, epochs, poisson_sampling, max_batch_size, opacus_compat, accountant):
    """Validate ``mechanism='bandmf'`` arguments; returns ``bands``."""
    b = _checks.positive_int("bands (mechanism='bandmf' needs bands=b, the number of bands)", bands)
    if epochs is None:
        raise ValueError("mechanism='bandmf' needs epochs= (the strategy is optimised for the planned steps)")
    if not poisson_sampling or max_batch_size is not None or opacus_compat:
        raise ValueError("mechanism='bandmf' uses cyclic Poisson sampling: leave poisson_sampling, max_batch_size "
                         "and opacus_compat at their defaults")
    if q * b > 1.0 + 1e-12:
        raise ValueError(f"mechanism='bandmf' samples each of the bands={b} groups at rate bands * batch_size / N = "
                         f"{q * b:.3g} > 1; use fewer bands or a smaller batch_size (bands * batch_size <= N)")
    if accountant.steps:
        raise ValueError("mechanism='bandmf' needs a fresh PrivacyEngine: its accounting counts participations in "
                         "one cyclic schedule, which must not merge with earlier runs' steps")
    return b


def _check_blt(n, batch_size, buffers, epochs, poisson_sampling, max_batch_size, opacus_compat, accountant):
    """Validate ``mechanism='blt'`` arguments; returns ``buffers``."""
    d = _checks.positive_int("buffers (mechanism='blt' needs buffers=d, the number of BLT buffers; 2-4 is typical)",
                             buffers)
    if epochs is None:
        raise ValueError("mechanism='blt' needs epochs= (the planned horizon: the noise is scaled for the number of "
                         "participations in the planned steps, and training stops there)")
    _checks.positive("epochs", epochs)
    if not poisson_sampling or max_batch_size is not None or opacus_compat:
        raise ValueError("mechanism='blt' uses its own fixed-order sampler (one secret permutation, the same batch "
                         "order every epoch): leave poisson_sampling, max_batch_size and opacus_compat at their "
                         "defaults (shuffled or Poisson batches would break the b-step separation its sensitivity "
                         "assumes)")
    if float(batch_size) != int(batch_size) or int(batch_size) > n:
        raise ValueError(f"mechanism='blt' takes batches of exactly batch_size examples: batch_size must be an "
                         f"integer <= dataset_size={n}, got {batch_size!r}")
    if accountant.neighboring_relation != "add_remove":
        raise ValueError("mechanism='blt' is analysed under the zero-out relation (add/remove one example with a "
                         "fixed participation schema); replace-one would double the sensitivity the noise is "
                         "scaled to. Use PrivacyEngine(neighboring_relation='add_remove')")
    if accountant.steps:
        raise ValueError("mechanism='blt' needs a fresh PrivacyEngine: its noise is scaled for one planned run, "
                         "accounted as one Gaussian mechanism, which must not merge with earlier runs' steps")
    return d
def _check_ledger_args(ledger: Any, dataset_id: str | None, run_id: str | None, defer_ledger: bool) -> bool:
    """Refuse a ledger without the run's ids before anything is built; returns ``defer_ledger`` (True for the
    deprecated ``ledger=False``)."""
    if ledger is False:
        from jaxdp.training import deprecated_ledger_false
        deprecated_ledger_false()
        return True
    import os
    if not defer_ledger and (ledger if ledger is not None else os.environ.get("JAXDP_LEDGER")) and (
            dataset_id is None or run_id is None):
        raise ValueError("with a privacy ledger, make_private needs dataset_id= and run_id= (the run's "
                         "reservation); see jaxdp.ledger")
    return bool(defer_ledger)


def _check_delta(delta: float, n: int, allow_large_delta: bool = False) -> None:
    _checks.delta_for_dataset(delta, n, allow_large_delta=allow_large_delta)


__all__ = ["PrivacyEngine", "PrivateTraining", "NonPrivateTraining", "TrainState", "PrivacyBudgetExhausted",
           "ExampleKeyedBatch"]
