"""Fault injection: kill -9 `jaxdp train` (with a privacy ledger) at random moments, re-run it, and check.

Each trial starts ``jaxdp train`` in a fresh output directory against one shared SQLite ledger, sends SIGKILL
after a random delay (uniform over the length of an uninterrupted run, start-up included), then re-runs the same
command until it exits. Afterwards:

* resumable      -- the re-run exited 0 and reported status "finished";
* bit-identical  -- every array of its final checkpoint (params, optimiser state, noise key, step) equals the
                    uninterrupted reference run's;
* orphans        -- reservations still open in the ledger once every trial is done (target 0);
* duplicates     -- trials charged to the ledger under more than one run id (target 0);
* spend          -- the ledger's composed epsilon vs the composition of the steps the runs actually took
                    (from each run's metrics.json), which must be equal.

    python benchmarks/ledger_faults.py --trials 20 [--workdir DIR] [--seed 0]

Also runs one trial per deterministic kill point (``JAXDP_FAULT_INJECT``) with ``--points``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTS = ("after_run_file", "after_reserve", "after_checkpoint", "before_commit")


def config(ledger: str) -> dict:
    return {
        "model": {"name": "logreg"},
        "data": {"name": "digits"},
        "optimizer": {"name": "sgd", "learning_rate": 2.0},
        "training": {"epochs": 3, "batch_size": 256, "seed": 11, "accountant": "rdp",
                     "dp": {"enabled": True, "epsilon": None, "delta": 1e-5, "max_grad_norm": 1.0,
                            "noise_multiplier": 1.0}},
        "ledger": {"path": ledger},
        "output": {"dir": "unused", "progress": False},
    }


def train_cmd(cfg_path: str, out: str) -> list[str]:
    return [sys.executable, "-m", "jaxdp", "train", "--config", cfg_path, "--out", out, "--no-progress", "--json"]


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    e.pop("JAXDP_FAULT_INJECT", None)
    e.update(extra or {})
    return e


def final_arrays(out: str) -> dict:
    sys.path.insert(0, ROOT)
    from jaxdp.train import checkpoint
    (_, path), *_ = checkpoint.list_checkpoints(os.path.join(out, "checkpoint"))
    arrays, _meta = checkpoint.read(path)
    return arrays


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run_to_end(cfg_path: str, out: str, tries: int = 3) -> tuple[bool, dict | None]:
    for _ in range(tries):
        p = subprocess.run(train_cmd(cfg_path, out), env=env(), capture_output=True, text=True, cwd=ROOT)
        if p.returncode == 0:
            try:
                return True, json.loads(p.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                return False, None
        sys.stderr.write(f"  re-run failed ({p.returncode}): {p.stderr.strip()[-400:]}\n")
        return False, None
    return False, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--points", action="store_true", help="also one trial per deterministic kill point")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--summarize", action="store_true",
                    help="only summarise the trials already in --workdir (e.g. of an interrupted benchmark)")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(args.workdir)
    sys.path.insert(0, ROOT)
    import yaml

    from jaxdp.ledger import Ledger
    from jaxdp.ledger.events import compose, normalize_events

    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="jaxdp-faults-")
    os.makedirs(work, exist_ok=True)
    ledger_path = os.path.join(work, "ledger.db")
    led = Ledger.init(ledger_path)
    led.register_dataset("digits", 1e4, 1e-5, accountant="rdp")
    cfg_path = os.path.join(work, "config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config(ledger_path), f)

    t0 = time.time()
    ok, ref_summary = run_to_end(cfg_path, os.path.join(work, "reference"))
    full = time.time() - t0
    assert ok, "the uninterrupted reference run failed"
    ref = final_arrays(os.path.join(work, "reference"))
    print(f"reference run: {ref_summary['steps']} steps, {full:.1f} s wall (start-up included)", flush=True)

    plan = [("random", None)] * args.trials + ([("point", p) for p in POINTS] if args.points else [])
    results = []
    for i, (kind, point) in enumerate(plan):
        out = os.path.join(work, f"trial{i:03d}")
        if kind == "random":
            delay = rng.uniform(0.0, full)
            p = subprocess.Popen(train_cmd(cfg_path, out), env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd=ROOT)
            try:
                p.wait(timeout=delay)
                killed = False  # finished before the kill
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed = True
            where = f"after {delay:.1f} s"
        else:
            p = subprocess.run(train_cmd(cfg_path, out), env=env({"JAXDP_FAULT_INJECT": point}),
                               capture_output=True, cwd=ROOT)
            killed = p.returncode == -signal.SIGKILL
            where = f"at {point}"
        resumable, summary = run_to_end(cfg_path, out)
        identical = resumable and same(final_arrays(out), ref)
        rid = json.load(open(os.path.join(out, "run.json")))["run_id"] if os.path.exists(
            os.path.join(out, "run.json")) else None
        results.append({"trial": i, "kind": kind, "where": where, "killed": killed, "resumable": resumable,
                        "identical": identical, "run_id": rid,
                        "steps": summary["steps"] if summary else None})
        print(f"trial {i:3d}: kill {where:<22} killed={killed!s:<5} resumable={resumable!s:<5} "
              f"bit-identical={identical!s:<5} steps={results[-1]['steps']}", flush=True)

    runs = led.runs("digits")
    orphans = [r.run_id for r in runs if r.status == "reserved"]
    by_dir = {}
    for r in runs:
        by_dir.setdefault(r.run_id, []).append(r)
    trial_ids = {res["run_id"] for res in results}
    extra = [r.run_id for r in runs if r.run_id not in trial_ids and r.run_id != ref_summary["run_id"]]
    # spend: the ledger's composition vs the composition of the steps actually taken (metrics.json of each run)
    taken = []
    from jaxdp.train import RunSummary
    for d in ["reference"] + [f"trial{res['trial']:03d}" for res in results]:
        m = RunSummary.read(os.path.join(work, d))
        taken.append({"sampling": "poisson", "noise_multiplier": m.noise_multiplier,
                      "sample_rate": m.sample_rate, "steps": m.steps})
    eps_taken = compose(normalize_events(taken), 1e-5, "rdp")
    spent = led.spent("digits")
    committed_steps = sum(sum(e["steps"] for e in (r.actual_events or [])) for r in runs if r.status == "committed")
    n = len(results)
    print()
    print(f"trials: {n} ({sum(r['killed'] for r in results)} killed mid-run, "
          f"{sum(not r['killed'] for r in results)} finished before the kill)")
    print(f"resumable: {sum(r['resumable'] for r in results)}/{n}")
    print(f"bit-identical to the uninterrupted run: {sum(r['identical'] for r in results)}/{n}")
    print(f"orphan reservations: {len(orphans)} {orphans if orphans else ''}")
    print(f"runs in the ledger: {len(runs)} for {n + 1} runs (extra ids: {len(extra)})")
    print(f"steps committed: {committed_steps}; steps taken (metrics.json): {sum(t['steps'] for t in taken)}")
    print(f"ledger spend (composed, rdp): {spent.epsilon:.6f}; composition of the steps taken: {eps_taken:.6f}")
    print(f"ledger verify: {'ok' if led.verify()['ok'] else 'FAILED'}")
    good = (all(r["resumable"] and r["identical"] for r in results) and not orphans and not extra
            and abs(spent.epsilon - eps_taken) < 1e-9)
    return 0 if good else 1


def summarize(work: str) -> int:
    """Figures from the trial directories and the ledger in ``work`` (no kills: resumable = the trial's
    metrics.json says finished; killed-or-not is only in the benchmark's own log)."""
    sys.path.insert(0, ROOT)
    from jaxdp.ledger import Ledger
    from jaxdp.ledger.events import compose, normalize_events
    from jaxdp.train import RunSummary
    led = Ledger.open(os.path.join(work, "ledger.db"))
    ref = final_arrays(os.path.join(work, "reference"))
    dirs = sorted(d for d in os.listdir(work) if d.startswith("trial"))
    resumable = identical = 0
    ids, taken = set(), []
    for d in ["reference"] + dirs:
        mpath = os.path.join(work, d, "metrics.json")
        m = RunSummary.read(mpath) if os.path.exists(mpath) else None
        if d != "reference" and m and m.status == "finished":
            resumable += 1
            identical += same(final_arrays(os.path.join(work, d)), ref)
        if m:
            ids.add(m.run_id)
            taken.append({"sampling": "poisson", "noise_multiplier": m.noise_multiplier,
                          "sample_rate": m.sample_rate, "steps": m.steps})
    runs = led.runs("digits")
    orphans = [r.run_id for r in runs if r.status == "reserved"]
    extra = [r.run_id for r in runs if r.run_id not in ids]
    committed = sum(sum(e["steps"] for e in (r.actual_events or [])) for r in runs if r.status == "committed")
    eps_taken = compose(normalize_events(taken), 1e-5, "rdp")
    print(f"trials: {len(dirs)}; resumable: {resumable}/{len(dirs)}; bit-identical: {identical}/{len(dirs)}")
    print(f"orphan reservations: {len(orphans)} {orphans if orphans else ''}; runs in the ledger: {len(runs)} "
          f"(ids not belonging to a finished run: {len(extra)})")
    print(f"steps committed: {committed}; steps taken (metrics.json): {sum(t['steps'] for t in taken)}")
    print(f"ledger spend (composed, rdp): {led.spent('digits').epsilon:.6f}; composition of the steps taken: "
          f"{eps_taken:.6f}; verify: {'ok' if led.verify()['ok'] else 'FAILED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
