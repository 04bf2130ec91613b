"""jaxdp under ``jax.distributed`` with REAL processes: 2 processes x 2 CPU devices (gloo collectives,
coordinator on 127.0.0.1) against one process with 4 CPU devices, started through ``jaxdp launch``.

Every subprocess has a timeout, so nothing here can hang the suite. XLA compiles dominate the time: each
run compiles one step shape per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxdp import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
CHECKS = str(ROOT / "tests" / "multi_process_checks.py")
TIMEOUT = 400  # seconds per multi-process job (a loaded 2-core CI machine compiles slowly)


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", JAXDP_HEARTBEAT_TIMEOUT="10")
    for k in ("JAXDP_COORDINATOR", "JAXDP_NUM_PROCESSES", "JAXDP_PROCESS_ID", "JAX_COORDINATOR_ADDRESS",
              "JAXDP_LEDGER"):
        env.pop(k, None)
    env.update(extra)
    return env


def one_process(cmd: list[str], **env) -> subprocess.Popen:
    """One process with 4 forced CPU devices (the reference)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", **env))


def two_processes(cmd: list[str], **env) -> subprocess.Popen:
    """2 processes x 2 CPU devices via `jaxdp launch`."""
    launch = [sys.executable, "-m", "jaxdp", "launch", "--local-processes", "2", "--devices-per-process", "2",
              "--timeout", str(TIMEOUT - 20), "--grace", "5", "--"]
    return subprocess.Popen(launch + cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**env))


def finish(proc: subprocess.Popen, ok: bool = True) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT}s:\n{err[-3000:]}")
    if ok:
        assert proc.returncode == 0, err[-4000:]
    return proc.returncode, out, err


def _read(d: Path, n: int) -> list[dict]:
    return [json.loads((d / f"proc{i}.json").read_text()) for i in range(n)]


def _maxdiff(a, b) -> float:
    import jax
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------------------------------------------------
# PrivacyEngine: 2 x 2 equals 1 x 4; identical everywhere; one noise draw


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mp_engine")
    jobs = {"ref": one_process([sys.executable, CHECKS, "train", str(base / "ref")]),
            "two": two_processes([sys.executable, CHECKS, "train", str(base / "two")]),
            "noise": two_processes([sys.executable, CHECKS, "noise", str(base / "noise")])}
    for p in jobs.values():
        finish(p)
    return {"ref": _read(base / "ref", 1)[0], "two": _read(base / "two", 2), "noise": _read(base / "noise", 2)}


def test_two_processes_equal_one_process_four_devices(engine_runs):
    ref, (p0, p1) = engine_runs["ref"], engine_runs["two"]
    assert ref["process_count"] == 1 and ref["device_count"] == 4
    assert p0["process_count"] == 2 and p0["device_count"] == 4 and p0["local_device_count"] == 2
    assert p0["jaxdp_device_counts"] == [2, 4] and ref["jaxdp_device_counts"] == [4, 4]  # this process, the job
    assert ref["steps"] == p0["steps"] == p1["steps"] == 20
    # float summation order only (psum over 4 devices in one process vs gloo across two)
    assert ref["param_change"] > 0.05
    assert _maxdiff(ref["params"], p0["params"]) < 1e-6
    # accountants agree exactly, step by step
    assert ref["epsilons"] == p0["epsilons"] == p1["epsilons"]
    assert ref["num_examples_last"] == p0["num_examples_last"] == p1["num_examples_last"]


def test_update_bit_identical_on_every_process(engine_runs):
    p0, p1 = engine_runs["two"]
    # SHA-256 of the params after every step (also checks the 2 local replicas of each process agree)
    assert len(p0["param_hashes"]) == 20 and p0["param_hashes"] == p1["param_hashes"]
    assert len(set(p0["param_hashes"])) == 20


def test_broadcast_from_main_gives_process_0s_value(engine_runs):
    ref, (p0, p1) = engine_runs["ref"], engine_runs["two"]
    want = {"run_id": "run-of-process-0", "n": [1]}
    assert ref["broadcast"] == p0["broadcast"] == p1["broadcast"] == want


def test_each_process_loads_only_its_shard(engine_runs):
    ref, (p0, p1) = engine_runs["ref"], engine_runs["two"]
    # the same global Poisson batch on both processes; each loaded half the rows, disjoint, together the batch
    assert p0["global_batch_step0"] == p1["global_batch_step0"] == ref["global_batch_step0"]
    assert p0["loaded_rows_step0"] == p1["loaded_rows_step0"] == ref["loaded_rows_step0"] // 2
    assert not set(p0["loaded_indices_step0"]) & set(p1["loaded_indices_step0"])
    assert sorted(p0["loaded_indices_step0"] + p1["loaded_indices_step0"]) == ref["global_batch_step0"]
    assert p0["local_losses_shape"] == [p0["loaded_rows_step0"]]  # per-example stats: this process's rows


