"""The ledger under faults: forged-but-hashed rows, lost files and schemas, hostile ids and inputs, stale
reservations, slow reservations (SQLite and a real PostgreSQL server, tests/ledger_pg.py)."""
from __future__ import annotations

import json
import os
import sqlite3
import sys

import pytest

from jaxdp.ledger import Ledger, LedgerError, LedgerIntegrityError, LedgerStoreError
from jaxdp.ledger.store import canonical_payload

sys.path.insert(0, os.path.dirname(__file__))
from ledger_pg import pg_server, pg_url  # noqa: E402,F401  (pytest fixtures)

DELTA = 1e-5


def ev(steps, sigma=1.1, q=0.01):
    return {"sampling": "poisson", "noise_multiplier": sigma, "sample_rate": q, "steps": steps}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


def _append_hashed(led: Ledger, kind: str, dataset_id, run_id, payload: dict) -> int:
    """Append a correctly hashed row (and move the head), as someone with write access could."""
    with led._store.transaction(write=True) as tx:
        rows, _ = led._store.read_rows(tx)
        row = led._store.append(tx, rows[-1], "2026-01-01T00:00:00.000000+00:00", kind, dataset_id, run_id,
                                canonical_payload(payload))
    return row.seq


FORGERIES = {
    # a release after a commit would give the spent epsilon back
    "release_after_commit": ("release", "d", "a", {"run_id": "a", "reason": "oops"}),
    # a second register would raise the budget from 3 to 100
    "second_register": ("register", "d", None, {"dataset_id": "d", "max_epsilon": 100.0, "delta": DELTA,
                                                "accountant": "rdp", "neighboring_relation": "add_remove"}),
    # a reserve reusing a committed run id would replace its committed steps
    "reuse_run_id": ("reserve", "d", "a", {"run_id": "a", "dataset_id": "d", "charged": ["d"],
                                           "events": [ev(1)]}),
    "commit_never_reserved": ("commit", "d", "zz", {"run_id": "zz", "events": [ev(1)]}),
    "charged_unregistered": ("reserve", "d", "b", {"run_id": "b", "dataset_id": "d", "charged": ["d", "other"],
                                                   "events": [ev(1)]}),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_replay_refuses_a_hashed_row_the_api_would_refuse(url, forgery):
    led = Ledger.init(url)
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.reserve("d", "a", [ev(300)])
    led.commit("a")
    head = led.verify()["head_hash"]
    kind, d, rid, payload = FORGERIES[forgery]
    seq = _append_hashed(led, kind, d, rid, payload)
    rep = led.verify(expected_head=head)  # the chain and the kept head are fine: only the replay can tell
    assert not rep["ok"]
    assert any(p.startswith(f"row seq {seq} ({kind}) breaks the run lifecycle") for p in rep["problems"]), rep
    with pytest.raises(LedgerIntegrityError, match=f"row seq {seq}"):
        led.spent("d")
    with pytest.raises(LedgerIntegrityError):
        led.reserve("d", "c", [ev(1)])
