"""One description of a mechanism (issue 16a): the Event type, its wire format (old ledgers and accountant
checkpoints still read the same), the one merge, and the one epochs -> steps rule."""
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from jaxdp import accounting as acct
from jaxdp.accounting.event import FIELDS, Event, merge
from jaxdp.ledger import Ledger
from jaxdp.ledger import events as ledger_events
from jaxdp.sampling import CyclicPoissonSampler, PoissonSampler, ShuffleSampler, steps_for_epochs

DATA = pathlib.Path(__file__).parent / "data"
DELTA = 1e-5

EXAMPLES = [
    {"sampling": "poisson", "noise_multiplier": 1.1, "sample_rate": 0.004, "steps": 250},
    {"sampling": "shuffle", "noise_multiplier": 2.0, "batch_size": 50, "dataset_size": 1000, "steps": 40},
    {"sampling": "truncated_poisson", "noise_multiplier": 1.5, "sample_rate": 0.01, "max_batch_size": 130,
     "dataset_size": 10000, "steps": 300, "l2_clip_norm": 0.5},
    {"sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": 4, "noise_multiplier": 2.0, "sample_rate": 0.02,
     "steps": 103},
    {"sampling": "none", "steps": 7},
]


# ------------------------------------------------------------------------------------------- wire format
@pytest.mark.parametrize("d", EXAMPLES, ids=[e["sampling"] for e in EXAMPLES])
def test_wire_format_round_trips_exactly(d):
    e = Event.from_dict(d)
    assert e.to_dict() == d and list(e.to_dict()) == ["sampling", *FIELDS[d["sampling"]], *(
        ["l2_clip_norm"] if "l2_clip_norm" in d else [])]
    assert Event.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    assert hash(e) == hash(Event.from_dict(dict(d)))
    assert acct.validate_event(d) == d