def test_budget_stop_on_all_processes_at_the_same_step(engine_runs):
    ref, (p0, p1) = engine_runs["ref"], engine_runs["two"]
    assert ref["max_steps"] == p0["max_steps"] == p1["max_steps"] == 20
    assert ref["budget_stopped_at"] == p0["budget_stopped_at"] == p1["budget_stopped_at"] == 20


def _noise_ok(r: dict) -> bool:
    """The noise-std check: 20 steps x 2000 coordinates = 40,000 draws; the sample std has relative standard
    error 1/sqrt(2 * 40000) = 0.35%, so a 3% band is > 8 SE wide yet excludes sqrt(2) (one draw per process)."""
    return r["num_samples"] == 40000 and abs(r["measured_std"] / r["expected_std"] - 1) < 0.03


def test_noise_std_is_sigma_c_over_e_not_sqrt_processes(engine_runs):
    n0, n1 = (r["jaxdp"] for r in engine_runs["noise"])
    assert _noise_ok(n0), (n0["measured_std"], n0["expected_std"])
    assert abs(n0["mean"]) < 5 * n0["expected_std"] / np.sqrt(40000)
    assert n0["update_hashes"] == n1["update_hashes"] and n0["steps_differ"]  # one draw, the same everywhere


def test_negative_control_noise_on_every_process_is_caught(engine_runs):
    w0, w1 = (r["every_process"] for r in engine_runs["noise"])
    assert not _noise_ok(w0)
    assert abs(w0["measured_std"] / w0["expected_std"] - np.sqrt(2)) < 0.05
    assert w0["update_hashes"] == w1["update_hashes"]  # the sum is shared: the check must use the std


