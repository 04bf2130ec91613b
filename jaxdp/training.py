"""The run lifecycle shared by private and non-private training: what :meth:`jaxdp.PrivacyEngine.make_private`
and :meth:`~jaxdp.PrivacyEngine.make_nonprivate` return.

Both objects have one surface, so a training loop is the same for either::

    training.open_ledger(...)                     # reserve / adopt the run's reservation (or refuse)
    state = training.init()                       # or training.load_state_dict(saved) to resume
    for batch, mask in training.batches(data):    # the sampler's next batches (this process's rows)
        state, stats = training.step(state, batch, mask)   # PrivacyBudgetExhausted: nothing more may be taken
    saved = training.state_dict(state)            # train state + sampler + accountant: resumes bit-identically
    training.commit_ledger()                      # the steps actually taken

The step count is owned here: every successful :meth:`step` advances the sampler to the number of steps taken,
and a refused step leaves it there, so :meth:`state_dict` after a refusal resumes at the refused step.

Before every step one check (:meth:`Training.next_step_refusal`) says whether it may be taken: the ledger
reservation's step limit (:class:`jaxdp.ledger.gate.LedgerGate`) and, for private training, the target epsilon.
A refused step raises :class:`PrivacyBudgetExhausted` before the data is touched.
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

PyTree = Any


class PrivacyBudgetExhausted(RuntimeError):
    """Raised instead of taking a step that would spend more than the target epsilon or the ledger reservation."""


class TrainState(NamedTuple):
    """What a step updates: parameters, optimiser state (noise RNG state included), step count."""

    params: PyTree
    opt_state: PyTree
    step: jax.Array


class NonPrivateStats(NamedTuple):
    """What a non-private step reports: each example's loss (no clipping, so no clip statistics)."""

    per_example_losses: jax.Array


_STATE_DICT_FORMAT = 1