def test_numbers_are_normalised_and_bad_events_refused():
    e = Event("poisson", noise_multiplier=np.float32(1.5), sample_rate=1, steps=np.int64(10))
    assert e == Event("poisson", noise_multiplier=1.5, sample_rate=1.0, steps=10.0)
    assert type(e.steps) is int and type(e.sample_rate) is float
    bad = [({"sampling": "uniform", "steps": 1}, "sampling must be one of"),
           ({"sampling": "poisson", "noise_multiplier": 1.0, "steps": 1}, "missing"),
           ({"sampling": "poisson", "noise_multiplier": None, "sample_rate": 0.1, "steps": 1}, "missing"),
           ({"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "sigma": 2},
            "unknown keys"),
           ({"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, "sample_rate"),
           ({"sampling": "poisson", "noise_multiplier": -1.0, "sample_rate": 0.5, "steps": 1}, "noise_multiplier"),
           ({"sampling": "poisson", "noise_multiplier": "1", "sample_rate": 0.5, "steps": 1}, "noise_multiplier"),
           ({"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2.5}, "steps"),
           ({"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": True}, "steps"),
           ({"sampling": "shuffle", "noise_multiplier": 1.0, "batch_size": 9, "dataset_size": 8, "steps": 1},
            "larger than dataset_size"),
           ({"sampling": "truncated_poisson", "noise_multiplier": 1.0, "sample_rate": 0.5, "max_batch_size": 9,
             "dataset_size": 8, "steps": 1}, "larger than dataset_size"),
           ({"sampling": "cyclic_poisson", "mechanism": "blt", "bands": 2, "noise_multiplier": 1.0,
             "sample_rate": 0.5, "steps": 1}, "mechanism must be one of"),
           ({"sampling": "none", "steps": 1, "l2_clip_norm": 0.0}, "l2_clip_norm")]
    for d, match in bad:
        with pytest.raises(ValueError, match=match):
            Event.from_dict(d)
    with pytest.raises(ValueError, match="unknown keys"):
        Event("none", steps=3, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="must be a dict"):
        Event.from_dict([("sampling", "none")])
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.steps = 3
    with pytest.raises(ValueError, match=r"event 0: .*missing"):   # the ledger names the event
        ledger_events.normalize_events([{"sampling": "poisson", "steps": 1}])


def test_samplers_emit_the_events_the_engine_recorded_before():
    """The samplers' events equal the dicts the engine, the accountant and the report built by hand."""
    p = PoissonSampler(1000, 0.05, seed=0)
    t = PoissonSampler(1000, 0.05, seed=0, max_batch_size=70)
    c = CyclicPoissonSampler(1000, 0.2, 4, seed=0)
    s = ShuffleSampler(1000, 50, seed=0)
    assert p.event(1.1, 9).to_dict() == {"sampling": "poisson", "noise_multiplier": 1.1, "sample_rate": 0.05,
                                         "steps": 9}
    assert t.event(1.1, 9).to_dict() == {"sampling": "truncated_poisson", "noise_multiplier": 1.1,
                                         "sample_rate": 0.05, "max_batch_size": 70, "dataset_size": 1000, "steps": 9}
    assert c.event(1.1, 9, mechanism="bandmf").to_dict() == {
        "sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": 4, "noise_multiplier": 1.1, "sample_rate": 0.2,
        "steps": 9}
    assert s.event(1.1, 9, l2_clip_norm=1.0).to_dict() == {
        "sampling": "shuffle", "noise_multiplier": 1.1, "batch_size": 50, "dataset_size": 1000, "steps": 9,
        "l2_clip_norm": 1.0}
    with pytest.raises(ValueError, match="CyclicPoissonSampler"):
        p.event(1.1, 9, mechanism="bandmf")
    # Accountant.step (the keyword form) builds the same event as the sampler
    for sampler in (p, t, s):
        a = acct.Accountant("pld" if sampler is not s else "rdp",
                            neighboring_relation="replace_one" if sampler is s else "add_remove")
        a.step(1.1, sampler.sample_rate, 9, sampling=sampler.sampling, dataset_size=1000,
               batch_size=getattr(sampler, "batch_size", None), max_batch_size=getattr(sampler, "max_batch_size", None))
        assert a.history == [sampler.event(1.1, 9).to_dict()]


# --------------------------------------------------------------------------------------------- merging
def test_merge_one_run_and_canonical_order():
    a = Event("poisson", noise_multiplier=1.0, sample_rate=0.01, steps=10)
    c = Event("cyclic_poisson", mechanism="bandmf", bands=4, noise_multiplier=1.0, sample_rate=0.04, steps=5)
    # consecutive only, order kept; zero-step events dropped
    assert [e.steps for e in merge([a, a.replace(steps=0), a, a.replace(noise_multiplier=2.0), a])] == [20, 10, 10]
    # two runs of a cyclic schedule each restart their cycle: they never merge, unless they are one run's steps
    assert [e.steps for e in merge([c, c])] == [5, 5]
    assert [e.steps for e in merge([c, c], one_run=True)] == [10]
    # canonical order merges equal mechanisms wherever they are, and sorts
    assert merge([a, a.replace(noise_multiplier=2.0), a], canonical_order=True) == [
        a.replace(steps=20), a.replace(noise_multiplier=2.0)]
    assert acct.merge_events([a.to_dict(), a.to_dict(), c.to_dict(), c.to_dict()]) == [
        a.replace(steps=20).to_dict(), c.to_dict(), c.to_dict()]
    # the accountant records one run: consecutive cyclic steps merge; the clip norm is not accounted
    acc = acct.Accountant("rdp")
    for _ in range(3):
        acc.record(c.replace(steps=1, l2_clip_norm=1.0))
    assert acc.history == [c.replace(steps=3).to_dict()]
    # the composed epsilon of two cyclic runs counts ceil(T1/b) + ceil(T2/b) participations
    two = acct.events_epsilon([c, c], DELTA, "rdp")
    assert two == pytest.approx(acct.events_epsilon([c.equivalent_poisson().replace(steps=4)], DELTA, "rdp"),
                                rel=1e-12)
    assert two > acct.events_epsilon([c.replace(steps=10)], DELTA, "rdp")


# ----------------------------------------------------------------------------------- old files still read
def test_old_ledger_restores_verifies_and_composes_the_same(tmp_path):
    """A ledger written before the Event type (tests/data/ledger_main.json, by tests/data/make_ledger_main.py at
    bde7491) restores, verifies, and composes to the same epsilons; its events are the Event wire format."""
    data = json.loads((DATA / "ledger_main.json").read_text())
    expected = data.pop("expected")
    led = Ledger.restore(str(tmp_path / "l.db"), data)
    rep = led.verify()
    assert rep["ok"] and rep["head_hash"] == data["verify"]["head_hash"], rep
    n_events, budgets = 0, {}
    for row in data["log"]:
        payload = json.loads(row["payload"])
        if row["kind"] == "register":
            budgets[payload["dataset_id"]] = payload
        for e in payload.get("events", []):
            assert Event.from_dict(e).to_dict() == e   # stored dicts are exactly the wire format
            n_events += 1
    assert n_events >= 10
    summary = led.summary()["datasets"]
    assert set(summary) == set(expected) == set(budgets)
    for d, exp in expected.items():
        for k in ("epsilon", "epsilon_committed", "plain_sum"):   # recomposed from the stored events
            assert summary[d][k] == pytest.approx(exp[k], rel=1e-12, abs=0), (d, k)
        b = budgets[d]
        for run_id, eps in exp["runs"].items():   # each run recomposed, against what the old code computed
            events = led.run(run_id).charge_events
            if events:
                again = ledger_events.compose(events, b["delta"], b["accountant"], b["neighboring_relation"])
                assert again == pytest.approx(eps, rel=1e-12, abs=0), (d, run_id)
    # the restored ledger goes on: a new reservation is checked against the old runs
    led.reserve("mnist", "new", [Event("poisson", noise_multiplier=1.1, sample_rate=0.004, steps=100)])
    assert led.spent("mnist").epsilon > expected["mnist"]["epsilon"]
    assert led.verify()["ok"]


def test_old_accountant_checkpoints_read_the_same():
    """Accountants serialised before the Event type (tests/data/accountants_main.json, written at bde7491)."""
    for old in json.loads((DATA / "accountants_main.json").read_text()):
        acc = acct.Accountant.from_dict(old["accountant"])
        assert acc.to_dict() == old["accountant"]
        assert acc.get_epsilon(DELTA) == pytest.approx(old["epsilon_at_1e-5"], rel=1e-12)
        assert acc.get_delta(2.0) == pytest.approx(old["delta_at_2"], rel=1e-12)


# ------------------------------------------------------------------------------------- epochs -> steps
def test_steps_for_epochs_is_the_samplers_rule():
    assert steps_for_epochs(3, 0.1) == 30   # 3 / 0.1 = 30.000000000000004 in floating point
    assert steps_for_epochs(0, 0.3) == 0
    assert steps_for_epochs(2.5, steps_per_epoch=3) == 8
    for bad in (dict(), dict(sample_rate=0.1, steps_per_epoch=3)):
        with pytest.raises(ValueError, match="exactly one"):
            steps_for_epochs(1, **bad)
    with pytest.raises(ValueError, match="epochs"):
        steps_for_epochs(-1, 0.1)
    assert acct.steps_for_epochs(3, 0.1) == 30
    for e in (0.5, 1, 2.7, 3, 10):
        assert PoissonSampler(1000, 0.1, 0).steps_for_epochs(e) == steps_for_epochs(e, 0.1)
        assert ShuffleSampler(1000, 300, 0).steps_for_epochs(e) == steps_for_epochs(e, steps_per_epoch=3)
        assert CyclicPoissonSampler(1000, 0.4, 4, 0).steps_for_epochs(e) == steps_for_epochs(e, 0.4 / 4)


def _tiny_config(tmp_path, sampling, batch_size, epochs, **training):
    dp = {"enabled": True, "epsilon": None, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.0,
          "neighboring_relation": "replace_one" if sampling == "shuffle" else "add_remove"}
    return {"model": {"name": "logreg"}, "data": {"name": "digits"},
            "optimizer": {"name": "sgd", "learning_rate": 1.0},
            "training": {"epochs": epochs, "batch_size": batch_size, "seed": 0, "sampling": sampling,
                         "accountant": "rdp", "dp": dp, **training},
            "output": {"dir": str(tmp_path / "run"), "progress": False}}


@pytest.mark.parametrize("sampling, batch_size, epochs, extra", [
    ("poisson", 24, 8, {}),           # 8 / (24 / 1437) = 479.00000000000006 in floating point: 479 steps
    ("shuffle", 100, 0.7, {}),        # N // B batches per epoch, not N / B
    ("shuffle", 130, 2, {}),
    ("poisson", 64, 4, {"mechanism": "bandmf", "bands": 4}),   # cyclic Poisson over 4 groups
])
def test_ledger_cli_reserves_the_steps_the_trainer_trains(tmp_path, capsys, sampling, batch_size, epochs, extra):
    """`jaxdp ledger reserve --epochs E` with the run's N and B reserves exactly the event `jaxdp train` reserves
    and trains for E epochs (it used to reserve 1-2 steps more, or fewer)."""
    from jaxdp.cli import main
    from jaxdp.train import DPTrainer
    tr = DPTrainer(_tiny_config(tmp_path, sampling, batch_size, epochs, **extra), log=False)
    (trainers,) = tr.private.ledger_events(tr.total_steps)   # what the gate reserves for the trainer
    n = tr.n
    assert n == 1437   # the cases above were chosen for this N
    ledger = str(tmp_path / "l.db")
    assert main(["ledger", "init", "--ledger", ledger]) == 0
    args = ["ledger", "reserve", "--ledger", ledger, "--dataset-id", "digits", "--run-id", "r", "--json",
            "--noise-multiplier", "1.0", "--epochs", str(epochs), "--l2-clip-norm", "1.0"]
    if sampling == "shuffle":
        args += ["--sampling", "shuffle", "--batch-size", str(batch_size), "--dataset-size", str(n)]
    elif extra.get("mechanism") == "bandmf":
        args += ["--sampling", "cyclic_poisson", "--mechanism", "bandmf", "--bands", "4",
                 "--sample-rate", repr(tr.sampler.sample_rate)]
    else:
        args += ["--sample-rate", repr(batch_size / n)]
    capsys.readouterr()
    assert main(args) == 0
    reserved = json.loads(capsys.readouterr().out)["events"]
    assert reserved[0]["steps"] == tr.total_steps
    assert reserved == [trainers]


def test_doctests_of_the_event_and_the_epochs_rule():
    import doctest

    import jaxdp.accounting.event
    import jaxdp.sampling
    for module in (jaxdp.accounting.event, jaxdp.sampling):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 3 and result.failed == 0, (module.__name__, result)
