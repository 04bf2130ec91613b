"""A training run's identity across crashes and restarts, and its reconciliation with the privacy ledger.

Rules (``jaxdp train``; see docs/ledger.md, "Crashed runs"):

* **One run, one id.** The run id is chosen once per output directory and written to ``<out>/run.json``
  (atomically) *before* anything is reserved: ``ledger.run_id`` when the config gives one, else an id derived
  from the output directory and the config hash. A restarted run (after ``kill -9``, Ctrl-C, a reboot) reads it
  back, so it resumes under its own reservation instead of reserving again.
* **Reconcile first.** Before training, the run is matched with its ledger record: an open reservation is
  adopted (the steps it covers are recomputed bit-identically: same seed, same batches, same noise, so
  re-running them releases nothing new); a run whose checkpoint says it is complete but whose reservation is
  still open (killed between the final checkpoint and the commit) commits the steps it took and stops; a
  committed run whose checkpoint disagrees, a released one, or a reservation made for another config is
  refused with what to do. "Another config" is decided by :func:`jaxdp.train.config.config_hashes`: a hash
  recorded before the hash became independent of the checkout's location still names the same config (at the
  location it was written), and the run keeps the hash (and run id) it recorded.
* **Nothing silent.** A directory that held a previous run (``run.json`` says a checkpoint was written, or
  ``metrics.json`` exists) but has no checkpoint is refused: ``--fresh`` moves the old files aside and starts a
  new run (a new id, charged again).

``JAXDP_FAULT_INJECT=<point>`` kills the process (SIGKILL) at a named point; it exists for the fault-injection
tests and ``benchmarks/ledger_faults.py``. Points: ``after_run_file``, ``after_reserve``, ``after_checkpoint``
(every checkpoint), ``before_commit``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import signal
import uuid

from jaxdp._io import atomic_write
from jaxdp.ledger.gate import RunStateError
from jaxdp.train import checkpoint

RUN_FILE = "run.json"
FAULT_ENV = "JAXDP_FAULT_INJECT"


def fault_point(name: str) -> None:
    """Die here (SIGKILL, no clean-up) when ``$JAXDP_FAULT_INJECT`` names this point."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def derived_run_id(out_dir: str, cfg_hash: str, nonce: str = "") -> str:
    """``<dir name>-<12 hex>`` from the absolute output directory and the config hash (stable across restarts)."""
    path = os.path.abspath(out_dir)
    digest = hashlib.sha256(f"{path}\0{cfg_hash}\0{nonce}".encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path.rstrip(os.sep)) or "run")[:40]
    return f"{name}-{digest}"


def read_run_file(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
        if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
            raise ValueError("no run_id")
    except (OSError, ValueError) as e:
        raise RunStateError(f"{path} is unreadable ({e}); it records this directory's run id. Restore it, or "
                            "start over with --fresh (the old files are moved aside)") from None
    return info


def write_run_file(out_dir: str, info: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, RUN_FILE), json.dumps(info, indent=1, sort_keys=True))


def move_aside(out_dir: str) -> str | None:
    """``--fresh``: move the previous run's files (checkpoint/, run.json, metrics.json) into
    ``<out>/previous-<UTC time>/`` (nothing is deleted). Returns that directory, or None when there was nothing."""
    names = [n for n in ("checkpoint", RUN_FILE, "metrics.json") if os.path.exists(os.path.join(out_dir, n))]
    if not names:
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = os.path.join(out_dir, f"previous-{stamp}")
    os.makedirs(dest)
    for n in names:
        os.replace(os.path.join(out_dir, n), os.path.join(dest, n))
    return dest