class Training:
    """The lifecycle shared by :class:`~jaxdp.PrivateTraining` and :class:`NonPrivateTraining`.

    Subclasses set ``sampler``, ``dataset_size``, ``num_processes``, ``_params0``, ``_opt_init``, ``_nnx_graph``
    and implement ``step``, ``ledger_events``, ``privacy_record`` and ``private``.
    """

    private: bool = True
    sampler: Any
    dataset_size: int
    num_processes: int = 1
    _params0: PyTree
    _opt_init: Callable
    _nnx_graph: tuple | None = None

    def _init_lifecycle(self, defer_ledger: bool) -> None:
        self._steps = 0              # steps this object took (the ledger's count)
        self._gate = None            # jaxdp.ledger.gate.LedgerGate (process 0 only)
        self._ledger_limit = None    # the gate's step limit, the same on every process
        self._ledger_opened = not defer_ledger
        self._data_checked: tuple | None = None

    # -- the ledger ------------------------------------------------------------------------------------------
    def ledger_events(self, steps: int) -> list[dict]:
        """The events a ledger records for ``steps`` steps of this run (reserved, then committed)."""
        raise NotImplementedError

    def privacy_record(self) -> dict:
        """The mechanism part of the run record (``metrics.json``): what the run's epsilon is about."""
        raise NotImplementedError

    def open_ledger(self, ledger: Any = None, *, dataset_id: str | None = None, run_id: str | None = None,
                    parent_run_id: str | None = None, reserve: bool = False, planned_steps: int | None = None,
                    model: str | None = None, config_hash: str | None = None,
                    accept_config_hashes: Sequence[str] = (), complete: bool = False,
                    where: str | None = None, log: Callable[[str], Any] | None = None) -> Any:
        """Reconcile this run with the privacy ledger before its first step (:meth:`LedgerGate.open
        <jaxdp.ledger.gate.LedgerGate.open>`): adopt its reservation, reserve the planned steps
        (``reserve=True``; default ``planned_steps``: the ``epochs=`` plan), or refuse.

        ``ledger=None`` reads ``$JAXDP_LEDGER``; with no ledger at all this only marks the run as checked. With
        several processes, process 0 alone talks to the ledger and every process learns the step limit (a
        collective: all call it). Returns the gate (None without a ledger, and on the other processes).
        """
        from jaxdp import distributed
        from jaxdp.ledger.gate import LedgerGate
        planned = planned_steps if planned_steps is not None else getattr(self, "planned_steps", None)
        gate = distributed.on_main_process(lambda: LedgerGate.open(
            ledger, dataset_id=dataset_id, run_id=run_id, events=self.ledger_events, private=self.private,
            planned_steps=planned, steps_done=self._steps, complete=complete, parent_run_id=parent_run_id,
            reserve=reserve, model=model, config_hash=config_hash, accept_config_hashes=accept_config_hashes,
            where=where, log=log),
            "the privacy ledger check")
        self._gate = gate
        self._ledger_limit = distributed.broadcast_from_main(None if gate is None else gate.limit)
        self._ledger_opened = True
        return gate

    def commit_ledger(self, steps: int | None = None) -> Any:
        """Commit the steps taken (default: this object's count) to the ledger reservation opened by
        :meth:`open_ledger`; a no-op without one. A collective with several processes (process 0 commits).
        Returns the run's ledger record on process 0 (None without a ledger)."""
        from jaxdp import distributed
        steps = self._steps if steps is None else int(steps)
        gate = self._gate
        return distributed.on_main_process(lambda: gate.commit(steps) if gate is not None else None,
                                           "the privacy ledger commit")

    # -- the pre-step check ----------------------------------------------------------------------------------
    def next_step_refusal(self) -> str | None:
        """Why the next step must not be taken (None: it may). The one pre-step check: the ledger
        reservation here, the target epsilon (and any planned horizon) in subclasses."""
        if not self._ledger_opened:
            from jaxdp.ledger import ReservationRequiredError
            raise ReservationRequiredError(
                "this training was made with defer_ledger=True (or the deprecated ledger=False): call "
                "open_ledger(...) before the first step")
        if self._ledger_limit is not None and self._steps >= self._ledger_limit:
            return (f"stopping: the privacy ledger reservation covers {self._ledger_limit} steps of this run "
                    f"and {self._steps} were taken; step {self._steps + 1} would go beyond it")
        return None

    def _check_next_step(self) -> None:
        reason = self.next_step_refusal()
        if reason is not None:
            self.sampler.step = self._steps  # the refused batch is not consumed
            raise PrivacyBudgetExhausted(reason)

    def _took_step(self) -> None:
        self._steps += 1
        self.sampler.step = self._steps

    # -- state -----------------------------------------------------------------------------------------------
    def init(self, params: PyTree | None = None) -> TrainState:
        """The initial train state (the model's parameters, or ``params``)."""
        params = self._params0 if params is None else params
        return TrainState(params, self._opt_init(params), jnp.zeros([], jnp.int32))

    def _accountant_dict(self) -> dict | None:
        return None

    def _load_accountant(self, d: dict | None, step: int) -> list[str]:
        return []

    def state_dict(self, state: TrainState) -> dict:
        """Everything needed to resume bit-identically: ``{"train_state", "sampler", "accountant", "step"}``.

        ``train_state`` is the pytree of arrays (save it with any checkpointer, e.g. ``jaxdp.train.checkpoint``
        or orbax); the rest is JSON. The noise keys live in the optimiser state, the sampler's position in
        ``sampler`` and the privacy spent in ``accountant``, so :meth:`load_state_dict` on a new object made with
        the same arguments continues with the same batches, the same noise and the same epsilon."""
        return {"format": _STATE_DICT_FORMAT, "train_state": state, "sampler": self.sampler.state_dict(),
                "accountant": self._accountant_dict(), "step": self._steps}

    def load_state_dict(self, state_dict: dict) -> TrainState:
        """Restore the sampler and accountant from :meth:`state_dict`'s output; returns the train state.

        Raises ``ValueError`` if the parts disagree on the step count (a damaged or forged checkpoint)."""
        state = state_dict["train_state"]
        if not isinstance(state, TrainState):
            state = TrainState(*state)
        step = int(state.step)
        problems = []
        if int(state_dict["sampler"]["step"]) != step:
            problems.append(f"sampler step {state_dict['sampler']['step']} vs train state step {step}")
        problems += self._load_accountant(state_dict.get("accountant"), step)
        if problems:
            raise ValueError(f"the state dict is inconsistent ({'; '.join(problems)}); refusing to resume from it")
        self.sampler.load_state_dict(state_dict["sampler"])
        self._steps = step
        return state

    # -- data ------------------------------------------------------------------------------------------------
    def load_batch(self, indices: np.ndarray, mask: np.ndarray,
                   load: Callable[[np.ndarray], PyTree]) -> tuple[PyTree, np.ndarray]:
        """``(batch, mask)`` for :meth:`step` from the sampler's global ``(indices, mask)`` of one step.

        One process: ``(load(indices), mask)``. Several processes: only this process's rows of the global
        batch, laid out over all devices (:func:`jaxdp.distributed.local_batch`), so ``load`` is called with the
        indices of this process's shard only."""
        if self.num_processes > 1 and self.private:
            from jaxdp.distributed import local_batch
            return local_batch(indices, mask, load)
        return load(indices), mask

    def batches(self, data: PyTree, steps: int | None = None) -> Iterator[tuple[PyTree, np.ndarray]]:
        """Yield ``(batch, mask)`` for the next ``steps`` sampler steps (default: the rest of the current epoch)
        from host arrays.

        Epoch ``k`` ends at step ``sampler.steps_for_epochs(k)`` (``ceil(k / q)`` for Poisson sampling), the
        definition ``epochs=`` of :meth:`PrivacyEngine.make_private_with_epsilon` plans with: looping
        ``for epoch in range(E): for batch, mask in private.batches(data)`` takes exactly the planned steps.
        With several processes each batch is this process's rows only (see :meth:`load_batch`).
        """
        self._check_data(data)
        steps = self.sampler.epoch_end(self.sampler.step) - self.sampler.step if steps is None else steps
        for _ in range(steps):
            idx, mask = self.sampler.sample(self.sampler.step)
            self.sampler.step += 1
            yield self.load_batch(idx, mask, lambda i: jax.tree_util.tree_map(lambda x: x[i], data))

    def _check_data(self, data: PyTree) -> None:
        """Before the first batch of a data set: it holds ``dataset_size`` examples (the sampler draws from
        ``0..N-1`` and the accountant assumes ``N``), and for a ``{"x": ..., "y": ...}`` dict the features are
        finite, integer labels are >= 0 and within the model's outputs, and the model accepts the examples."""
        leaves = jax.tree_util.tree_leaves(data)
        ident = tuple(id(leaf) for leaf in leaves)
        if ident == self._data_checked:
            return
        from jaxdp import validation
        from jaxdp.data import DataValidationError, check_features, check_labels
        sizes = sorted({int(np.shape(leaf)[0]) if np.ndim(leaf) else 0 for leaf in leaves})
        if sizes != [self.dataset_size]:
            raise DataValidationError(
                f"make_private(dataset_size={self.dataset_size}) but the data given to batches() has "
                f"{' / '.join(map(str, sizes)) or 'no'} examples: the sampler would draw indices from "
                f"0..{self.dataset_size - 1} (silently a subset, or an IndexError) and the accounting would be for "
                "the wrong N. Pass dataset_size=len(data) (every leaf's leading axis).")
        if isinstance(data, dict) and "x" in data:
            x = np.asarray(data["x"])
            check_features(x, "batches(data)", 'data["x"]')
            y = np.asarray(data["y"]) if "y" in data else None
            if y is not None and np.issubdtype(y.dtype, np.integer):
                check_labels(y, "batches(data)", 'data["y"]')
            if self._nnx_graph is not None:
                from jaxdp.engine import _rekeyed
                graphdef, rest = self._nnx_graph
                validation.check_model_fits_data(nnx.merge(graphdef, self._params0, _rekeyed(rest, None)), x, y,
                                                 source='batches(data)')
        self._data_checked = ident

    def model(self, state: TrainState) -> Any:
        """The NNX module with the state's parameters (NNX models only)."""
        if self._nnx_graph is None:
            raise ValueError("model() is for Flax NNX models; use state.params with your apply function")
        graphdef, rest = self._nnx_graph
        return nnx.merge(graphdef, state.params, rest)


