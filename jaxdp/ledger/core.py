"""The privacy budget ledger: datasets with budgets, runs that reserve then commit their mechanisms.

State is never stored twice: every registration, reservation, commit and release is one row of the
append-only, hash-chained log (:mod:`jaxdp.ledger.store`), and the current state (budgets, runs, what is
spent) is recomputed from the log on every call. A row edited or deleted by hand is therefore either
detected by the chain (and every call refuses to go on) or has no effect.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from jaxdp._cli import jsonable  # the one JSON rule: inf -> "inf", NaN -> null
from jaxdp.accounting.event import ACCOUNTANTS, RELATIONS
from jaxdp.ledger import events as ev
from jaxdp.ledger.store import (LedgerError, LedgerIntegrityError, LedgerStoreError, Row, Store, canonical_payload,
                                init_meta, loads_payload, open_store, verify_rows)

_OPTIMISTIC_TRIES = 3  # reservations composed outside the write lock before one is composed under it
_EPS_TOL = 1e-9  # composed epsilons are compared to the budget with this slack (floating-point noise only)


class BudgetExceededError(LedgerError):
    """A reservation was refused: composing it with what is already spent would exceed a dataset's budget.

    Attributes: ``details`` (one dict per dataset that would be overspent: budget, spent, remaining, epsilon of
    the run alone and after it, and ``fits``: the steps / epochs / noise multiplier that would fit).
    """

    def __init__(self, message: str, details: list[dict]):
        super().__init__(message)
        self.details = details


class ReservationRequiredError(LedgerError):
    """Training on a protected dataset without a matching reservation, or non-privately, was refused."""


@dataclass
class DatasetBudget:
    dataset_id: str
    max_epsilon: float
    delta: float
    accountant: str
    neighboring_relation: str
    registered_at: str
    note: str | None = None


@dataclass
class RunRecord:
    run_id: str
    dataset_id: str
    charged: list[str]
    status: str  # "reserved" | "committed" | "released"
    planned_events: list[dict]
    actual_events: list[dict] | None
    model: str | None
    config_hash: str | None
    code_version: str | None
    parent_run_id: str | None
    reserved_at: str
    committed_at: str | None = None
    released_at: str | None = None
    release_reason: str | None = None
    user: str | None = None
    host: str | None = None
    run_epsilon: dict = field(default_factory=dict)  # per charged dataset: this run's own epsilon, as recorded
    pid: int | None = None  # process that made the reservation (on ``host``)

    @property
    def charge_events(self) -> list[dict]:
        """What counts against the budget: actual steps once committed, the reservation while open, nothing
        once released."""
        if self.status == "committed":
            return self.actual_events or []
        if self.status == "reserved":
            return self.planned_events
        return []


@dataclass
class Reservation:
    run_id: str
    dataset_id: str
    charged: list[str]
    events: list[dict]
    epsilon_after: dict[str, float]  # per charged dataset: composed epsilon including this reservation
    remaining_after: dict[str, float]
    parent_run_id: str | None = None
    seq: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BudgetSummary:
    dataset_id: str
    max_epsilon: float
    delta: float
    accountant: str
    epsilon: float            # composition of committed runs and open reservations (what counts)
    epsilon_committed: float  # composition of committed runs only
    plain_sum: float          # sum of each run's own epsilon (basic composition: valid, loose)
    remaining: float          # max_epsilon - epsilon
    runs_committed: int
    runs_reserved: int
    runs_released: int
    runs: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: jsonable(v) for k, v in asdict(self).items()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _who() -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = None
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid()}


def config_hash(config: Any) -> str:
    """Deprecated alias of :func:`jaxdp.train.config.config_hash`, the one config hash of jaxdp.

    It used to hash the raw config's JSON, which differed from the trainer's hash of the same config, so a run
    reserved with ``config_hash=config_hash(cfg)`` (as ``docs/ledger.md`` showed) was refused by the trainer as
    "reserved for another config"."""
    import warnings
    from jaxdp._checks import JaxdpDeprecationWarning
    warnings.warn("jaxdp.ledger.config_hash is deprecated: use jaxdp.train.config_hash (the trainer's hash, "
                  "which a reservation must record)", JaxdpDeprecationWarning,
                  stacklevel=2)
    from jaxdp.train.config import config_hash as _config_hash
    return _config_hash(config)


def code_version() -> str:
    """``jaxdp <version>`` plus the git commit of the working directory when there is one."""
    import subprocess

    import jaxdp
    out = f"jaxdp {jaxdp.__version__}"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(jaxdp.__file__)))
        if sha.returncode == 0 and sha.stdout.strip():
            out += f" (git {sha.stdout.strip()})"
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class _Forged(Exception):
    """A replayed row that the API would have refused."""


class _State:
    def __init__(self) -> None:
        self.datasets: dict[str, DatasetBudget] = {}
        self.runs: dict[str, RunRecord] = {}

    @classmethod
    def from_rows(cls, rows: list[Row]) -> _State:
        """Replay the log. Every transition the API itself would refuse is refused here too (a correctly
        hashed but forged row is still a forged row): one ``register`` per dataset; a run id is reserved once
        and then committed or released once; commits and releases name an open reservation; a reservation is
        charged only to datasets registered before it; ``init`` only as the first row."""
        st = cls()
        for r in rows:
            p = loads_payload(r)
            try:
                if r.kind == "register":
                    d = p["dataset_id"]
                    if d in st.datasets:
                        raise _Forged(f"dataset {d!r} is registered a second time (first registered "
                                      f"{st.datasets[d].registered_at}); a budget is registered once and never "
                                      "changed")
                    st.datasets[d] = DatasetBudget(
                        d, float(p["max_epsilon"]), float(p["delta"]), p["accountant"],
                        p["neighboring_relation"], r.ts, p.get("note"))
                elif r.kind == "reserve":
                    rid = p["run_id"]
                    if rid in st.runs:
                        raise _Forged(f"run id {rid!r} is reserved again (it is already {st.runs[rid].status}); "
                                      "a run id is used once")
                    unknown = [d for d in p["charged"] if d not in st.datasets]
                    if unknown:
                        raise _Forged(f"run {rid!r} is charged to {unknown}, which were not registered before it")
                    st.runs[rid] = RunRecord(
                        rid, p["dataset_id"], list(p["charged"]), "reserved", p["events"], None,
                        p.get("model"), p.get("config_hash"), p.get("code_version"), p.get("parent_run_id"),
                        r.ts, user=p.get("user"), host=p.get("host"), run_epsilon=_floats(p.get("run_epsilon")),
                        pid=p.get("pid"))
                elif r.kind in ("commit", "release"):
                    rid = p["run_id"]
                    run = st.runs.get(rid)
                    if run is None:
                        raise _Forged(f"{r.kind} of run {rid!r}, which was never reserved")
                    if run.status != "reserved":
                        raise _Forged(f"{r.kind} of run {rid!r}, which is already {run.status} (a reservation is "
                                      "committed or released once)")
                    if r.kind == "commit":
                        run.status, run.actual_events, run.committed_at = "committed", p["events"], r.ts
                        run.run_epsilon = _floats(p.get("run_epsilon"))
                    else:
                        run.status, run.released_at, run.release_reason = "released", r.ts, p["reason"]
                elif r.kind == "init":
                    if r.seq != 1:
                        raise _Forged("an init row after the first row")
                else:
                    raise _Forged(f"unknown row kind {r.kind!r}")
                if r.kind != "init" and r.run_id is not None and r.run_id != p.get("run_id"):
                    raise _Forged(f"the row's run_id column {r.run_id!r} differs from its payload's "
                                  f"{p.get('run_id')!r}")
            except _Forged as e:
                raise LedgerIntegrityError(f"row seq {r.seq} ({r.kind}) breaks the run lifecycle: {e}") from None
            except (KeyError, TypeError, ValueError) as e:
                raise LedgerIntegrityError(f"row seq {r.seq} ({r.kind}) cannot be read: {e!r}") from e
        return st

    def charged_runs(self, dataset_id: str) -> list[RunRecord]:
        return [r for r in self.runs.values() if dataset_id in r.charged]

    def prior_events(self, dataset_id: str) -> list[dict]:
        return [e for r in self.charged_runs(dataset_id) for e in r.charge_events]


class Ledger:
    """A privacy budget ledger in SQLite (a file) or PostgreSQL (a URL). See :mod:`jaxdp.ledger`."""

    def __init__(self, store: Store):
        self._store = store

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url_or_path: str | os.PathLike, *, create: bool = False) -> Ledger:
        """Open a ledger: a file path, ``sqlite:///relative.db``, ``sqlite:////abs.db`` or ``postgresql://...``.

        ``create=False`` (the default) refuses a missing SQLite file or a database without ledger tables, so
        that a mistyped path never silently starts an empty ledger (which would protect nothing).
        """
        if create:
            return cls.init(url_or_path)
        return cls(open_store(url_or_path, create=False))

    @classmethod
    def init(cls, url_or_path: str | os.PathLike, *, writer_role: str | None = None) -> Ledger:
        """Create a ledger (tables, triggers and its first row in one transaction) and open it. On an existing
        ledger: verify it and add any append-only trigger an older jaxdp did not create (idempotent).

        Never re-initialises a store that has lost its ledger: an existing SQLite file that is empty (0 bytes)
        or another database, and a ledger whose log is gone but whose head record remains, are refused with how
        to restore them (an empty ledger would give every dataset its whole budget back).

        ``writer_role`` (PostgreSQL): grant this separate role what trainers need (read, append, move the
        head) and nothing else; connect trainers as that role so that they cannot disable the triggers.
        """
        store = open_store(url_or_path, create=True)
        led = cls(store)
        existed = False
        try:
            with store.transaction(write=True) as tx:
                existed = store.has_ledger_tables(tx)
                if existed:
                    rows, head = store.read_rows(tx)
                    problems = verify_rows(rows, head)
                    if problems:
                        raise LedgerIntegrityError(
                            f"{store.url} is a ledger that fails verification ({problems[0]}); it was not "
                            "re-initialised. Run `jaxdp ledger verify`; restore from a backup or an export")
                else:
                    refusal = store.refuse_init(tx)
                    if refusal is not None:
                        raise refusal
                    for sql in store.ddl():
                        tx.execute(sql, ())
                    init_meta(tx)
                    rows = []
                if not rows:  # a new ledger (or one whose creation was interrupted before its first row)
                    store.append(tx, None, _now(), "init", None, None, canonical_payload({"created_by": _who()}))
            if existed:
                store.install_triggers()
            if writer_role:
                store.grant_writer(writer_role)
        except BaseException:
            store.close()
            raise
        return led

    @classmethod
    def restore(cls, url_or_path: str | os.PathLike, export: dict) -> Ledger:
        """Rebuild a lost ledger from a JSON export (:meth:`export`, `jaxdp ledger export`) into a new store: the
        rows are copied verbatim (same seq, timestamps, payloads and hashes), so the restored chain verifies and
        keeps its head hash. Refused unless the export's rows verify and replay, and unless the target holds no
        ledger yet (a new SQLite path, or a PostgreSQL schema without ledger tables)."""
        if not isinstance(export, dict) or export.get("format") != "jaxdp-ledger-export":
            raise LedgerError("not a jaxdp ledger export (expected the JSON written by `jaxdp ledger export`)")
        try:
            rows = [Row(**r) for r in export["log"]]
        except (KeyError, TypeError) as e:
            raise LedgerError(f"the export's rows cannot be read ({e!r})") from None
        if not rows:
            raise LedgerError("the export holds no rows")
        problems = verify_rows(rows, (rows[-1].seq, rows[-1].hash))
        if problems:
            raise LedgerIntegrityError(f"the export fails verification ({problems[0]}); not restored")
        _State.from_rows(rows)  # the lifecycle replays too
        store = open_store(url_or_path, create=True)
        try:
            with store.transaction(write=True) as tx:
                if store.has_ledger_tables(tx):
                    raise LedgerStoreError(f"{store.url} already holds a ledger; restore into a new path or schema")
                refusal = store.refuse_init(tx)
                if refusal is not None:
                    raise LedgerStoreError(f"{store.url} exists and is not a ledger; restore into a new path")
                for sql in store.ddl():
                    tx.execute(sql, ())
                init_meta(tx)
                for r in rows:
                    tx.execute("INSERT INTO ledger_log (seq, ts, kind, dataset_id, run_id, payload, prev_hash, hash) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (r.seq, r.ts, r.kind, r.dataset_id, r.run_id, r.payload, r.prev_hash, r.hash))
                last = rows[-1]   # rows is not empty (checked above)
                tx.execute("INSERT INTO ledger_head (id, seq, hash) VALUES (1, ?, ?)", (last.seq, last.hash))
        except BaseException:
            store.close()
            raise
        return cls(store)

    @property
    def url(self) -> str:
        return self._store.url

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def _read(self, strict: bool = True) -> tuple[list[Row], tuple | None, _State]:
        with self._store.transaction(write=False) as tx:
            rows, head = self._store.read_rows(tx)
        if strict:
            problems = verify_rows(rows, head)
            if problems:
                raise LedgerIntegrityError(
                    f"the ledger {self.url} fails verification ({len(problems)} problem(s), first: "
                    f"{problems[0]}); nothing was changed. Run `jaxdp ledger verify` for the full report and "
                    "restore from a backup or export")
        return rows, head, _State.from_rows(rows)

    def datasets(self) -> dict[str, DatasetBudget]:
        return self._read()[2].datasets

    def runs(self, dataset_id: str | None = None) -> list[RunRecord]:
        st = self._read()[2]
        return [r for r in st.runs.values() if dataset_id is None or dataset_id in r.charged]

    def run(self, run_id: str) -> RunRecord | None:
        return self._read()[2].runs.get(run_id)

    def is_protected(self, dataset_id: str) -> bool:
        """True when ``dataset_id`` is registered with a budget."""
        return dataset_id in self._read()[2].datasets

    def lineage(self, run_id: str | None) -> list[str]:
        """Protected datasets a run's model was (transitively, through ``parent_run_id``) trained on."""
        if run_id is None:
            return []
        st = self._read()[2]
        return sorted(_lineage(st, run_id))

    def spent(self, dataset_id: str) -> BudgetSummary:
        """What ``dataset_id``'s budget has spent: the composition of all committed runs and open
        reservations charged to it (``epsilon``), the committed part alone, the plain sum, and what remains."""
        st = self._read()[2]
        return _summary(st, dataset_id)

    def remaining(self, dataset_id: str) -> float:
        return self.spent(dataset_id).remaining

    # ------------------------------------------------------------------ writing
    def register_dataset(self, dataset_id: str, max_epsilon: float, delta: float, accountant: str = "prv", *,
                         neighboring_relation: str = "add_remove", note: str | None = None) -> DatasetBudget:
        """Protect ``dataset_id`` with a total budget ``(max_epsilon, delta)`` composed with ``accountant``.

        Registering again with the same numbers is a no-op; different numbers are refused (budgets are not
        edited in place: the history would no longer explain past decisions).
        """
        dataset_id = _check_id("dataset_id", dataset_id)
        max_epsilon = float(max_epsilon)
        delta = float(delta)
        if not (math.isfinite(max_epsilon) and max_epsilon > 0):
            raise ValueError(f"max_epsilon must be a finite number > 0, got {max_epsilon!r}")
        if not (0 < delta < 1):
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}; use delta well below 1/dataset_size")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if neighboring_relation not in RELATIONS:
            raise ValueError(f"neighboring_relation must be one of {RELATIONS}, got {neighboring_relation!r}")
        payload = {"dataset_id": dataset_id, "max_epsilon": max_epsilon, "delta": delta, "accountant": accountant,
                   "neighboring_relation": neighboring_relation, "note": note, **_who()}
        with self._store.transaction(write=True) as tx:
            rows, last, st = self._locked_state(tx)
            old = st.datasets.get(dataset_id)
            if old is not None:
                same = (old.max_epsilon, old.delta, old.accountant, old.neighboring_relation) == (
                    max_epsilon, delta, accountant, neighboring_relation)
                if same:
                    return old
                raise LedgerError(
                    f"dataset {dataset_id!r} is already registered with max_epsilon {old.max_epsilon}, delta "
                    f"{old.delta}, accountant {old.accountant}; a registered budget cannot be changed")
            row = self._store.append(tx, last, _now(), "register", dataset_id, None, canonical_payload(payload))
        return DatasetBudget(dataset_id, max_epsilon, delta, accountant, neighboring_relation, row.ts, note)

    def reserve(self, dataset_id: str, run_id: str, events: list[dict] | dict, *, model: str | None = None,
                config_hash: str | None = None, code_version: str | None = None,
                parent_run_id: str | None = None) -> Reservation:
        """Reserve a run's planned mechanism before its first step.

        The run is charged to ``dataset_id`` (when registered) and to every protected dataset its parent model
        was trained on (``parent_run_id``, transitively). For each of them the composition of everything
        already spent or reserved plus ``events`` must stay within the budget, otherwise
        :class:`BudgetExceededError` is raised (with what would fit) and nothing is recorded. Reserve, check and
        record are one transaction under the store's write lock, so concurrent reservations cannot overspend.
        """
        dataset_id = _check_id("dataset_id", dataset_id)
        run_id = _check_id("run_id", run_id)
        events = ev.normalize_events(events)

        def decide(st: _State):
            if run_id in st.runs:
                raise LedgerError(f"run id {run_id!r} is already in the ledger ({st.runs[run_id].status}); "
                                  "every run needs a new id")
            charged = set(_lineage(st, parent_run_id)) if parent_run_id else set()
            if dataset_id in st.datasets:
                charged.add(dataset_id)
            eps_after, remaining_after, run_eps, refused = {}, {}, {}, []
            for d in sorted(charged):
                b = st.datasets[d]
                prior = st.prior_events(d)
                eps = ev.compose(prior + events, b.delta, b.accountant, b.neighboring_relation)
                run_eps[d] = ev.compose(events, b.delta, b.accountant, b.neighboring_relation)
                eps_after[d], remaining_after[d] = eps, b.max_epsilon - eps
                if not eps <= b.max_epsilon + _EPS_TOL:
                    refused.append({"dataset_id": d, "budget": b, "prior": prior, "epsilon_after": eps,
                                    "inherited": d != dataset_id})
            return charged, eps_after, remaining_after, run_eps, refused

        # Compose outside the write lock (the accountant can take seconds), then re-check under the lock: when
        # no other writer appended meanwhile, every composition is a cache hit and the lock is held for
        # milliseconds. A few retries when others did; the last attempt composes under the lock.
        for attempt in range(_OPTIMISTIC_TRIES + 1):
            rows_seen = self._read()[0]
            decide(_State.from_rows(rows_seen))
            with self._store.transaction(write=True) as tx:
                rows, last, st = self._locked_state(tx)
                if len(rows) != len(rows_seen) and attempt < _OPTIMISTIC_TRIES:
                    continue  # someone appended while we composed: compose again outside the lock
                charged, eps_after, remaining_after, run_eps, refused = decide(st)
                if not refused:
                    payload = {"run_id": run_id, "dataset_id": dataset_id, "charged": sorted(charged),
                               "events": events, "model": model, "config_hash": config_hash,
                               "code_version": code_version, "parent_run_id": parent_run_id,
                               "parent_known": parent_run_id in st.runs if parent_run_id else None,
                               "epsilon_after": eps_after, "run_epsilon": run_eps, **_who()}
                    row = self._store.append(tx, last, _now(), "reserve", dataset_id, run_id,
                                             canonical_payload(payload))
                break
        if refused:  # the transaction is over: work out what would fit without holding the lock
            raise _budget_error(run_id, events, refused)
        return Reservation(run_id, dataset_id, sorted(charged), events, eps_after, remaining_after,
                           parent_run_id, row.seq)

    def commit(self, run_id: str, events_actual: list[dict] | dict | None = None) -> dict:
        """Record the steps a reserved run actually took (``None``: exactly as reserved).

        The truth is always recorded, even if it exceeds the reservation or the budget (the data were
        touched); the returned dict then says so (``exceeds_reservation``, ``over_budget``).
        """
        run_id = _check_id("run_id", run_id)
        with self._store.transaction(write=True) as tx:
            rows, last, st = self._locked_state(tx)
            run = _open_run(st, run_id, "commit")
            actual = run.planned_events if events_actual is None else ev.normalize_events(events_actual)
            eps_after, over, exceeds, run_eps = {}, [], False, {}
            for d in run.charged:
                b = st.datasets[d]
                prior = [e for r in st.charged_runs(d) if r.run_id != run_id for e in r.charge_events]
                eps_after[d] = ev.compose(prior + actual, b.delta, b.accountant, b.neighboring_relation)
                if eps_after[d] > b.max_epsilon + _EPS_TOL:
                    over.append(d)
                run_planned = ev.compose(run.planned_events, b.delta, b.accountant, b.neighboring_relation)
                run_actual = ev.compose(actual, b.delta, b.accountant, b.neighboring_relation)
                exceeds = exceeds or run_actual > run_planned + _EPS_TOL
                run_eps[d] = run_actual
            payload = {"run_id": run_id, "events": actual, "epsilon_after": eps_after, "run_epsilon": run_eps,
                       "exceeds_reservation": exceeds, "over_budget": over, **_who()}
            row = self._store.append(tx, last, _now(), "commit", run.dataset_id, run_id, canonical_payload(payload))
        return {"run_id": run_id, "seq": row.seq, "charged": run.charged, "events": actual,
                "epsilon_after": eps_after, "exceeds_reservation": exceeds, "over_budget": over}

    def release(self, run_id: str, reason: str) -> dict:
        """Free the reservation of a run that never ran (or crashed before touching data), with a recorded reason.

        A run that did take steps must be committed with those steps instead: releasing it would hide privacy
        loss that happened. Committed runs cannot be released.
        """
        run_id = _check_id("run_id", run_id)
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("release needs a reason (it is recorded in the ledger), e.g. "
                             "'crashed before the first step (OOM at compile)'")
        with self._store.transaction(write=True) as tx:
            rows, last, st = self._locked_state(tx)
            run = _open_run(st, run_id, "release")
            payload = {"run_id": run_id, "reason": reason.strip(), **_who()}
            row = self._store.append(tx, last, _now(), "release", run.dataset_id, run_id, canonical_payload(payload))
        return {"run_id": run_id, "seq": row.seq, "released": True, "reason": reason.strip(), "charged": run.charged}

    def _locked_state(self, tx) -> tuple[list[Row], Row | None, _State]:
        rows, head = self._store.read_rows(tx)
        problems = verify_rows(rows, head)
        if problems:
            raise LedgerIntegrityError(
                f"the ledger {self.url} fails verification ({problems[0]}; {len(problems)} problem(s)); "
                "nothing was written. Run `jaxdp ledger verify` and restore from a backup or export")
        return rows, (rows[-1] if rows else None), _State.from_rows(rows)

    # ------------------------------------------------------------------ integrity and export
    def verify(self, expected_head: str | None = None) -> dict:
        """Check the hash chain: every row's hash, every link, contiguous ``seq``, the head record, that every
        row parses, and (optionally) that the chain still contains ``expected_head`` -- a head hash you kept
        elsewhere (`jaxdp ledger show` prints it), which detects even a rewrite of the whole chain up to that
        point."""
        with self._store.transaction(write=False) as tx:
            rows, head = self._store.read_rows(tx)
        problems = verify_rows(rows, head)
        try:
            _State.from_rows(rows)
        except LedgerIntegrityError as e:
            problems.append(str(e))
        if expected_head is not None and expected_head not in {r.hash for r in rows}:
            problems.append(f"expected head {expected_head[:16]}... is not in the chain "
                            "(history up to it was rewritten or deleted)")
        return {"ok": not problems, "rows": len(rows), "head_seq": rows[-1].seq if rows else 0,
                "head_hash": rows[-1].hash if rows else None, "problems": problems, "ledger": self.url}

    def history(self) -> list[dict]:
        with self._store.transaction(write=False) as tx:
            rows, _ = self._store.read_rows(tx)
        return [r.as_dict() for r in rows]

    def export(self) -> dict:
        """Everything, JSON-able: the raw hash-chained rows (to re-verify elsewhere), the verification report,
        and the derived budgets and runs. Works on a ledger that fails verification (to salvage it)."""
        report = self.verify()
        rows = self.history()
        out: dict[str, Any] = {"format": "jaxdp-ledger-export", "version": 1, "exported_at": _now(),
                               "verify": report, "log": rows}
        try:
            st = _State.from_rows([Row(**r) for r in rows])
            out["datasets"] = {d: _summary(st, d).as_dict() for d in st.datasets}
            out["runs"] = [asdict(r) for r in st.runs.values()]
        except LedgerError as e:
            out["datasets"], out["runs"], out["state_error"] = None, None, str(e)
        return out

    def summary(self) -> dict:
        rows, head, st = self._read()
        return {"ledger": self.url, "head_seq": rows[-1].seq if rows else 0,
                "head_hash": rows[-1].hash if rows else None,
                "datasets": {d: _summary(st, d).as_dict() for d in st.datasets},
                "unprotected_runs": [asdict(r) for r in st.runs.values() if not r.charged]}


