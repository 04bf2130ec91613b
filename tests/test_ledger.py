"""Tests of jaxdp.ledger on SQLite and on a real local PostgreSQL server (tests/ledger_pg.py).

The accountant is "rdp" throughout (fast); composition is checked against jaxdp.ledger.events.compose, which
calls jaxdp.accounting.events_epsilon (the events of a run composed with everything else on the dataset).
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from jaxdp.ledger import (BudgetExceededError, Ledger, LedgerError, LedgerIntegrityError, LedgerStoreError,
                          ReservationRequiredError, require_reservation)
from jaxdp.ledger.events import compose, normalize_events
from jaxdp.ledger.store import row_hash

sys.path.insert(0, os.path.dirname(__file__))
from ledger_pg import pg_server, pg_url  # noqa: E402,F401  (pytest fixtures)

DELTA = 1e-5


def ev(steps, sigma=1.1, q=0.01, **kw):
    return {"sampling": "poisson", "noise_multiplier": sigma, "sample_rate": q, "steps": steps, **kw}


def eps(events):
    return compose(normalize_events(events), DELTA, "rdp")


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


# ------------------------------------------------------------------------------------------ budget arithmetic
def test_reserve_commit_spent_composition(url):
    led = Ledger.init(url)
    led.register_dataset("mnist", 4.0, DELTA, accountant="rdp")
    assert led.is_protected("mnist") and not led.is_protected("cifar")
    r1 = led.reserve("mnist", "r1", [ev(300, l2_clip_norm=1.0)], model="mlp", config_hash="abc",
                     code_version="jaxdp test")
    assert r1.charged == ["mnist"]
    led.reserve("mnist", "r2", [ev(200, sigma=1.5)])
    s = led.spent("mnist")
    both = eps([ev(300), ev(200, sigma=1.5)])
    # spent = composition of all recorded events, tighter than the plain sum of per-run epsilons
    assert s.epsilon == pytest.approx(both, rel=1e-9)
    assert s.plain_sum == pytest.approx(eps([ev(300)]) + eps([ev(200, sigma=1.5)]), rel=1e-9)
    assert s.epsilon < s.plain_sum
    assert s.remaining == pytest.approx(4.0 - both)
    assert (s.runs_reserved, s.runs_committed, s.epsilon_committed) == (2, 0, 0.0)
    # commit fewer steps than reserved: only what was taken counts
    out = led.commit("r1", [ev(100, l2_clip_norm=1.0)])
    assert not out["exceeds_reservation"] and out["over_budget"] == []
    s = led.spent("mnist")
    assert s.epsilon == pytest.approx(eps([ev(100), ev(200, sigma=1.5)]), rel=1e-9)
    assert s.epsilon_committed == pytest.approx(eps([ev(100)]), rel=1e-9)
    assert (s.runs_reserved, s.runs_committed) == (1, 1)
    run = led.run("r1")
    assert (run.model, run.config_hash, run.code_version) == ("mlp", "abc", "jaxdp test")
    assert run.actual_events[0]["l2_clip_norm"] == 1.0
    with pytest.raises(LedgerError, match="already committed"):
        led.commit("r1")
    with pytest.raises(LedgerError, match="already in the ledger"):
        led.reserve("mnist", "r1", [ev(1)])
    assert led.verify()["ok"]


def test_refusal_gives_numbers_and_what_fits(url):
    led = Ledger.init(url)
    led.register_dataset("d", 2.0, DELTA, accountant="rdp")
    led.reserve("d", "first", [ev(400)])
    rows_before = led.verify()["rows"]
    with pytest.raises(BudgetExceededError) as info:
        led.reserve("d", "second", [ev(2000)])
    msg, det = str(info.value), info.value.details[0]
    assert "budget epsilon 2" in msg and "already spent" in msg and "fewer steps" in msg and "noise multiplier" in msg
    assert det["spent"] == pytest.approx(eps([ev(400)])) and det["epsilon_after"] > 2.0
    assert led.verify()["rows"] == rows_before  # nothing recorded on refusal
    fit_steps = det["fits"]["max_steps"][0]
    fit_sigma = det["fits"]["min_noise_multiplier"][0]
    assert 0 < fit_steps < 2000 and fit_sigma > 1.1
    # the suggestions are tight: they fit, and one more step does not
    assert eps([ev(400), ev(fit_steps)]) <= 2.0 < eps([ev(400), ev(fit_steps + 1)])
    assert eps([ev(400), ev(2000, sigma=fit_sigma)]) <= 2.0
    led.reserve("d", "second", [ev(2000, sigma=fit_sigma)])
    assert led.spent("d").remaining >= 0


def test_release_and_crashed_reservation_keeps_counting(url):
    led = Ledger.init(url)
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.reserve("d", "crashed", [ev(500)])
    assert led.spent("d").epsilon == pytest.approx(eps([ev(500)]))  # counts while open
    with pytest.raises(ValueError, match="reason"):
        led.release("crashed", "  ")
    out = led.release("crashed", "OOM before the first step")
    assert out["released"]
    s = led.spent("d")
    assert s.epsilon == 0.0 and s.runs_released == 1
    assert led.run("crashed").release_reason == "OOM before the first step"
    led.reserve("d", "done", [ev(10)])
    led.commit("done")
    with pytest.raises(LedgerError, match="committed run touched the data"):
        led.release("done", "oops")
    with pytest.raises(LedgerError, match="no reservation"):
        led.commit("never-reserved")


def test_finetune_lineage_is_charged(url):
    led = Ledger.init(url)
    led.register_dataset("private", 2.0, DELTA, accountant="rdp")
    led.reserve("private", "base", [ev(300)])
    led.commit("base")
    # fine-tune on an unregistered dataset: charged to the parent's protected dataset
    r = led.reserve("public", "ft", [ev(100)], parent_run_id="base")
    assert r.charged == ["private"]
    r2 = led.reserve("public", "ft2", [ev(50)], parent_run_id="ft")  # transitively
    assert r2.charged == ["private"] and led.lineage("ft2") == ["private"]
    assert led.spent("private").epsilon == pytest.approx(eps([ev(300), ev(100), ev(50)]))
    # a non-private fine-tune of a model trained on a protected dataset is refused
    with pytest.raises(BudgetExceededError, match="non-private"):
        led.reserve("public", "ft-np", [{"sampling": "none", "steps": 10}], parent_run_id="base")
    with pytest.raises(ReservationRequiredError, match="non-private"):
        require_reservation(led, "public", "ft-np", private=False, parent_run_id="base")
    # a fine-tune reserved without its parent is not charged to "private": the trainer's gate refuses it
    led.reserve("public", "ft-noparent", [ev(10)])
    with pytest.raises(ReservationRequiredError, match="not charged to"):
        require_reservation(led, "public", "ft-noparent", private=True, parent_run_id="base")
    assert require_reservation(led, "public", "ft", private=True, parent_run_id="base").run_id == "ft"
    # a fine-tune that would overspend the parent's dataset is refused, naming the inheritance
    with pytest.raises(BudgetExceededError, match="inherited"):
        led.reserve("public", "ft-big", [ev(5000)], parent_run_id="base")


def test_require_reservation_gate(tmp_path):
    led = Ledger.init(tmp_path / "l.db")
    assert require_reservation(None, "d", "r", private=False) is None
    assert require_reservation(led, "unprotected", "r", private=False) is None  # nothing protected
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    with pytest.raises(ReservationRequiredError, match="no reservation"):
        require_reservation(led, "d", "r", private=True)
    with pytest.raises(ReservationRequiredError, match="non-private"):
        require_reservation(led, "d", "r", private=False)
    led.reserve("d", "r", [ev(10)])
    assert require_reservation(str(tmp_path / "l.db"), "d", "r", private=True).status == "reserved"
    led.commit("r")
    with pytest.raises(ReservationRequiredError, match="already committed"):
        require_reservation(led, "d", "r", private=True)
    led.reserve("other", "r-other", [ev(10)])
    with pytest.raises(ReservationRequiredError, match="not charged"):
        require_reservation(led, "d", "r-other", private=True)


def test_register_rules_and_event_validation(tmp_path):
    led = Ledger.init(tmp_path / "l.db")
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")
    led.register_dataset("d", 3.0, DELTA, accountant="rdp")  # same numbers: no-op
    with pytest.raises(LedgerError, match="cannot be changed"):
        led.register_dataset("d", 5.0, DELTA, accountant="rdp")
    with pytest.raises(ValueError, match="delta"):
        led.register_dataset("e", 3.0, 1.5)
    with pytest.raises(ValueError, match="accountant"):
        led.register_dataset("e", 3.0, DELTA, accountant="basic")
    with pytest.raises(ValueError, match="missing"):
        led.reserve("d", "x", [{"sampling": "poisson", "noise_multiplier": 1.0, "steps": 3}])
    with pytest.raises(ValueError, match="unknown keys"):
        led.reserve("d", "x", [ev(3, sigmaa=2)])
    with pytest.raises(ValueError, match="sample_rate"):
        led.reserve("d", "x", [ev(3, q=1.5)])
    assert led.verify()["rows"] == 2  # init + one register


# ------------------------------------------------------------------------------------------ integrity
def _sqlite(path):
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("DROP TRIGGER ledger_log_no_update")  # what someone editing the file by hand would do
    c.execute("DROP TRIGGER ledger_log_no_delete")
    return c


def _filled(path):
    led = Ledger.init(path)
    led.register_dataset("d", 5.0, DELTA, accountant="rdp")
    for i in range(3):
        led.reserve("d", f"r{i}", [ev(100)])
    return led


def test_log_is_append_only(tmp_path):
    p = str(tmp_path / "l.db")
    _filled(p)
    c = sqlite3.connect(p)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        c.execute("UPDATE ledger_log SET payload = '{}' WHERE seq = 3")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        c.execute("DELETE FROM ledger_log WHERE seq = 3")


@pytest.mark.parametrize("tamper", ["edit", "delete_middle", "delete_last"])
def test_verify_detects_tampering(tmp_path, tamper):
    p = str(tmp_path / "l.db")
    led = _filled(p)
    assert led.verify()["ok"]
    c = _sqlite(p)
    if tamper == "edit":  # lower the recorded steps of a reservation
        payload = c.execute("SELECT payload FROM ledger_log WHERE seq = 3").fetchone()[0]
        c.execute("UPDATE ledger_log SET payload = ? WHERE seq = 3", (payload.replace('"steps":100', '"steps":1'),))
    elif tamper == "delete_middle":
        c.execute("DELETE FROM ledger_log WHERE seq = 4")
    else:
        c.execute("DELETE FROM ledger_log WHERE seq = (SELECT MAX(seq) FROM ledger_log)")
    rep = led.verify()
    assert not rep["ok"] and rep["problems"]
    with pytest.raises(LedgerIntegrityError, match="fails verification"):
        led.spent("d")
    rows = c.execute("SELECT COUNT(*) FROM ledger_log").fetchone()[0]
    with pytest.raises(LedgerIntegrityError):
        led.reserve("d", "new", [ev(1)])
    assert c.execute("SELECT COUNT(*) FROM ledger_log").fetchone()[0] == rows  # nothing written
    assert led.export()["verify"]["ok"] is False  # export still works, to salvage the data


def test_expected_head_detects_a_rewritten_chain(tmp_path):
    p = str(tmp_path / "l.db")
    led = _filled(p)
    anchor = led.verify()["head_hash"]  # kept elsewhere by a careful user
    c = _sqlite(p)
    rows = c.execute("SELECT seq, ts, kind, dataset_id, run_id, payload FROM ledger_log ORDER BY seq").fetchall()
    c.execute("DELETE FROM ledger_log")
    prev = "0" * 64
    for seq, (_, ts, kind, d, r, payload) in enumerate([x for x in rows if x[4] != "r1"], start=1):
        h = row_hash(seq, ts, kind, d, r, payload, prev)
        c.execute("INSERT INTO ledger_log VALUES (?,?,?,?,?,?,?,?)", (seq, ts, kind, d, r, payload, prev, h))
        prev = h
    c.execute("UPDATE ledger_head SET seq = ?, hash = ?", (seq, prev))
    assert led.verify()["ok"]  # a full, consistent rewrite passes the chain alone...
    rep = led.verify(expected_head=anchor)
    assert not rep["ok"] and "expected head" in rep["problems"][0]  # ...but not the kept anchor


def test_corrupt_or_missing_store_is_a_clear_error_and_untouched(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(LedgerStoreError, match="no ledger at"):
        Ledger.open(missing)
    assert not missing.exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    before = junk.read_bytes()
    with pytest.raises(LedgerStoreError, match="not a readable SQLite ledger"):
        Ledger.open(junk)
    with pytest.raises(LedgerStoreError):
        Ledger.init(junk)
    assert junk.read_bytes() == before
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    with pytest.raises(LedgerStoreError, match="holds no ledger tables.*Do NOT run `jaxdp ledger init`"):
        Ledger.open(other)
    # a ledger file cut in half (e.g. a failed copy): a clear error, the file untouched
    cut = tmp_path / "cut.db"
    _filled(str(cut))
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    before = cut.read_bytes()
    with pytest.raises(LedgerStoreError, match="cannot be read|not a readable|malformed"):
        Ledger.open(cut).spent("d")
    assert cut.read_bytes() == before
    # a row whose payload is not JSON (hash recomputed, so only the parse fails)
    p = str(tmp_path / "l.db")
    led = _filled(p)
    c = _sqlite(p)
    seq, ts, kind, d, r, _, prev = c.execute(
        "SELECT seq, ts, kind, dataset_id, run_id, payload, prev_hash FROM ledger_log ORDER BY seq DESC").fetchone()
    h = row_hash(seq, ts, kind, d, r, "{broken", prev)
    c.execute("UPDATE ledger_log SET payload = '{broken', hash = ? WHERE seq = ?", (h, seq))
    c.execute("UPDATE ledger_head SET hash = ?", (h,))
    with pytest.raises(LedgerIntegrityError, match="not valid JSON"):
        led.spent("d")
    assert not led.verify()["ok"]


def test_postgres_log_is_append_only(pg_url):
    import psycopg
    _filled(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as c:
        for sql in ("UPDATE ledger_log SET payload = '{}' WHERE seq = 3", "DELETE FROM ledger_log WHERE seq = 3",
                    "TRUNCATE ledger_log"):
            with pytest.raises(psycopg.Error, match="append-only"):
                c.execute(sql)
        c.execute("ALTER TABLE ledger_log DISABLE TRIGGER USER")  # an owner editing by hand
        c.execute("DELETE FROM ledger_log WHERE seq = 3")
    rep = Ledger.open(pg_url).verify()
    assert not rep["ok"]


def test_postgres_open_errors(pg_url, pg_server):
    with pytest.raises(LedgerStoreError, match="holds no jaxdp ledger tables"):
        Ledger.open(pg_url)
    with pytest.raises(LedgerStoreError, match="cannot connect"):
        Ledger.open(f"postgresql://jaxdp@127.0.0.1:{pg_server['port']}/no_such_db")
    with pytest.raises(LedgerStoreError, match="unsupported ledger URL"):
        Ledger.open("mysql://x@y/z")


# ------------------------------------------------------------------------------------------ concurrency
_WORKER = r"""
import json, os, sys, time
from jaxdp.ledger import Ledger, BudgetExceededError
run_id, tmp, events = sys.argv[1:4]
urls = sys.argv[4:]
leds = [Ledger.open(u) for u in urls]
for led in leds:
    led.spent("d")                  # warm up imports and the accountant before the start signal
