"""The one ledger gate of a training run: reserve (or adopt) the run's reservation, never step beyond it, commit
the steps taken.

Every way of training -- :meth:`jaxdp.PrivacyEngine.make_private` (adaptive clipping included),
:meth:`~jaxdp.PrivacyEngine.make_nonprivate`, ``jaxdp train`` and :func:`jaxdp.lm.finetune` -- goes through
:class:`LedgerGate`:

1. **open** (before the first step): match the run with its ledger record. A committed run is done (refused,
   unless it is complete with exactly the committed steps); a released reservation no longer covers it; a
   reservation made for another config is refused. A run with no record on protected data reserves its planned
   steps when asked (``reserve=True``), and is otherwise refused (:func:`jaxdp.ledger.require_reservation`:
   also every non-private run on protected data). A complete run whose reservation is still open (killed between
   its last step and its commit) commits the steps it took.
2. **check** (before every step): the reservation covers ``limit`` steps of the run's mechanism; step
   ``limit + 1`` raises :class:`~jaxdp.PrivacyBudgetExhausted` before touching the data. When the reservation's
   events are exactly the run's mechanism, ``limit`` is the reserved step count; otherwise it is the largest
   number of the run's steps whose epsilon, on every charged dataset, stays within the reservation's.
3. **commit** (after the last step): record the steps actually taken.

Privacy meaning: a run never releases more than its reservation accounts for, so the ledger's composed epsilon
(committed runs plus open reservations) is always an upper bound on what was released.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable, Sequence

from jaxdp.ledger import events as ev
from jaxdp.ledger.core import Ledger, RunRecord, code_version, require_reservation

EventsFn = Callable[[int], list[dict]]
_TOL = 1e-9


class RunStateError(ValueError):
    """The output directory, its checkpoint and the ledger disagree about the run; the message says what to do."""


def _mechanism(events: list[dict]) -> list[dict]:
    """The events without their step counts and record-only fields (what must match to count steps)."""
    return [{k: v for k, v in e.items() if k not in ("steps", "l2_clip_norm")} for e in ev.normalize_events(events)]


class LedgerGate:
    """An open run in a privacy ledger. Build it with :meth:`open`; ``None`` stands for "no ledger".

    Attributes:
      ledger: the :class:`~jaxdp.ledger.Ledger`; run_id, dataset_id: the run and its dataset.
      record: the run's :class:`~jaxdp.ledger.RunRecord` after :meth:`open` (None: nothing is reserved).
      limit: the steps the open reservation covers (None: no reservation, nothing to stop at).
      protected: the run is charged to a protected dataset (its own, or through ``parent_run_id``).
      dataset_protected: ``dataset_id`` itself is protected.

    Example::

        >>> import tempfile, os
        >>> from jaxdp.ledger import Ledger
        >>> path = os.path.join(tempfile.mkdtemp(), "l.db")
        >>> led = Ledger.open(path, create=True)
        >>> led.register_dataset("d", max_epsilon=3.0, delta=1e-5, accountant="rdp")  # doctest: +ELLIPSIS
        DatasetBudget(...)
        >>> mech = lambda n: [{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": n}]
        >>> gate = LedgerGate.open(led, dataset_id="d", run_id="r1", events=mech, planned_steps=100, reserve=True)
        >>> gate.limit
        100
        >>> gate.refusal(100)
        "run 'r1': its ledger reservation covers 100 steps of this mechanism; step 101 would go beyond it"
        >>> gate.commit(100).status
        'committed'
    """

    def __init__(self, ledger: Ledger, dataset_id: str, run_id: str, events: EventsFn, *, private: bool,
                 record: RunRecord | None, protected: bool, dataset_protected: bool) -> None:
        self.ledger, self.dataset_id, self.run_id = ledger, dataset_id, run_id
        self.events, self.private = events, private
        self.record, self.protected, self.dataset_protected = record, protected, dataset_protected
        self.limit = self._limit() if record is not None and record.status == "reserved" else None

    # -- open ----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, ledger: Any, *, dataset_id: str | None, run_id: str | None, events: EventsFn,
             private: bool = True, planned_steps: int | None = None, steps_done: int = 0, complete: bool = False,
             parent_run_id: str | None = None, reserve: bool = False, model: str | None = None,
             config_hash: str | None = None, accept_config_hashes: Sequence[str] = (), where: str | None = None,
             log: Callable[[str], Any] | None = None) -> LedgerGate | None:
        """Reconcile the run with the ledger (see the module docstring) and return its gate.

        Args:
          ledger: a :class:`~jaxdp.ledger.Ledger`, a path or URL; ``None`` reads ``$JAXDP_LEDGER``; no ledger at
            all returns ``None`` (nothing to gate).
          events: ``events(n)``: the run's mechanism for ``n`` steps (what is reserved and committed).
          planned_steps: the steps to reserve with ``reserve=True``.
          steps_done, complete: the steps the run already took (a resumed run) and whether it is finished.
          config_hash: the run's config hash, recorded on a new reservation; an existing reservation recorded
            with another hash is refused, unless that hash is in ``accept_config_hashes`` (other computations of
            the same config's hash, e.g. :func:`jaxdp.train.config.config_hashes`' legacy one).
          where: names the run's checkpoint in messages (e.g. its output directory).
          log: called with a line when something is done on the run's behalf (a late commit).

        Raises:
          ReservationRequiredError: protected data and no reservation covering this run (or a non-private run).
          BudgetExceededError: ``reserve=True`` and the plan does not fit the budget.
          RunStateError: the run is committed or released in the ledger, or reserved for another config.
          ValueError: a ledger without ``dataset_id`` / ``run_id``.
        """
        source = ledger if ledger is not None else os.environ.get("JAXDP_LEDGER")
        if source is None or source is False or source == "":
            return None
        if dataset_id is None or run_id is None:
            raise ValueError("with a privacy ledger, training needs dataset_id= and run_id= (the run's "
                             "reservation); see jaxdp.ledger")
        led = source if isinstance(source, Ledger) else Ledger.open(source)
        run = led.run(run_id)
        where = where or "the run"
        if run is not None and run.status == "committed":
            done = ev.total_steps(run.actual_events or [])
            if not (complete and done == steps_done):
                raise RunStateError(
                    f"run {run_id!r} is already committed in the ledger with {done} steps, but {where}'s "
                    + (f"checkpoint is at step {steps_done}" if steps_done else "run has no checkpoint")
                    + "; refusing to train it again under the same id. Use another output.dir, or --fresh for a "
                    "new run")
        elif run is not None and run.status == "released":
            raise RunStateError(
                f"run {run_id!r}'s reservation was released ({run.release_reason!r}); it no longer covers this "
                "run. Use another output.dir, or --fresh to start a new run with its own reservation")
        if (run is not None and run.config_hash and config_hash
                and run.config_hash not in (config_hash, *accept_config_hashes)):
            raise RunStateError(f"run {run_id!r} was reserved for another config (hash {run.config_hash[:12]}); "
                                "use another run id or output.dir")
        dataset_protected = led.is_protected(dataset_id)
        protected = dataset_protected or bool(parent_run_id)
        if run is None and protected and private and reserve:
            if planned_steps is None:
                raise ValueError("reserve=True needs the planned number of steps (make_private(epochs=...))")
            led.reserve(dataset_id, run_id, events(int(planned_steps)), model=model, config_hash=config_hash,
                        code_version=code_version(), parent_run_id=parent_run_id)
            from jaxdp.train.lifecycle import fault_point
            fault_point("after_reserve")
            run = led.run(run_id)
        gate = cls(led, dataset_id, run_id, events, private=private, record=run, protected=protected,
                   dataset_protected=dataset_protected)
        if complete:
            if gate.reserved:
                if log is not None:
                    log(f"run {run_id!r} finished at step {steps_done} but its ledger reservation was still open "
                        "(interrupted before the commit): committing the steps taken now")
                gate.commit(steps_done)
            return gate
        require_reservation(led, dataset_id, run_id, private=private, parent_run_id=parent_run_id)
        return gate

    # -- check -----------------------------------------------------------------------------------------------
    @property
    def reserved(self) -> bool:
        """The run holds an open reservation (it is charged, and will be committed)."""
        return self.record is not None and self.record.status == "reserved"

    def _limit(self) -> int | None:
        record = self.record
        if record is None or not self.private:
            return None
        reserved = record.planned_events
        if _mechanism(reserved) == _mechanism(self.events(1)):
            return ev.total_steps(reserved)
        budgets = [self.ledger.datasets()[d] for d in record.charged]
        if not budgets:
            return None  # nothing charged: the reservation protects nothing, and there is no epsilon to compare

        def fits(n: int) -> bool:
            return all(ev.compose(self.events(n), b.delta, b.accountant, b.neighboring_relation)
                       <= ev.compose(reserved, b.delta, b.accountant, b.neighboring_relation) * (1 + _TOL) + _TOL
                       for b in budgets)

        lo, hi = 0, max(1, ev.total_steps(reserved))
        while fits(hi):
            lo, hi = hi, 2 * hi
            if hi > ev.MAX_STEPS:
                return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def refusal(self, steps_done: int) -> str | None:
        """Why step ``steps_done + 1`` must not be taken (None: it is covered)."""
        if self.limit is None or steps_done < self.limit:
            return None
        return (f"run {self.run_id!r}: its ledger reservation covers {self.limit} steps of this mechanism; "
                f"step {steps_done + 1} would go beyond it")

    # -- commit ----------------------------------------------------------------------------------------------
    def commit(self, steps: int) -> RunRecord | None:
        """Record the ``steps`` actually taken when the run holds an open reservation; returns the committed
        record (None: nothing was open, nothing was written)."""
        if not self.reserved:
            return None
        self.ledger.commit(self.run_id, self.events(int(steps)))
        self.record = self.ledger.run(self.run_id)
        return self.record

    def remaining(self) -> float | None:
        """The budget left on ``dataset_id`` (None when it is not protected)."""
        return self.ledger.remaining(self.dataset_id) if self.dataset_protected else None


__all__ = ["LedgerGate", "RunStateError"]