def _floats(d) -> dict:
    return {k: (math.inf if v == "inf" else float(v)) for k, v in (d or {}).items()}


def _check_id(name: str, value: Any) -> str:
    """Ids are printed by `show` and in messages: refuse control characters (newlines, ANSI escapes) that could
    forge lines there, and absurd lengths."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    import unicodedata
    bad = sorted({c for c in value if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    if bad:
        raise ValueError(f"{name} {value!r} contains control characters {[hex(ord(c)) for c in bad]}; use "
                         "printable characters only")
    if len(value) > 256:
        raise ValueError(f"{name} is {len(value)} characters long; at most 256")
    return value


def _lineage(st: _State, run_id: str) -> set[str]:
    """Protected datasets charged to ``run_id`` (its reservation already includes its own ancestors')."""
    out: set[str] = set()
    seen: set[str] = set()
    rid: str | None = run_id
    while rid is not None and rid in st.runs and rid not in seen:
        seen.add(rid)
        run = st.runs[rid]
        out |= set(run.charged)
        rid = run.parent_run_id
    return out


def _process_alive(host: str | None, pid: int | None) -> bool | None:
    """Whether the process that made a reservation still runs: True / False on this host, None (unknown) for
    another host or an unrecorded pid. (A pid can be reused by an unrelated process: True is a hint.)"""
    if host is None or pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True if not isinstance(pid, bool) else None
    return True


def _open_run(st: _State, run_id: str, what: str) -> RunRecord:
    run = st.runs.get(run_id)
    if run is None:
        raise LedgerError(f"cannot {what} run {run_id!r}: it has no reservation in the ledger")
    if run.status != "reserved":
        extra = (" (a committed run touched the data; its privacy loss stays)" if run.status == "committed"
                 else "")
        raise LedgerError(f"cannot {what} run {run_id!r}: it is already {run.status}{extra}")
    return run


def _summary(st: _State, dataset_id: str) -> BudgetSummary:
    b = st.datasets.get(dataset_id)
    if b is None:
        raise LedgerError(f"dataset {dataset_id!r} is not registered in the ledger; register it with "
                          "`jaxdp ledger init --dataset-id ID --max-epsilon E --delta D`")
    runs = st.charged_runs(dataset_id)
    comp = lambda evs: ev.compose(evs, b.delta, b.accountant, b.neighboring_relation)  # noqa: E731
    eps_total = comp([e for r in runs for e in r.charge_events])
    eps_committed = comp([e for r in runs if r.status == "committed" for e in r.charge_events])
    per_run: list[dict[str, Any]] = []
    for r in runs:
        # each run's own epsilon as recorded at reserve/commit time (no accountant call); computed if absent
        own = 0.0 if r.status == "released" else r.run_epsilon.get(dataset_id)
        per_run.append({"run_id": r.run_id, "status": r.status,
                        "epsilon": comp(r.charge_events) if own is None else own,
                        "steps": ev.total_steps(r.charge_events), "model": r.model, "parent_run_id": r.parent_run_id,
                        "inherited": r.dataset_id != dataset_id, "reserved_at": r.reserved_at,
                        "user": r.user, "host": r.host, "pid": r.pid,
                        "alive": _process_alive(r.host, r.pid) if r.status == "reserved" else None,
                        "release_reason": r.release_reason})
    plain = sum(p["epsilon"] for p in per_run if p["status"] != "released")
    count = lambda s: sum(r.status == s for r in runs)  # noqa: E731
    return BudgetSummary(dataset_id, b.max_epsilon, b.delta, b.accountant, eps_total, eps_committed, plain,
                         b.max_epsilon - eps_total, count("committed"), count("reserved"), count("released"),
                         per_run)


def _budget_error(run_id: str, events: list[dict], refused: list[dict]) -> BudgetExceededError:
    details, lines = [], []
    for r in refused:
        b: DatasetBudget = r["budget"]
        spent = ev.compose(r["prior"], b.delta, b.accountant, b.neighboring_relation)
        alone = ev.compose(events, b.delta, b.accountant, b.neighboring_relation)
        fits = ev.suggest(r["prior"], events, b.max_epsilon, b.delta, b.accountant, b.neighboring_relation)
        d = {"dataset_id": b.dataset_id, "max_epsilon": b.max_epsilon, "delta": b.delta, "accountant": b.accountant,
             "spent": spent, "remaining": b.max_epsilon - spent, "run_epsilon": alone,
             "epsilon_after": r["epsilon_after"], "inherited": r["inherited"], "fits": fits}
        details.append(jsonable(d))
        why = " (inherited: the parent model was trained on it)" if r["inherited"] else ""
        line = (f"dataset {b.dataset_id!r}{why}: budget epsilon {b.max_epsilon:g} at delta {b.delta:g} "
                f"({b.accountant}); already spent {spent:.4g}, remaining {b.max_epsilon - spent:.4g}; this run "
                f"alone {alone:.4g}, composed {r['epsilon_after']:.4g} > {b.max_epsilon:g}.")
        if not ev.is_private(events):
            line += " A non-private run (sampling 'none') can never be charged to a protected dataset."
        elif fits["fraction_of_steps"] <= 0 and fits["min_noise_multiplier"] is None:
            line += " Nothing fits: the budget is exhausted."
        else:
            opts = []
            one = lambda xs: xs[0] if len(xs) == 1 else xs  # noqa: E731 - scalars for one-event runs
            if fits["fraction_of_steps"] > 0:
                ep = [x for x in fits["max_epochs"] if x is not None]
                opts.append(f"fewer steps: at most {one(fits['max_steps'])} steps"
                            + (f" (~{one(ep)} epochs)" if ep else "") + " at the same noise multiplier")
            if fits["min_noise_multiplier"]:
                opts.append(f"a larger noise multiplier >= {one(fits['min_noise_multiplier'])} for the planned "
                            "steps")
            line += " Would fit: " + ", or ".join(opts) + "."
        lines.append(line)
    msg = f"reservation for run {run_id!r} refused: " + " ".join(lines)
    return BudgetExceededError(msg, details)


def require_reservation(ledger: Ledger | str | os.PathLike | None, dataset_id: str, run_id: str,
                        private: bool = True, *, parent_run_id: str | None = None) -> RunRecord | None:
    """The trainer's gate, called before its first step. Raises :class:`ReservationRequiredError` when

    * the run is non-private (``private=False``) and ``dataset_id`` is protected, or the parent model was
      trained on a protected dataset (fine-tuning is charged to it);
    * ``dataset_id`` (or the parent's lineage) is protected and ``run_id`` has no open reservation charging it.

    Returns the run's record (or ``None`` when nothing is protected and there is no reservation; with
    ``ledger=None`` nothing is checked).
    """
    if ledger is None:
        return None
    if not isinstance(ledger, Ledger):
        ledger = Ledger.open(ledger)
    st = ledger._read()[2]
    needed = set(_lineage(st, parent_run_id)) if parent_run_id else set()
    if dataset_id in st.datasets:
        needed.add(dataset_id)
    run = st.runs.get(run_id)
    if not needed:
        return run
    names = ", ".join(repr(d) for d in sorted(needed))
    if not private:
        raise ReservationRequiredError(
            f"refused: a non-private run on {names} (protected by the privacy ledger {ledger.url}"
            + (f", inherited from parent run {parent_run_id!r}" if parent_run_id and needed - {dataset_id} else "")
            + "). Train with DP (a noise multiplier > 0) and reserve the budget first")
    hint = (f"reserve first: `jaxdp ledger reserve --ledger {ledger.url} --dataset-id {dataset_id} --run-id {run_id} "
            "--noise-multiplier S --sample-rate Q --steps T` (or Ledger.reserve)")
    if run is None:
        raise ReservationRequiredError(f"refused: {names} is protected by the privacy ledger {ledger.url} and run "
                                       f"{run_id!r} has no reservation; {hint}")
    if run.status != "reserved":
        raise ReservationRequiredError(f"refused: run {run_id!r} is already {run.status} in the ledger; a new "
                                       f"run needs a new id and its own reservation; {hint}")
    missing = needed - set(run.charged)
    if missing:
        raise ReservationRequiredError(
            f"refused: run {run_id!r}'s reservation is not charged to {sorted(missing)} (protected"
            + (f"; the parent model {parent_run_id!r} was trained on it" if parent_run_id else "")
            + f"); reserve again with --dataset-id {dataset_id}"
            + (f" and --parent-run-id {parent_run_id}" if parent_run_id else ""))
    if parent_run_id is not None and run.parent_run_id != parent_run_id:
        raise ReservationRequiredError(f"refused: run {run_id!r} was reserved with parent_run_id "
                                       f"{run.parent_run_id!r}, but trains from {parent_run_id!r}")
    return run

