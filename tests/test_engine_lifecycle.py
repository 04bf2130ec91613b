"""The run lifecycle owned by the engine (issue 16b): one ledger gate for every way of training (raw API,
adaptive clipping, the non-private twin, lm.finetune), engine-level checkpointing with bit-identical resume,
and the deprecated ``ledger=False``."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp import accounting
from jaxdp.engine import PrivacyBudgetExhausted
from jaxdp.ledger import Ledger, ReservationRequiredError

N, B, SIGMA, DELTA = 64, 16, 1.0, 1e-5
Q = B / N
RNG = np.random.default_rng(0)
DATA = {"x": RNG.normal(size=(N, 3)).astype(np.float32), "y": RNG.normal(size=(N,)).astype(np.float32)}


def loss_fn(p, batch):
    return (batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2


def params0():
    return {"w": jnp.zeros(3), "b": jnp.zeros([])}


def poisson(steps, sigma=SIGMA):
    return [{"sampling": "poisson", "noise_multiplier": sigma, "sample_rate": Q, "steps": steps}]


def ledger(tmp_path, reserve=None):
    path = str(tmp_path / "ledger.db")
    led = Ledger.open(path, create=True)
    led.register_dataset("d", max_epsilon=50.0, delta=DELTA, accountant="rdp")
    if reserve is not None:
        led.reserve("d", "r", reserve)
    return path, led


def make(engine=None, **kw):
    engine = engine or jaxdp.PrivacyEngine(accountant="rdp")
    args = dict(loss_fn=loss_fn, params=params0(), optimizer=optax.sgd(0.1), dataset_size=N, batch_size=B,
                noise_multiplier=SIGMA, l2_clip_norm=1.0, seed=7, method="vmap", epochs=2)
    args.update(kw)
    return engine.make_private(**args)


def run(training, state, steps):
    """Take up to ``steps`` steps; returns (state, steps taken, whether a step was refused)."""
    taken = 0
    for batch, mask in training.batches(DATA, steps):
        try:
            state, _ = training.step(state, batch, mask)
        except PrivacyBudgetExhausted:
            return state, taken, True
        taken += 1
    return state, taken, False


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_raw_api_never_steps_beyond_its_ledger_reservation(tmp_path):
    # 3 steps reserved for a plan of 2 epochs = 8 steps: the 4th step is refused before touching the data,
    # and the commit records the 3 steps taken.
    path, led = ledger(tmp_path, reserve=poisson(3))
    private = make(ledger=path, dataset_id="d", run_id="r")
    state, taken, refused = run(private, private.init(), 8)
    assert (taken, refused) == (3, True)
    assert private.sampler.step == 3 and private.state_dict(state)["sampler"]["step"] == 3  # not consumed
    private.commit_ledger()
    (rec,) = led.runs()
    assert rec.status == "committed" and rec.actual_events[0]["steps"] == 3


def test_a_reservation_of_another_mechanism_limits_by_its_epsilon(tmp_path):
    # Reserved: 8 steps at sigma 1.2 (epsilon 4.61); the run uses sigma 1: 3 steps (4.42) fit, 4 (4.87) do not.
    path, led = ledger(tmp_path, reserve=poisson(8, sigma=1.2))
    private = make(ledger=path, dataset_id="d", run_id="r")
    state, taken, refused = run(private, private.init(), 8)
    reserved = accounting.events_epsilon(poisson(8, 1.2), DELTA, accountant="rdp")
    assert refused and taken == 3
    assert accounting.events_epsilon(poisson(taken), DELTA, accountant="rdp") <= reserved
    assert accounting.events_epsilon(poisson(taken + 1), DELTA, accountant="rdp") > reserved


def test_reserve_true_reserves_the_plan_and_commits_the_steps_taken(tmp_path):
    path, led = ledger(tmp_path)
    private = make(ledger=path, dataset_id="d", run_id="r", reserve=True)
    assert led.run("r").status == "reserved" and led.run("r").planned_events[0]["steps"] == 8
    run(private, private.init(), 5)
    private.commit_ledger()
    assert led.run("r").status == "committed" and led.run("r").actual_events[0]["steps"] == 5
    assert led.run("r").actual_events[0]["l2_clip_norm"] == 1.0


def test_adaptive_clipping_goes_through_the_gate(tmp_path):
    path, _ = ledger(tmp_path, reserve=poisson(2))
    private = make(ledger=path, dataset_id="d", run_id="r", adaptive_clipping=True)
    assert private.adaptive is not None
    _, taken, refused = run(private, private.init(), 8)
    assert (taken, refused) == (2, True)


def test_state_dict_resumes_bit_identically(tmp_path):
    from jaxdp.train import checkpoint
    straight = make()
    s_state, _, _ = run(straight, straight.init(), 6)
    first = make()
    f_state, _, _ = run(first, first.init(), 3)
    saved = first.state_dict(f_state)
    # to disk and back: the arrays in a checkpoint file, the rest as JSON metadata
    checkpoint.save(str(tmp_path / "ck"), saved["train_state"],
                    json.loads(json.dumps({k: v for k, v in saved.items() if k != "train_state"})))
    resumed = make()  # a new engine and object with the same arguments
    arrays, meta = checkpoint.load(str(tmp_path / "ck"), resumed.init())
    r_state = resumed.load_state_dict(dict(meta, train_state=arrays))
    r_state, _, _ = run(resumed, r_state, 3)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(s_state.params), leaves(r_state.params)))
    assert resumed.get_epsilon(DELTA) == straight.get_epsilon(DELTA) and resumed.steps_taken == 6
    assert resumed.sampler.step == straight.sampler.step == 6


def test_load_state_dict_refuses_an_inconsistent_state_dict():
    private = make()
    state, _, _ = run(private, private.init(), 2)
    saved = private.state_dict(state)
    saved["accountant"]["history"][0]["steps"] = 1
    with pytest.raises(ValueError, match="accountant steps 1 vs train state step 2"):
        make().load_state_dict(saved)
    saved = private.state_dict(state)
    saved["sampler"] = dict(saved["sampler"], step=5)
    with pytest.raises(ValueError, match="sampler step 5 vs train state step 2"):
        make().load_state_dict(saved)


def test_nonprivate_twin_has_the_same_surface(tmp_path):
    engine = jaxdp.PrivacyEngine()
    args = dict(loss_fn=loss_fn, params=params0(), optimizer=optax.sgd(0.1), dataset_size=N, batch_size=B,
                seed=7, epochs=2)
    base = engine.make_nonprivate(**args)
    state, taken, refused = run(base, base.init(), 8)
    assert (taken, refused, base.get_epsilon(DELTA), base.noise_multiplier) == (8, False, float("inf"), 0.0)
    first = engine.make_nonprivate(**args)
    f_state, _, _ = run(first, first.init(), 4)
    again = engine.make_nonprivate(**args)
    r_state = again.load_state_dict(first.state_dict(f_state))
    r_state, _, _ = run(again, r_state, 4)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state.params), leaves(r_state.params)))
    # the ledger refuses a non-private run on protected data, before any step
    path, _ = ledger(tmp_path)
    with pytest.raises(ReservationRequiredError, match="non-private"):
        engine.make_nonprivate(**args, ledger=path, dataset_id="d", run_id="np")


def test_ledger_false_is_deprecated_and_still_gated():
    with pytest.warns(DeprecationWarning, match="defer_ledger=True"):
        private = make(ledger=False)
    batch, mask = next(private.batches(DATA, 1))
    with pytest.raises(ReservationRequiredError, match="open_ledger"):
        private.step(private.init(), batch, mask)
    private.open_ledger()  # no ledger configured: nothing to reserve, the run may step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, _ = private.step(private.init(), batch, mask)
    assert int(state.step) == 1


def test_lm_finetune_goes_through_the_gate(tmp_path):
    from flax import nnx

    from jaxdp.lm import GPT2, GPT2Config, finetune
    model = GPT2(GPT2Config(vocab_size=257, n_positions=8, n_embd=8, n_layer=1, n_head=1), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 256, (16, 8)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    path = str(tmp_path / "ledger.db")
    led = Ledger.open(path, create=True)
    led.register_dataset("text", max_epsilon=50.0, delta=DELTA, accountant="rdp")
    common = dict(learning_rate=1e-2, seed=0, batch_size=4, noise_multiplier=1.0, key=jax.random.key(0),
                  method="vmap", ledger=path, dataset_id="text")
    with pytest.raises(ReservationRequiredError, match="no reservation"):
        finetune(model, tokens, mask, steps=3, run_id="ft0", **common)
    with pytest.raises(ReservationRequiredError, match="non-private"):
        finetune(model, tokens, mask, steps=3, run_id="ft0", **dict(common, private=False))
    led.reserve("text", "ft1", [{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 2}])
    with pytest.raises(PrivacyBudgetExhausted, match="covers 2 steps"):
        finetune(model, tokens, mask, steps=3, run_id="ft1", **common)
    assert led.run("ft1").status == "committed" and led.run("ft1").actual_events[0]["steps"] == 2
    res = finetune(model, tokens, mask, steps=2, run_id="ft2", reserve=True, **common)
    assert res.steps == 2 and led.run("ft2").status == "committed"
    assert led.run("ft2").actual_events[0]["steps"] == 2