def test_killed_process_stops_the_other_within_bounded_time(tmp_path):
    """Without the launcher: process 1 dies by SIGKILL at step 5; process 0 must exit on its own with an error
    that says another process died, within the heartbeat timeout (10 s) plus slack."""
    port = str(__import__("jaxdp.launch", fromlist=["free_port"]).free_port())
    procs = []
    for i in range(2):
        env = _env(JAXDP_COORDINATOR=f"127.0.0.1:{port}", JAXDP_NUM_PROCESSES="2", JAXDP_PROCESS_ID=str(i),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen([sys.executable, CHECKS, "kill", str(tmp_path)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        procs[1].wait(timeout=TIMEOUT)
        died = time.monotonic()
        _, err0 = procs[0].communicate(timeout=120)
        waited = time.monotonic() - died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0
    assert waited < 90, waited  # heartbeat 10 s; the rest is slack for a loaded machine
    assert "another task died" in err0 or "unhealthy" in err0, err0[-2000:]
    assert not (tmp_path / "proc0.json").exists()  # it did not finish as if nothing happened


# ---------------------------------------------------------------------------------------------------------
# `jaxdp train` through `jaxdp launch`: equal to one process, one ledger commit, kill and resume


def _config(tmp: Path, ledger: str | None = None) -> str:
    cfg = {"model": {"name": "mlp", "options": {"hidden": [16]}}, "data": {"name": "digits"},
           "optimizer": {"name": "sgd", "learning_rate": 0.5},
           "training": {"epochs": 2, "batch_size": 160, "seed": 7, "accountant": "rdp", "method": "vmap",
                        "dp": {"enabled": True, "epsilon": 20.0, "delta": 1e-5, "max_grad_norm": 1.0,
                               "noise_multiplier": 1.0}},
           "output": {"progress": False}}
    if ledger:
        cfg["ledger"] = {"path": ledger, "run_id": "mp-run"}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _ckpt(run_dir: Path) -> tuple[dict, dict]:
    """The arrays and metadata of the run's newest checkpoint (integrity-checked)."""
    from jaxdp.train import checkpoint
    found = checkpoint.list_checkpoints(str(run_dir / "checkpoint"))
    assert found, f"no checkpoint in {run_dir}"
    return checkpoint.read(found[0][1])


def _ckpt_params(run_dir: Path) -> list[np.ndarray]:
    arrays, _ = _ckpt(run_dir)
    return [arrays[k] for k in sorted(arrays, key=lambda k: int(k[1:]))]


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    from jaxdp.ledger import Ledger
    base = tmp_path_factory.mktemp("mp_train")
    ledger = str(base / "ledger.db")
    Ledger.open(ledger, create=True).register_dataset("digits", max_epsilon=50.0, delta=1e-5, accountant="rdp")
    for d in ("refcfg", "two", "kill"):
        (base / d).mkdir()
    cfg_ref = _config(base / "refcfg")
    cfg_two = _config(base / "two", ledger)
    cfg_kill = _config(base / "kill", None)
    train = ["-m", "jaxdp", "train", "--json", "--config"]
    jobs = {
        "ref": one_process([sys.executable] + train + [cfg_ref, "--out", str(base / "ref")]),
        "two": two_processes(["jaxdp", "train", "--json", "--config", cfg_two, "--out", str(base / "two" / "run")]),
        "killed": two_processes([sys.executable, str(ROOT / "tests" / "multi_process_train.py"), "train", "--json",
                                 "--config", cfg_kill, "--out", str(base / "kill" / "run")],
                                JAXDP_TEST_DIE_AFTER_STEP="9"),
    }
    res = {k: finish(p, ok=k != "killed") for k, p in jobs.items()}
    ckpt_after_kill = _ckpt(base / "kill" / "run")[1]
    resumed = finish(two_processes(["jaxdp", "train", "--config", cfg_kill, "--out", str(base / "kill" / "run")]))
    return {"base": base, "ledger": ledger, "res": res, "resumed": resumed, "ckpt_after_kill": ckpt_after_kill}


def test_jaxdp_train_two_processes_equals_one_process(train_runs):
    base, res = train_runs["base"], train_runs["res"]
    ref = json.loads((base / "ref" / "metrics.json").read_text())
    two = json.loads((base / "two" / "run" / "metrics.json").read_text())
    # q = 160 / 1437, 2 epochs = 18 steps; every padded batch has 192 rows (one compile)
    assert ref["status"] == two["status"] == "finished" and ref["steps"] == two["steps"] == 18
    assert ref["epsilon"] == two["epsilon"]
    for a, b in zip(_ckpt_params(base / "ref"), _ckpt_params(base / "two" / "run")):
        assert a.shape == b.shape and float(np.max(np.abs(a.astype(np.float64) - b))) < 1e-6
    assert abs(ref["epochs"][-1]["train_loss"] - two["epochs"][-1]["train_loss"]) < 1e-5  # over all rows
    # side effects once: process 0 printed the summary line (process 1 nothing), one ledger commit
    out = res["two"][1]
    assert sum(line.startswith("{") for line in out.splitlines()) == 1
    from jaxdp.ledger import Ledger
    led = Ledger.open(train_runs["ledger"])
    runs = led.runs("digits")
    assert [r.run_id for r in runs] == ["mp-run"] and runs[0].status == "committed"
    kinds = [h["kind"] for h in led.history()]
    assert sum(k == "commit" for k in kinds) == 1, kinds


def test_kill_then_restart_resumes_bit_identical(train_runs):
    base, (rc, _, err) = train_runs["base"], train_runs["res"]["killed"]
    assert rc == 1 and "jaxdp launch: process 1 was killed by SIGKILL" in err
    assert train_runs["ckpt_after_kill"]["sampler"]["step"] == 9  # died after the epoch-1 checkpoint
    _, out, _ = train_runs["resumed"]
    assert "resuming" in out and "at step 9" in out
    resumed = json.loads((base / "kill" / "run" / "metrics.json").read_text())
    assert resumed["status"] == "finished" and resumed["steps"] == 18
    # bit-identical to the uninterrupted 2-process run of the same config
    two = json.loads((base / "two" / "run" / "metrics.json").read_text())
    assert resumed["epsilon"] == two["epsilon"]
    for a, b in zip(_ckpt_params(base / "kill" / "run"), _ckpt_params(base / "two" / "run")):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Start-up from the environment (no processes needed)


def test_initialize_from_env_reads_the_variables(monkeypatch):
    assert dist.initialize_from_env({}) is False  # nothing set: single process, unchanged
    assert dist.initialize_from_env({"JAXDP_NUM_PROCESSES": "1"}) is False
    with pytest.raises(ValueError, match="JAXDP_PROCESS_ID not set"):
        dist.initialize_from_env({"JAXDP_COORDINATOR": "127.0.0.1:1234", "JAXDP_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="must be an integer"):
        dist.initialize_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                                  "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"must be in 0\.\.1"):
        dist.initialize_from_env({"JAXDP_COORDINATOR": "h:1", "JAXDP_NUM_PROCESSES": "2", "JAXDP_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="JAXDP_DISTRIBUTED"):
        dist.initialize_from_env({"JAXDP_DISTRIBUTED": "yes"})
    assert dist.is_main_process() and dist.process_count() == 1 and dist.all_equal([1, 2])
    assert dist.process_sum(1.5, 2.0) == (1.5, 2.0)


def test_launch_command_and_env():
    from jaxdp import launch
    env = launch.child_env(1, 3, 4567, 2, base={"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"})
    assert env["JAXDP_COORDINATOR"] == "127.0.0.1:4567" and env["JAXDP_NUM_PROCESSES"] == "3"
    assert env["JAXDP_PROCESS_ID"] == "1" and env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
    assert launch._command(["--", "jaxdp", "train"])[:3] == [sys.executable, "-m", "jaxdp"]
    with pytest.raises(ValueError, match="needs a command"):
        launch._command([])
