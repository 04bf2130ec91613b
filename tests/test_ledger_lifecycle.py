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


# ------------------------------------------------------------------------------------- append-only, lost stores
def test_sqlite_insert_or_replace_and_head_rewrites_are_refused(tmp_path):
    path = str(tmp_path / "l.db")
    led = Ledger.init(path)
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.reserve("d", "a", [ev(300)])
    c = sqlite3.connect(path, isolation_level=None)
    row = c.execute("SELECT seq, ts, kind, dataset_id, run_id, payload, prev_hash, hash FROM ledger_log "
                    "WHERE seq = 3").fetchone()
    forged = list(row)
    forged[5] = forged[5].replace('"steps":300', '"steps":1')
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):  # replace without firing the DELETE trigger
        c.execute("INSERT OR REPLACE INTO ledger_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)", forged)
    with pytest.raises(sqlite3.DatabaseError, match="only names the last row"):  # cut the tail via the head
        c.execute("UPDATE ledger_head SET seq = 2, hash = (SELECT hash FROM ledger_log WHERE seq = 2)")
    with pytest.raises(sqlite3.DatabaseError, match="only names the last row"):
        c.execute("INSERT OR REPLACE INTO ledger_head VALUES (1, 2, (SELECT hash FROM ledger_log WHERE seq = 2))")
    assert led.verify()["ok"] and led.spent("d").runs_reserved == 1


def test_postgres_writer_role_cannot_disable_the_triggers(pg_url):
    import psycopg
    role = "jaxdp_writer_" + os.urandom(4).hex()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
        schema = c.execute("SELECT current_schema()").fetchone()[0]
        c.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    Ledger.init(pg_url, writer_role=role)
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(pg_url)
    writer_url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
    led = Ledger.open(writer_url)
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.reserve("d", "a", [ev(300)])
    led.commit("a")
    with psycopg.connect(writer_url, autocommit=True) as c:
        for sql in ("ALTER TABLE ledger_log DISABLE TRIGGER USER", "DROP TRIGGER ledger_log_append_only ON ledger_log",
                    "DELETE FROM ledger_log WHERE seq = 3", "TRUNCATE ledger_log"):
            with pytest.raises(psycopg.Error, match="owner|permission denied|append-only"):
                c.execute(sql)
    assert led.verify()["ok"]


def test_empty_file_is_never_reinitialised(tmp_path):
    path = tmp_path / "ledger.db"
    led = Ledger.init(str(path))
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.close()
    path.write_bytes(b"")  # the history is lost (a failed copy, a bad restore, `> ledger.db`)
    for fn in (Ledger.open, Ledger.init):
        with pytest.raises(LedgerStoreError) as e:
            fn(str(path))
        msg = str(e.value)
        assert "empty (0-byte)" in msg and "history is gone" in msg and "Do NOT run `jaxdp ledger init`" in msg
    assert path.read_bytes() == b""


def test_export_then_restore_rebuilds_a_lost_ledger(tmp_path):
    led = Ledger.init(str(tmp_path / "a.db"))
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.reserve("d", "a", [ev(300)])
    led.commit("a", [ev(100)])
    export = json.loads(json.dumps(led.export()))
    new = Ledger.restore(str(tmp_path / "b.db"), export)
    assert new.verify(expected_head=led.verify()["head_hash"])["ok"]
    assert new.spent("d").epsilon == led.spent("d").epsilon
    with pytest.raises(LedgerStoreError, match="already holds a ledger"):
        Ledger.restore(str(tmp_path / "b.db"), export)
    export["log"][2]["payload"] = export["log"][2]["payload"].replace("300", "3")
    with pytest.raises(LedgerIntegrityError):
        Ledger.restore(str(tmp_path / "c.db"), export)


def test_postgres_lost_log_with_head_left_is_a_clear_refusal(pg_url):
    import psycopg
    led = Ledger.init(pg_url)
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    with psycopg.connect(pg_url, autocommit=True) as c:  # an owner wiping the history by hand
        c.execute("ALTER TABLE ledger_log DISABLE TRIGGER USER")
        c.execute("DELETE FROM ledger_log")
    with pytest.raises(LedgerError, match="fails verification.*not re-initialised"):
        Ledger.init(pg_url)  # used to end in an uncaught psycopg UniqueViolation


# ------------------------------------------------------------------------------ bounded work, operators' view
def test_absurd_requests_are_refused_quickly(tmp_path):
    led = Ledger.init(str(tmp_path / "l.db"))
    led.register_dataset("d", 3.0, DELTA, accountant="prv")
    with pytest.raises(ValueError, match="more than the ledger accounts"):
        led.reserve("d", "a", [ev(10**9)])
    with pytest.raises(ValueError, match="more than the ledger accounts"):
        led.reserve("d", "a", [ev(10**18)])
    with pytest.raises(ValueError, match="noise_multiplier"):
        led.reserve("d", "a", [ev(10, sigma=1e300)])
    for bad in ("a\nb", "x\x1b[31m", "r\u202e"):
        with pytest.raises(ValueError, match="control characters"):
            led.reserve("d", bad, [ev(10)])
    assert led.runs() == []