def resolve_identity(tr, resumed: bool, meta: dict | None, fresh: bool) -> dict:
    """Choose the run id (see the module docstring), refuse a directory whose state is inconsistent, and write
    ``run.json`` before anything touches the ledger. Returns the run file's content."""
    out, chash = tr.out_dir, tr.config_hash
    cfg_id = tr.cfg["ledger"]["run_id"]
    info = read_run_file(out)
    if info is not None and info.get("config_hash") not in (chash, *tr.config_hashes):
        raise RunStateError(f"{out} holds run {info['run_id']!r} of a different config; use another output.dir, "
                            "or --fresh to move its files aside and start a new run there")
    if info is not None:
        tr.config_hash = chash = info["config_hash"]   # the hash the run recorded (a legacy one stays)
    known = info["run_id"] if info else (meta.get("run_id") if meta else None)
    if meta is not None and meta.get("run_id") != known:
        raise RunStateError(f"{out}: the checkpoint belongs to run {meta.get('run_id')!r} but run.json names "
                            f"{known!r}; restore the matching files, or --fresh to start a new run")
    if cfg_id and known and cfg_id != known:
        raise RunStateError(f"{out} holds run {known!r}, but the config asks for ledger.run_id {cfg_id!r}; use "
                            "another output.dir, or --fresh to move its files aside")
    last = int(info.get("checkpoint_step", 0)) if info else 0
    step = int(tr.state.step)
    if last > step:
        where = f"the newest checkpoint is at step {step}" if resumed else "no checkpoint is there"
        raise RunStateError(
            f"{out}/{RUN_FILE} says run {known!r} checkpointed step {last}, but {where} (deleted or moved?). "
            "Restore the checkpoint file to resume; or re-run with --fresh to move the old files aside and train "
            "a new run (a new run id, charged to the ledger again)")
    if info is None and not resumed and os.path.exists(os.path.join(out, "metrics.json")):
        raise RunStateError(f"{out} holds a previous run's results (metrics.json) but no checkpoint or run.json; "
                            "refusing to train over it. Use another output.dir, or --fresh to move the old files "
                            "aside")
    run_id = known or cfg_id or derived_run_id(out, chash, uuid.uuid4().hex if fresh else "")
    if info is None:
        info = {"run_id": run_id, "config_hash": chash, "checkpoint_step": step,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        write_run_file(out, info)
        fault_point("after_run_file")
    tr.run_id = info["run_id"]
    return info


def note_checkpoint(tr, step: int) -> None:
    """After a checkpoint is on disk: record its step in ``run.json`` (so a deleted checkpoint is noticed)."""
    info = read_run_file(tr.out_dir) or {"run_id": tr.run_id, "config_hash": tr.config_hash}
    if int(info.get("checkpoint_step", 0)) != step:
        info["checkpoint_step"] = step
        write_run_file(tr.out_dir, info)


def check_restored(tr, state, meta: dict) -> None:
    """Cross-check a checkpoint before it is restored: its train state step, sampler step, accountant steps
    (private runs) and metrics agree, and it is within the plan."""
    step = int(state.step)
    where = meta.get("_path", tr.out_dir)
    problems = []
    if "step" in meta and int(meta["step"]) != step:
        problems.append(f"metadata step {meta['step']} vs train state step {step}")
    if int(meta["sampler"]["step"]) != step:
        problems.append(f"sampler step {meta['sampler']['step']} vs train state step {step}")
    accountant = meta.get("accountant")
    if accountant is not None and sum(int(e["steps"]) for e in accountant.get("history", [])) != step:
        problems.append(f"accountant steps {sum(int(e['steps']) for e in accountant['history'])} vs train state "
                        f"step {step}")
    if meta.get("metrics") and int(meta["metrics"][-1].get("step", 0)) > step:
        problems.append(f"metrics reach step {meta['metrics'][-1]['step']} beyond the train state's {step}")
    if step > tr.total_steps:
        problems.append(f"step {step} beyond the planned {tr.total_steps}")
    if problems:
        raise RunStateError(f"checkpoint {where} is inconsistent ({'; '.join(problems)}); refusing to resume "
                            "from it. Restore it from a backup, or start over with --fresh")


def interrupted_message(tr, command: str = "jaxdp train") -> str:
    """The one line printed when a run is interrupted (Ctrl-C)."""
    if tr is None:
        return f"{command}: interrupted before training started; re-run the same command to start it"
    last = None
    found = checkpoint.list_checkpoints(os.path.join(tr.out_dir, "checkpoint"))
    if found:
        last = found[0][0]
    ckpt = f"last checkpoint at step {last}" if last is not None else "no checkpoint yet"
    return (f"{command}: interrupted at step {int(tr.state.step)} of {tr.total_steps} (run {tr.run_id!r}, {ckpt}); "
            "re-run the same command to resume (its ledger reservation stays open until then)")


def refuse_unprivate_on_protected(tr) -> None:
    """``jaxdp compare``: refuse up front (before the DP run trains and is charged) when the non-private baseline
    would be refused by the ledger (a protected dataset, or a fine-tune of a model trained on one)."""
    lcfg = tr.cfg["ledger"]
    path = lcfg["path"] or os.environ.get("JAXDP_LEDGER")
    if not path:
        return
    from jaxdp.ledger import Ledger, ReservationRequiredError
    with Ledger.open(path) as led:
        dataset_id = lcfg["dataset_id"] or tr.dataset.name
        lineage = led.lineage(lcfg["parent_run_id"]) if lcfg["parent_run_id"] else []
        protected = sorted(set(lineage) | ({dataset_id} if led.is_protected(dataset_id) else set()))
    if protected:
        raise ReservationRequiredError(
            f"refused before training anything: `compare` trains a non-private baseline, and {protected} "
            f"{'is' if len(protected) == 1 else 'are'} protected by the privacy ledger {led.url} (a non-private run "
            "on protected data is always refused). Train the private model alone with `jaxdp train`, or compare "
            "on public or unprotected data")
