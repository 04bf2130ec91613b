"""Privacy budget ledger: every run that touches a protected dataset is charged to its budget.

A dataset is registered with a total budget ``(max_epsilon, delta)`` and an accountant. Each run *reserves*
its planned mechanism (dp-accounting events: sampling, noise multiplier, sample rate, steps, clip norm)
before its first step, and *commits* the steps it actually took at the end. The spent epsilon of a dataset is
the composition of all its committed runs and open reservations with the dataset's accountant (tight); the
plain sum of per-run epsilons (basic composition, loose) is shown beside it. A crashed run's reservation keeps
counting until it is explicitly released with a recorded reason.

History is an append-only, hash-chained log in SQLite (a file; default) or PostgreSQL (a URL, for teams).
Reservations are checked and recorded under the store's write lock, so concurrent runs cannot overspend.
See ``docs/ledger.md``.

API for the trainer and :class:`~jaxdp.engine.PrivacyEngine` (enforcement hooks)::

    from jaxdp.ledger import Ledger, require_reservation, BudgetExceededError, ReservationRequiredError

    led = Ledger.open(url_or_path)            # "runs/ledger.db", "sqlite:////abs/l.db", "postgresql://u@h/db"
                                              # missing file / no tables -> LedgerStoreError (use create=True
                                              # or Ledger.init(path) to create one)
    led.register_dataset("mnist", max_epsilon=8.0, delta=1e-5, accountant="prv")
    led.is_protected("mnist") -> bool
    res = led.reserve("mnist", run_id, events, model="cnn", config_hash=jaxdp.train.config_hash(cfg),
                      code_version=code_version(), parent_run_id=None)   # -> Reservation
          # raises BudgetExceededError(.details: budget, spent, remaining, run epsilon, what fits)
    # trainer, before its first step (also pass parent_run_id when fine-tuning):
    require_reservation(led, dataset_id, run_id, private=True, parent_run_id=None)
          # raises ReservationRequiredError: protected dataset (or parent lineage) and no open reservation
          # charging it, or a non-private run on a protected dataset
    led.commit(run_id, events_actual)          # the steps actually taken (None: as reserved)
    led.release(run_id, reason)                # free a reservation whose run never touched the data
    led.spent("mnist") -> BudgetSummary        # .epsilon (composed), .plain_sum, .remaining,
                                               # .epsilon_committed, runs_reserved/committed/released, .runs
    led.remaining("mnist") -> float
    led.lineage(run_id) -> [protected datasets the run's model was trained on, transitively]
    led.verify(expected_head=None) -> {"ok", "rows", "head_hash", "problems"}   # replays the run lifecycle too
    led.export() -> JSON-able dict
    Ledger.restore(new_url_or_path, export_dict)   # rebuild a lost ledger from an export (rows verbatim)
    Ledger.init(pg_url, writer_role="jaxdp_writer")  # PostgreSQL: trainers connect as a non-owner role

Event dicts (the :func:`jaxdp.accounting.events_epsilon` format; ``l2_clip_norm`` is recorded, not
accounted)::

    {"sampling": "poisson", "noise_multiplier": 1.1, "sample_rate": 0.004, "steps": 14063, "l2_clip_norm": 1.0}
    {"sampling": "shuffle", "noise_multiplier": s, "batch_size": b, "dataset_size": n, "steps": T}
    {"sampling": "truncated_poisson", "noise_multiplier": s, "sample_rate": q, "max_batch_size": m,
     "dataset_size": n, "steps": T}
    {"sampling": "none", "steps": T}          # non-private: refused on a protected dataset

Fine-tuning: a run reserved with ``parent_run_id`` is charged to every protected dataset its parent was
charged to (transitively), in addition to its own dataset. This is conservative: by post-processing a
fine-tune on disjoint data adds no loss to the parent's data, but the ledger cannot check disjointness.

``jaxdp.ledger.config_hash`` is a deprecated alias of :func:`jaxdp.train.config_hash` (the trainer's hash, which
a reservation for a ``jaxdp train`` run must record).

All errors derive from :class:`LedgerError` (a ``ValueError``). Nothing is written when one is raised.
"""
from jaxdp.ledger.core import (BudgetExceededError, BudgetSummary, DatasetBudget, Ledger, Reservation,
                               ReservationRequiredError, RunRecord, code_version, config_hash,
                               require_reservation)
from jaxdp.ledger.events import normalize_events
from jaxdp.ledger.store import LedgerError, LedgerIntegrityError, LedgerStoreError

__all__ = [
    "Ledger", "require_reservation", "config_hash", "code_version", "normalize_events",
    "BudgetSummary", "DatasetBudget", "Reservation", "RunRecord",
    "LedgerError", "BudgetExceededError", "ReservationRequiredError", "LedgerIntegrityError", "LedgerStoreError",
]
