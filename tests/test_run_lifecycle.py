"""Crash-safe runs: a killed or interrupted `jaxdp train` resumes under its own reservation, bit-identically, and
commits exactly the steps it took; checkpoints are one integrity-checked unit; nothing restarts silently.

Kills are simulated in-process at deterministic points (an exception nothing in jaxdp catches, raised where
the kill would land); tests/test_run_lifecycle_slow.py and benchmarks/ledger_faults.py use real `kill -9`.
"""
from __future__ import annotations

import io
import json
import os
import socket
import urllib.request

import jax
import numpy as np
import pytest

from jaxdp.cli import main
from jaxdp.ledger import Ledger
from jaxdp.train import DPTrainer, compare
from jaxdp.train import checkpoint as ckpt_lib
from jaxdp.train import trainer as trainer_mod


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` in the code under test can swallow it."""


def config(tmp_path, ledger=None, **out):
    cfg = {
        "model": {"name": "logreg"},
        "data": {"name": "digits"},
        "optimizer": {"name": "sgd", "learning_rate": 2.0},
        "training": {"epochs": 2, "batch_size": 256, "seed": 7, "accountant": "rdp",
                     "dp": {"enabled": True, "epsilon": None, "delta": 1e-5, "max_grad_norm": 1.0,
                            "noise_multiplier": 1.0}},
        "output": dict({"dir": str(tmp_path / "run"), "progress": False}, **out),
    }
    if ledger:
        cfg["ledger"] = {"path": ledger}
    return cfg


def new_ledger(tmp_path, budget=10.0):
    path = str(tmp_path / "ledger.db")
    led = Ledger.init(path)
    led.register_dataset("digits", budget, 1e-5, accountant="rdp")
    return path, led


def params(trainer):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(trainer.state.params)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: the reference for bit-identity."""
    tmp = tmp_path_factory.mktemp("straight")
    t = DPTrainer(config(tmp), log=False)
    t.train()
    return t


def test_killed_before_first_checkpoint_resumes_under_its_reservation(tmp_path, monkeypatch, straight):
    path, led = new_ledger(tmp_path)
    cfg = config(tmp_path, ledger=path)
    real_save = ckpt_lib.save

    def die(*a, **k):
        raise Killed()
    monkeypatch.setattr(ckpt_lib, "save", die)  # dies at the first checkpoint: after the reservation
    with pytest.raises(Killed):
        DPTrainer(cfg, log=False).train()
    assert [r.status for r in led.runs()] == ["reserved"]
    monkeypatch.setattr(ckpt_lib, "save", real_save)
    again = DPTrainer(cfg, log=False)
    s = again.train()
    runs = led.runs()
    # one run id across the restart, no orphan, the steps actually taken committed
    assert [(r.run_id, r.status) for r in runs] == [(again.run_id, "committed")]
    assert sum(e["steps"] for e in runs[0].actual_events) == s["steps"] == straight.total_steps
    assert all(np.array_equal(a, b) for a, b in zip(params(again), params(straight)))


def test_killed_between_final_checkpoint_and_commit_commits_on_rerun(tmp_path, monkeypatch):
    path, led = new_ledger(tmp_path)
    cfg = config(tmp_path, ledger=path)

    def die(self):
        raise Killed()
    monkeypatch.setattr(trainer_mod.DPTrainer, "_ledger_commit", die)
    with pytest.raises(Killed):
        DPTrainer(cfg, log=False).train()
    monkeypatch.undo()
    t = DPTrainer(cfg, log=False)
    s = t.train()
    assert s["status"] == "finished"
    (run,) = led.runs()
    assert run.status == "committed" and sum(e["steps"] for e in run.actual_events) == s["steps"]
    assert led.spent("digits").runs_reserved == 0


def test_kill_right_after_a_checkpoint_array_file_is_resumable_and_bit_identical(tmp_path, monkeypatch, straight):
    """The old two-file checkpoint died un-resumable when killed between its .npz and its .json."""
    real = ckpt_lib.atomic_write
    npz_writes = []

    def write_then_die(path, data, **kw):
        real(path, data, **kw)
        if path.endswith(".npz"):
            npz_writes.append(path)
            if len(npz_writes) == 2:  # the second epoch's checkpoint
                raise Killed()
    monkeypatch.setattr(ckpt_lib, "atomic_write", write_then_die)
    cfg = config(tmp_path)
    with pytest.raises(Killed):
        DPTrainer(cfg, log=False).train()
    monkeypatch.undo()
    t = DPTrainer(cfg, log=False)
    t.train()
    assert all(np.array_equal(a, b) for a, b in zip(params(t), params(straight)))
    files = os.listdir(tmp_path / "run" / "checkpoint")
    assert not [f for f in files if f.startswith(".tmp")]


def _edit_checkpoint_accountant_steps(run_dir, new_steps):
    """Edit the accountant's step count in the checkpoint metadata, whatever the format."""
    d = os.path.join(run_dir, "checkpoint")
    legacy = os.path.join(d, "checkpoint.json")
    if os.path.exists(legacy):
        meta = json.load(open(legacy))
        meta["accountant"]["history"][0]["steps"] = new_steps
        json.dump(meta, open(legacy, "w"))
        return
    (_, path), *_ = ckpt_lib.list_checkpoints(d)
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    meta = json.loads(entries["__meta__"].tobytes())
    meta["accountant"]["history"][0]["steps"] = new_steps
    entries["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **entries)
    open(path, "wb").write(buf.getvalue())


def test_edited_checkpoint_is_refused_not_resumed(tmp_path):
    cfg = config(tmp_path)
    DPTrainer(cfg, log=False).train(max_epochs=1)
    _edit_checkpoint_accountant_steps(tmp_path / "run", 1)  # epsilon would be reported far too low
    with pytest.raises(ValueError, match="integrity check"):
        DPTrainer(cfg, log=False).train()


def test_consistently_forged_checkpoint_fails_the_cross_checks(tmp_path):
    cfg = config(tmp_path)
    t = DPTrainer(cfg, log=False)
    t.train(max_epochs=1)
    d = str(tmp_path / "run" / "checkpoint")
    (step, path), *_ = ckpt_lib.list_checkpoints(d)
    arrays, meta = ckpt_lib.read(path)
    meta["accountant"]["history"][0]["steps"] = 1
    del meta["_leaf_kinds"], meta["_format"]
    ckpt_lib.save(d, t.state, meta, step=step)  # a valid digest over forged metadata
    with pytest.raises(ValueError, match="accountant steps 1 vs train state step"):
        DPTrainer(cfg, log=False).train()


def test_deleted_checkpoint_is_never_a_silent_restart(tmp_path):
    path, led = new_ledger(tmp_path)
    cfg = config(tmp_path, ledger=path)
    first = DPTrainer(cfg, log=False)
    first.train(max_epochs=1)
    d = tmp_path / "run" / "checkpoint"
    for name in os.listdir(d):
        os.unlink(d / name)
    with pytest.raises(ValueError, match="--fresh"):
        DPTrainer(cfg, log=False).train()
    # --fresh: the old files are moved aside (not deleted) and a new run (new id, own reservation) starts
    fresh = DPTrainer(cfg, log=False, resume=False)
    fresh.train()
    assert fresh.run_id != first.run_id
    assert [p for p in os.listdir(tmp_path / "run") if p.startswith("previous-")]
    assert {r.run_id: r.status for r in led.runs()} == {first.run_id: "reserved", fresh.run_id: "committed"}


def test_finished_run_rerun_trains_nothing(tmp_path, capsys):
    cfg = config(tmp_path)
    DPTrainer(cfg, log=False).train()
    again = DPTrainer(cfg, log=True)
    s = again.train()
    captured = capsys.readouterr()
    assert s["status"] == "finished" and "nothing was trained" in captured.out + captured.err


def test_compare_with_a_ledger_refuses_before_training(tmp_path):
    path, led = new_ledger(tmp_path)
    with pytest.raises(ValueError, match="refused before training anything"):
        compare(config(tmp_path, ledger=path), out_dir=str(tmp_path / "cmp"), log=False)
    assert led.runs() == [] and not (tmp_path / "cmp" / "dp" / "checkpoint").exists()


def test_ctrl_c_prints_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    import yaml
    path, led = new_ledger(tmp_path)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path, ledger=path)))
    calls = []
    real = trainer_mod.DPTrainer.evaluate

    def interrupt(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(trainer_mod.DPTrainer, "evaluate", interrupt)
    assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted at step" in err[0] and "re-run the same command to resume" in err[0]
    (run,) = led.runs()
    assert run.run_id in err[0] and run.status == "reserved"
    monkeypatch.undo()
    assert main(["train", "--config", str(cfg_path), "--no-progress", "--json"]) == 0
    assert [r.status for r in led.runs()] == ["committed"]


# ------------------------------------------------------------------------------------------------ telemetry
def test_unreachable_pushgateway_and_taken_port_never_stop_training(tmp_path, recwarn):
    pytest.importorskip("prometheus_client")
    from jaxdp.telemetry import DPMetrics, TelemetryError
    m = DPMetrics("m", "d", "r", pushgateway="http://127.0.0.1:9")  # nothing listens on port 9
    m.push_timeout = 2
    assert m.push() is False and m.push_failures == 1
    m.record_epoch(epsilon=1.0)
    assert m.push_failures == 2 and "dp_telemetry_push_failures" in m.exposition()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(TelemetryError, match=f"{port}.*choose another"):
            DPMetrics("m", "d", "r", port=port)
        path, led = new_ledger(tmp_path)
        cfg = config(tmp_path, ledger=path, telemetry_port=port, pushgateway="http://127.0.0.1:9")
        cfg["training"]["epochs"] = 1
        s = DPTrainer(cfg, log=False).train()
    finally:
        taken.close()
    assert s["status"] == "finished" and [r.status for r in led.runs()] == ["committed"]
    assert any("telemetry is off" in str(w.message) for w in recwarn)


def test_reserved_gauge_and_compare_with_a_telemetry_port(tmp_path):
    pytest.importorskip("prometheus_client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ledger_path = str(tmp_path / "l.db")
    Ledger.init(ledger_path)  # a ledger where digits is not protected: no reservation is made
    cfg = config(tmp_path, ledger=ledger_path, telemetry_port=port)
    cfg["training"]["epochs"] = 1
    seen = {}
    real = trainer_mod.DPTrainer._ledger_open

    def scrape(self, *a, **k):
        real(self, *a, **k)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        seen[self.dp] = [ln for ln in body.splitlines() if ln.startswith("dp_training_ledger_reserved{")]
    trainer_mod.DPTrainer._ledger_open = scrape
    try:
        out = compare(cfg, out_dir=str(tmp_path / "cmp"), log=False)  # both runs serve on the same port in turn
    finally:
        trainer_mod.DPTrainer._ledger_open = real
    assert os.path.exists(tmp_path / "cmp" / "comparison.json") and out["epsilon"] is not None
    assert seen[True] and all(ln.endswith(" 0.0") for ln in seen[True])


# ------------------------------------------------------------ the config hash does not depend on the checkout
NET_PY = ("import numpy as np\n"
          "from flax import nnx\n"
          "class Net(nnx.Module):\n"
          "    def __init__(self, input_shape, num_classes, *, rngs):\n"
          "        self.dense = nnx.Linear(int(np.prod(input_shape)), num_classes, rngs=rngs)\n"
          "    def __call__(self, x):\n"
          "        return self.dense(x.reshape(x.shape[0], -1))\n")


def checkout(root, ledger):
    """A project folder: its own model file next to its config (``model.module: net.py:Net``)."""
    import yaml
    os.makedirs(root)
    (root / "net.py").write_text(NET_PY)
    cfg = config(root, ledger=ledger)
    cfg["model"] = {"module": "net.py:Net"}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    return root / "c.yaml"


def test_a_moved_checkout_resumes_its_run_and_a_changed_config_is_still_refused(tmp_path):
    import shutil

    import yaml
    path, led = new_ledger(tmp_path)
    first = DPTrainer(str(checkout(tmp_path / "a", path)), out_dir=str(tmp_path / "a" / "run"), log=False)
    first.train(max_epochs=1)
    assert first.status == "running" and led.run(first.run_id).status == "reserved"
    shutil.copytree(tmp_path / "a", tmp_path / "b")   # the checkout re-cloned (or moved) elsewhere
    moved = DPTrainer(str(tmp_path / "b" / "c.yaml"), out_dir=str(tmp_path / "b" / "run"), log=False)
    assert moved.cfg["model"]["module"] == str(tmp_path / "b" / "net.py") + ":Net"   # resolved at its new place
    assert moved.config_hash == first.config_hash
    out = moved.train()
    assert out["status"] == "finished" and out["run_id"] == first.run_id and out["config_hash"] == first.config_hash
    assert led.run(first.run_id).status == "committed" and len(led.runs()) == 1
    # a genuinely changed config in the moved checkout is still another config
    cfg = yaml.safe_load((tmp_path / "b" / "c.yaml").read_text())
    cfg["optimizer"]["learning_rate"] = 1.0
    (tmp_path / "b" / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="different config"):
        DPTrainer(str(tmp_path / "b" / "c.yaml"), out_dir=str(tmp_path / "b" / "run"), log=False).train()


def test_a_run_recorded_with_the_legacy_absolute_path_hash_still_resumes(tmp_path, monkeypatch):
    """Migration: a run whose checkpoint, run.json and reservation hold the old hash (the module's absolute
    path hashed) resumes where it was written, keeping that hash and its run id."""
    from jaxdp.train.config import config_hash, config_hashes, load_config
    path, led = new_ledger(tmp_path)
    cfg_path = str(checkout(tmp_path / "a", path))
    new, legacy = config_hashes(load_config(cfg_path))
    assert new == config_hash(load_config(cfg_path)) != legacy
    with monkeypatch.context() as m:   # the trainer as it was: the absolute path hashed
        m.setattr(trainer_mod, "config_hashes", lambda cfg: config_hashes(cfg)[1:])
        old = DPTrainer(cfg_path, log=False)
        old.train(max_epochs=1)
    assert old.config_hash == legacy and led.run(old.run_id).config_hash == legacy
    resumed = DPTrainer(cfg_path, log=False)
    out = resumed.train()
    assert out["status"] == "finished" and out["run_id"] == old.run_id and out["config_hash"] == legacy
    assert led.run(old.run_id).status == "committed"
    with open(tmp_path / "a" / "run" / "run.json") as f:
        assert json.load(f)["config_hash"] == legacy


def test_the_ledger_gate_accepts_a_reservation_under_another_computation_of_the_hash(tmp_path):
    from jaxdp.ledger.gate import LedgerGate, RunStateError
    path, led = new_ledger(tmp_path)
    mech = [{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10}]
    led.reserve("digits", "r", mech, config_hash="old")
    events = lambda n: [dict(mech[0], steps=n)]   # noqa: E731
    with pytest.raises(RunStateError, match="another config"):
        LedgerGate.open(led, dataset_id="digits", run_id="r", events=events, config_hash="new")
    gate = LedgerGate.open(led, dataset_id="digits", run_id="r", events=events, config_hash="new",
                           accept_config_hashes=("new", "old"))
    assert gate.reserved and gate.limit == 10


# ------------------------------------------------------------------------------------ real kill -9 (slow)
@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_run_file", "after_reserve", "after_checkpoint", "before_commit"])
def test_sigkill_at_each_point_then_rerun(tmp_path, point, straight):
    """`jaxdp train` killed with SIGKILL at a deterministic point, then re-run: one run id, committed with the
    steps taken, no open reservation, bit-identical to the uninterrupted run (benchmarks/ledger_faults.py does
    the same at random moments)."""
    import signal
    import subprocess
    import sys

    import yaml
    path, led = new_ledger(tmp_path)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path, ledger=path)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "jaxdp", "train", "--config", str(cfg_path), "--no-progress", "--json"]
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    first = subprocess.run(cmd, env=dict(env, JAXDP_FAULT_INJECT=point), capture_output=True, text=True, cwd=root)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    assert second.returncode == 0, second.stderr[-2000:]
    (run,) = led.runs()
    assert run.status == "committed" and sum(e["steps"] for e in run.actual_events) == straight.total_steps
    t = DPTrainer.load(str(tmp_path / "run"))
    assert all(np.array_equal(a, b) for a, b in zip(params(t), params(straight)))