for j, led in enumerate(leds):
    open(os.path.join(tmp, f"ready{j}-{run_id}"), "w").close()
    while not os.path.exists(os.path.join(tmp, f"go{j}")):
        time.sleep(0.002)
    try:
        led.reserve("d", run_id, json.loads(events))
        print("ok", flush=True)
    except BudgetExceededError:
        print("refused", flush=True)
"""


def test_concurrent_reservations_never_overspend(tmp_path, request):
    """N real processes reserve at the same instant; the budget fits exactly K of their runs.

    The same processes race first on a SQLite file (BEGIN IMMEDIATE), then on PostgreSQL (advisory lock),
    each race started by its own signal file once every process is ready.
    """
    urls = [str(tmp_path / "race.db")]
    if os.environ.get("JAXDP_SKIP_POSTGRES") != "1":
        urls.append(request.getfixturevalue("pg_url"))
    n, k, run = 3, 2, ev(150)
    budget = (eps([run] * k) + eps([run] * (k + 1))) / 2
    ledgers = [Ledger.init(u) for u in urls]
    for led in ledgers:
        led.register_dataset("d", budget, DELTA, accountant="rdp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, f"w{i}", str(tmp_path), json.dumps([run]), *urls],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(n)]
    try:
        deadline = time.time() + 180
        for j in range(len(urls)):
            while not all((tmp_path / f"ready{j}-w{i}").exists() for i in range(n)):
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    for p in procs:
                        p.kill()
                    pytest.fail(f"a worker died or stalled before race {j}: {[p.communicate() for p in procs]}")
                time.sleep(0.005)
            (tmp_path / f"go{j}").touch()
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:  # never leave a worker behind (e.g. after a timeout)
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    for j, led in enumerate(ledgers):
        results = sorted(o[0].split()[j] for o in outs)
        assert results == ["ok"] * k + ["refused"] * (n - k), (urls[j], outs)
        s = led.spent("d")
        assert s.runs_reserved == k and s.epsilon <= budget
        assert led.verify()["ok"]


# ------------------------------------------------------------------------------------------ CLI
def _cli(capsys, *argv):
    from jaxdp.cli import main
    rc = main(["ledger", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    p = str(tmp_path / "cli.db")
    rc, out, _ = _cli(capsys, "init", "--ledger", p, "--dataset", "mnist", "--max-epsilon", "2", "--delta", "1e-5",
                      "--accountant", "rdp", "--json")
    assert rc == 0 and json.loads(out)["dataset"]["max_epsilon"] == 2.0
    monkeypatch.setenv("JAXDP_LEDGER", p)  # the default for --ledger
    rc, out, _ = _cli(capsys, "reserve", "--dataset", "mnist", "--run-id", "a", "--noise-multiplier", "1.1",
                      "--sample-rate", "0.01", "--epochs", "3", "--l2-clip-norm", "1", "--json")
    res = json.loads(out)
    assert rc == 0 and res["events"][0]["steps"] == 300
    assert res["epsilon_after"]["mnist"] == pytest.approx(eps([ev(300)]))
    rc, out, err = _cli(capsys, "reserve", "--dataset", "mnist", "--run-id", "b", "--events",
                        json.dumps([ev(3000)]), "--json")
    assert rc == 1 and json.loads(out)["error"] == "BudgetExceededError" and "Would fit" in err
    assert json.loads(out)["details"][0]["fits"]["max_steps"][0] > 0
    rc, out, _ = _cli(capsys, "commit", "--run-id", "a", "--steps", "120", "--json")
    assert rc == 0 and json.loads(out)["events"][0]["steps"] == 120
    rc, out, _ = _cli(capsys, "reserve", "--dataset", "mnist", "--run-id", "c", "--noise-multiplier", "2",
                      "--sample-rate", "0.01", "--steps", "50")
    assert rc == 0 and "reserved run 'c'" in out
    rc, out, _ = _cli(capsys, "release", "--run-id", "c", "--reason", "killed by the scheduler", "--json")
    assert rc == 0 and json.loads(out)["released"]
    rc, out, _ = _cli(capsys, "show", "--json")
    s = json.loads(out)["datasets"]["mnist"]
    assert s["epsilon"] == pytest.approx(eps([ev(120)])) and s["runs_released"] == 1
    rc, out, _ = _cli(capsys, "show")
    assert "spent (composed)" in out and "plain sum" in out and "killed by the scheduler" in out
    rc, out, _ = _cli(capsys, "verify", "--json")
    assert rc == 0 and json.loads(out)["ok"]
    rc, out, _ = _cli(capsys, "export", "--output", str(tmp_path / "x.json"))
    data = json.loads((tmp_path / "x.json").read_text())
    assert rc == 0 and len(data["log"]) == 6 and data["verify"]["ok"]
    c = _sqlite(p)
    c.execute("DELETE FROM ledger_log WHERE seq = 3")
    rc, out, _ = _cli(capsys, "verify")
    assert rc == 1 and "FAILED" in out
    rc, _, err = _cli(capsys, "show", "--ledger", str(tmp_path / "missing.db"))
    assert rc == 2 and "no ledger at" in err


def test_default_prv_accountant_reference_number(tmp_path):
    """Reference (docs/privacy.md): q = 256/60000, sigma = 1.1, 14063 steps, delta 1e-5 -> Opacus PRV epsilon ~2.392."""
    led = Ledger.init(tmp_path / "l.db")
    led.register_dataset("mnist", 3.0, DELTA)  # accountant="prv" by default
    r = led.reserve("mnist", "a", [ev(14063, q=256 / 60000)])
    assert r.epsilon_after["mnist"] == pytest.approx(2.392, abs=0.003)
    assert led.spent("mnist").accountant == "prv"


def test_shuffle_events_on_a_replace_one_dataset(tmp_path):
    """Shuffled fixed-size batches are accounted as such (RDP, replace-one), never as Poisson."""
    led = Ledger.init(tmp_path / "l.db")
    led.register_dataset("d", 10.0, DELTA, accountant="rdp", neighboring_relation="replace_one")
    shuf = {"sampling": "shuffle", "noise_multiplier": 1.5, "batch_size": 100, "dataset_size": 10000, "steps": 200}
    r = led.reserve("d", "s", [shuf])
    assert r.epsilon_after["d"] == pytest.approx(compose(normalize_events([shuf]), DELTA, "rdp", "replace_one"))
    with pytest.raises(ValueError, match="neighboring_relation"):
        led.register_dataset("e", 1.0, DELTA, neighboring_relation="swap")