class NonPrivateTraining(Training):
    """The non-private twin of :class:`~jaxdp.PrivateTraining` (:meth:`jaxdp.PrivacyEngine.make_nonprivate`):
    the same surface and lifecycle, for baselines. One step is plain gradient descent on the mean loss of the
    real examples, ``sum_i mask_i loss_i / E`` with ``E`` the sampler's expected batch size; no clipping, no
    noise, epsilon infinite. The ledger refuses it on protected data (``open_ledger``).

    Example::

        >>> import jax.numpy as jnp, numpy as np, optax, jaxdp
        >>> data = {"x": np.ones((8, 2), np.float32)}
        >>> run = jaxdp.PrivacyEngine().make_nonprivate(loss_fn=lambda p, b: (b["x"] @ p["w"] - 1.0) ** 2,
        ...     params={"w": jnp.zeros(2)}, optimizer=optax.sgd(0.1), dataset_size=8, batch_size=4, seed=0)
        >>> state = run.init()
        >>> for batch, mask in run.batches(data):
        ...     state, stats = run.step(state, batch, mask)
        >>> int(state.step), run.get_epsilon()
        (2, inf)
    """

    private = False

    def __init__(self, *, engine: Any, pure_loss: Callable, params: PyTree, optimizer: optax.GradientTransformation,
                 dataset_size: int, sampler: Any, planned_steps: int | None, nnx_graph: tuple | None,
                 defer_ledger: bool = False) -> None:
        self.engine = engine
        self.sampler = sampler
        self.dataset_size = dataset_size
        self.planned_steps = planned_steps
        self.noise_multiplier = 0.0
        self.l2_clip_norm = self.max_grad_norm = None
        self.adaptive = None
        self.max_steps = None
        self.target_epsilon = self.target_delta = None
        self.sample_rate = sampler.sample_rate
        self.expected_batch_size = float(sampler.expected_batch_size)
        self.num_processes = jax.process_count()
        self.loss_fn = pure_loss
        self._params0 = params
        self._nnx_graph = nnx_graph
        self._opt_init = optimizer.init
        self._init_lifecycle(defer_ledger)
        e = self.expected_batch_size

        def mean_loss(p, batch, mask):
            per_ex = pure_loss(p, batch)
            return jnp.sum(jnp.where(mask, per_ex, 0.0)) / e, per_ex

        @jax.jit
        def update(state, batch, mask):
            (_, per_ex), g = jax.value_and_grad(mean_loss, has_aux=True)(state.params, batch, mask)
            updates, opt_state = optimizer.update(g, state.opt_state, state.params)
            return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), per_ex

        self._update = update

    def ledger_events(self, steps: int) -> list[dict]:
        return [{"sampling": "none", "steps": int(steps)}]

    def events(self, steps: int) -> list[dict]:
        """The accounting events of ``steps`` non-private steps (epsilon infinite)."""
        return self.ledger_events(steps)

    @property
    def steps_taken(self) -> int:
        return self._steps

    def step(self, state: TrainState, batch: PyTree, mask: jax.Array) -> tuple[TrainState, NonPrivateStats]:
        """One non-private step on a sampled batch (with its padding mask)."""
        self._check_next_step()
        new_state, per_ex = self._update(state, batch, jnp.asarray(mask))
        self._took_step()
        return new_state, NonPrivateStats(per_ex)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Infinite: nothing protects the examples of a non-private run."""
        return float("inf")

    def clip_norm(self, state: TrainState) -> None:
        return None

    def privacy_record(self) -> dict:
        """The mechanism part of the run record: none (no target, no clipping, no accountant, no mechanism)."""
        return {"target_epsilon": None, "max_grad_norm": None, "accountant": None, "neighboring_relation": None,
                "mechanism": None, "bands": None}


def deprecated_ledger_false() -> None:
    from jaxdp._checks import JaxdpDeprecationWarning
    warnings.warn("make_private(ledger=False) is deprecated: pass defer_ledger=True and call "
                  "open_ledger(...) before the first step (the run is still gated: it refuses to step until then)",
                  JaxdpDeprecationWarning, stacklevel=3)


__all__ = ["Training", "NonPrivateTraining", "NonPrivateStats", "TrainState", "PrivacyBudgetExhausted"]