def test_a_slow_reservation_does_not_hold_the_write_lock(tmp_path, monkeypatch):
    import threading
    import time

    from jaxdp.ledger import events as events_mod
    path = str(tmp_path / "l.db")
    Ledger.init(path).register_dataset("d", 30.0, DELTA, accountant="rdp")
    real, slowed = events_mod._cached_epsilon, set()

    def slow(events_json, *a):
        if '"steps":4242' in events_json and events_json not in slowed:
            slowed.add(events_json)
            time.sleep(3.0)  # a composition that takes seconds (PRV with many steps)
        return real(events_json, *a)
    monkeypatch.setattr(events_mod, "_cached_epsilon", slow)
    done = {}

    def slow_writer():
        Ledger.open(path).reserve("d", "slow", [ev(4242)])
        done["slow"] = time.monotonic()
    t = threading.Thread(target=slow_writer)
    t.start()
    time.sleep(0.5)
    other = Ledger.open(path)
    other.register_dataset("e", 1.0, DELTA, accountant="rdp")  # another writer, another dataset
    done["other"] = time.monotonic()
    t.join()
    assert done["other"] < done["slow"]  # it did not wait for the slow composition
    assert {r.run_id for r in other.runs()} == {"slow"} and other.verify()["ok"]


def test_show_says_when_who_and_whether_the_reserving_process_lives(tmp_path, monkeypatch, capsys):
    import subprocess

    from jaxdp.cli import main
    path = str(tmp_path / "l.db")
    led = Ledger.init(path)
    led.register_dataset("d", 30.0, DELTA, accountant="rdp")
    led.reserve("d", "live", [ev(10)])
    dead = subprocess.Popen(["true"])
    dead.wait()
    monkeypatch.setattr(os, "getpid", lambda: dead.pid)
    led.reserve("d", "crashed", [ev(10)])
    monkeypatch.undo()
    runs = {r["run_id"]: r for r in led.spent("d").runs}
    assert runs["live"]["alive"] is True and runs["crashed"]["alive"] is False
    assert runs["crashed"]["pid"] == dead.pid and runs["crashed"]["reserved_at"]
    assert main(["ledger", "show", "--ledger", path]) == 0
    out = capsys.readouterr().out
    assert f"pid {os.getpid()}: alive" in out and f"pid {dead.pid}: NOT RUNNING" in out


# ------------------------------------------------------------------------------------------------ CLI inputs
@pytest.mark.parametrize("extra", [
    ["--epochs", "inf", "--sample-rate", "0.01", "--noise-multiplier", "1.1"],
    ["--steps", "10", "--sample-rate", "0.01", "--noise-multiplier", "1e300"],
    ["--events", "[" * 100000 + "]" * 100000],
    ["--steps", "1000000000", "--sample-rate", "0.01", "--noise-multiplier", "1.1"],
])
def test_cli_bad_inputs_are_one_line_exit_2(tmp_path, capsys, extra):
    from jaxdp.cli import main
    path = str(tmp_path / "l.db")
    Ledger.init(path).register_dataset("d", 3.0, DELTA, accountant="rdp")
    assert main(["ledger", "reserve", "--ledger", path, "--dataset-id", "d", "--run-id", "r", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxdp ledger reserve:"), err
    assert main(["ledger", "reserve", "--ledger", path, "--dataset-id", "d", "--run-id", "x\n    forged  committed",
                 "--steps", "1", "--sample-rate", "0.01", "--noise-multiplier", "1.1"]) == 2


def test_show_escapes_control_characters_already_in_a_ledger(tmp_path, capsys):
    from jaxdp.cli import main
    path = str(tmp_path / "l.db")
    led = Ledger.init(path)
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    bad = "x\n    fake-run                 committed eps 0.0000\x1b[2K"
    _append_hashed(led, "reserve", "d", bad, {"run_id": bad, "dataset_id": "d", "charged": ["d"], "events": [ev(1)]})
    assert main(["ledger", "show", "--ledger", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\n    fake-run" not in out and "x\\n    fake-run" in out


def test_verify_head_file_detects_tail_truncation(tmp_path, capsys):
    """Plain verify cannot see rows cut off the end together with the head record; a kept head can."""
    from jaxdp.cli import main
    path = str(tmp_path / "l.db")
    led = Ledger.init(path)
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.reserve("d", "a", [ev(300)])
    head_file = str(tmp_path / "head.json")
    assert main(["ledger", "verify", "--ledger", path, "--head-file", head_file]) == 0
    assert "keep this head" not in capsys.readouterr().out
    c = sqlite3.connect(path, isolation_level=None)  # someone with write access, triggers dropped
    for t in ("ledger_log_no_delete", "ledger_head_follows_log"):
        c.execute(f"DROP TRIGGER {t}")
    c.execute("DELETE FROM ledger_log WHERE seq = 3")
    c.execute("UPDATE ledger_head SET seq = 2, hash = (SELECT hash FROM ledger_log WHERE seq = 2)")
    assert main(["ledger", "verify", "--ledger", path]) == 0  # documented limit of plain verify
    assert "keep this head hash outside the database" in capsys.readouterr().out
    assert main(["ledger", "verify", "--ledger", path, "--head-file", head_file]) == 1
    assert "not in the chain" in capsys.readouterr().out
