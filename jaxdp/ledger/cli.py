"""``jaxdp ledger init|register|show|reserve|commit|release|verify|export`` (each with ``--json``).

The ledger is ``--ledger PATH_OR_URL`` or, by default, the ``JAXDP_LEDGER`` environment variable.
Exit status: 0 success, 1 refused (budget exceeded, no reservation, verification failed), 2 usage or store
error (docs/cli.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from jaxdp import _cli
from jaxdp._io import atomic_write
from jaxdp.accounting.event import ACCOUNTANTS, CYCLIC_MECHANISMS, FIELDS, RELATIONS, SAMPLINGS, Event

ENV = "JAXDP_LEDGER"


_DESCRIPTIONS = {  # `jaxdp ledger SUBCOMMAND --help`
    "init": ('Create the ledger store (an SQLite file or a PostgreSQL database) if it does not exist. With '
             '--dataset-id, --max-epsilon and --delta it also protects that dataset with a total budget (as '
             '`ledger register` does).'),
    "register": ('Protect a dataset: from now on every private run on it must reserve its planned mechanism first, and'
                 ' a reservation that would take the composed epsilon (all runs, composed with --accountant) above '
                 '--max-epsilon at --delta is refused.'),
    "show": ("Print each protected dataset's budget, the epsilon spent (composed over all runs, and the plain sum "
             'for comparison), what remains, and its runs (committed, reserved = still open, released).'),
    "reserve": ("Reserve a run's planned mechanism (noise multiplier, sampling, steps) against a dataset's budget "
                'before the run touches the data; refused (exit 1) if it would exceed the budget. `jaxdp train` with '
                'ledger.path reserves by itself.'),
    "commit": ("Replace a run's reservation by what it actually ran (default: as reserved; --steps for a one-event "
               'reservation, or --events). The committed events are charged from now on.'),
    "release": ('Free the reservation of a run that NEVER touched the data (e.g. it crashed before its first step); '
                'the reason is recorded. A run that took any step must be committed instead, or privacy is under-'
                'counted.'),
    "verify": ("Check the ledger's append-only hash chain (every row hashes its predecessor); with --expect-head "
               'also that a head hash kept elsewhere is still in the chain. Exit 1 if anything fails.'),
    "export": ('Export the whole ledger as JSON: every row with its hash, the derived state and the verification '
               'report.'),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("ledger", help="privacy budget ledger: reserve, commit, verify",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", default=os.environ.get(ENV),
                        help=f"SQLite file, sqlite:///PATH or postgresql://URL (default: ${ENV})")
    _cli.add_json_flag(common)

    def budget_args(q, required):
        _dataset_id_arg(q, required=required, help="dataset id to protect")
        q.add_argument("--max-epsilon", type=float, required=required, help="total epsilon budget")
        q.add_argument("--delta", type=float, required=required, help="delta of the budget")
        q.add_argument("--accountant", default="prv", choices=ACCOUNTANTS)
        q.add_argument("--neighboring-relation", default="add_remove", choices=RELATIONS)
        q.add_argument("--note", default=None)

    q = sub.add_parser("init", parents=[common], help="create a ledger (and optionally register a dataset)",
                       description=_DESCRIPTIONS["init"])
    budget_args(q, required=False)
    q.add_argument("--writer-role", default=None,
                   help="PostgreSQL: grant this separate role read/append access only (trainers connect as it and "
                        "cannot disable the append-only triggers)")
    q.set_defaults(func=_init)

    q = sub.add_parser("register", parents=[common], help="protect a dataset with a budget",
                       description=_DESCRIPTIONS["register"])
    budget_args(q, required=True)
    q.set_defaults(func=_register)

    q = sub.add_parser("show", parents=[common], help="budgets, spent (composed and plain sum), remaining, runs",
                       description=_DESCRIPTIONS["show"])
    _dataset_id_arg(q, required=False, help="show only this dataset")
    q.set_defaults(func=_show)

    def event_args(q):
        q.add_argument("--events", default=None,
                       help="events as JSON (a list of event dicts) or @FILE; or use the options below")
        q.add_argument("--sampling", default="poisson", choices=SAMPLINGS)
        q.add_argument("--noise-multiplier", type=float)
        q.add_argument("--sample-rate", type=float,
                       help="q (poisson, truncated_poisson) or p (cyclic_poisson); poisson: default B / N from "
                            "--batch-size and --dataset-size, as `jaxdp train` computes it")
        q.add_argument("--batch-size", type=int)
        q.add_argument("--dataset-size", type=int)
        q.add_argument("--max-batch-size", type=int)
        q.add_argument("--mechanism", choices=CYCLIC_MECHANISMS, help="cyclic_poisson: the noise (default bandmf)")
        q.add_argument("--bands", type=int, help="cyclic_poisson: the number of groups b")
        q.add_argument("--steps", type=int)
        q.add_argument("--epochs", type=float,
                       help="instead of --steps: the steps `jaxdp train` takes for these epochs (poisson: "
                            "ceil(epochs / q); shuffle: epochs * (N // B); cyclic_poisson: ceil(epochs * b / p))")
        q.add_argument("--l2-clip-norm", type=float)

    q = sub.add_parser("reserve", parents=[common], help="reserve a run's planned mechanism before it starts",
                       description=_DESCRIPTIONS["reserve"])
    _dataset_id_arg(q, required=True, help="the dataset the run trains on")
    q.add_argument("--run-id", required=True)
    event_args(q)
    q.add_argument("--model")
    q.add_argument("--config-hash")
    q.add_argument("--code-version")
    q.add_argument("--parent-run-id", help="the run whose model this run fine-tunes")
    q.set_defaults(func=_reserve)

    q = sub.add_parser("commit", parents=[common], help="record the steps a run actually took",
                       description=_DESCRIPTIONS["commit"])
    q.add_argument("--run-id", required=True)
    q.add_argument("--events", default=None, help="actual events as JSON or @FILE (default: as reserved)")
    q.add_argument("--steps", type=int, default=None, help="actual steps of a one-event reservation")
    q.set_defaults(func=_commit)

    q = sub.add_parser("release", parents=[common], help="free the reservation of a run that never touched data",
                       description=_DESCRIPTIONS["release"])
    q.add_argument("--run-id", required=True)
    q.add_argument("--reason", required=True, help="recorded in the ledger")
    q.set_defaults(func=_release)

    q = sub.add_parser("verify", parents=[common], help="check the hash chain (exit 1 if it fails)",
                       description=_DESCRIPTIONS["verify"])
    q.add_argument("--expect-head", default=None, help="a head hash kept elsewhere that must still be in the chain")
    q.add_argument("--head-file", default=None,
                   help="a file outside the database holding the head kept at the last check: verify that it is "
                        "still in the chain (detects truncation and rewrites), then store the new head in it")
    q.set_defaults(func=_verify)

    q = sub.add_parser("restore", parents=[common],
                       help="rebuild a lost ledger from an export into a new path or schema (rows copied verbatim)",
                       description="Rebuild a lost ledger from the JSON written by `jaxdp ledger export`, into a new "
                                   "path or schema; rows are copied verbatim and their hash chain is verified.")
    q.add_argument("--from", dest="source", required=True, help="the JSON written by `jaxdp ledger export`")
    q.set_defaults(func=_restore)

    q = sub.add_parser("export", parents=[common], help="everything as JSON (rows with hashes, state, report)",
                       description=_DESCRIPTIONS["export"])
    q.add_argument("--output", "-o", default=None, help="write to this file instead of stdout")
    q.set_defaults(func=_export)


# ---------------------------------------------------------------------------------------------- helpers
class _DeprecatedDatasetOption(argparse.Action):
    """``--dataset`` is the old spelling of ``--dataset-id`` (the name `jaxdp report` and the trainer's
    ``ledger.dataset_id`` use); it still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--dataset":
            print("jaxdp ledger: warning: --dataset is deprecated; use --dataset-id", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _dataset_id_arg(q, *, required: bool, help: str) -> None:
    q.add_argument("--dataset-id", "--dataset", dest="dataset", required=required, action=_DeprecatedDatasetOption,
                   metavar="ID", help=help + " (--dataset: deprecated spelling)")


def _open(args, create=False):
    from jaxdp.ledger import Ledger
    if not args.ledger:
        raise ValueError(f"no ledger given: pass --ledger PATH_OR_URL or set {ENV}")
    return Ledger.init(args.ledger) if create else Ledger.open(args.ledger)


def _read_head_file(path: str) -> dict:
    """The head kept by an earlier ``verify --head-file`` (``{"ledger", "head_seq", "head_hash"}``)."""
    with open(path) as f:
        try:
            kept = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--head-file {path} is not the JSON head file `jaxdp ledger verify --head-file` writes "
                             f"({e}); restore it from a backup, or give --expect-head HASH") from None
    if not isinstance(kept, dict) or "head_hash" not in kept:
        raise ValueError(f"--head-file {path} holds no head_hash: it is not a file `ledger verify --head-file` wrote")
    return kept


def _load_events(text: str | None):
    if text is None:
        return None
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--events is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError("--events is nested too deeply: give a JSON list of flat event objects") from None


def _events_from_args(args) -> list[dict]:
    """The reservation's events: ``--events``, or one event from the options (the :class:`Event` of its
    sampling; epochs become steps by :func:`jaxdp.sampling.steps_for_epochs`, the rule `jaxdp train` uses)."""
    from jaxdp.sampling import steps_for_epochs
    events = _load_events(args.events)
    if events is not None:
        return events
    for k in ("noise_multiplier", "sample_rate", "epochs", "l2_clip_norm"):
        v = getattr(args, k, None)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{k.replace('_', '-')} must be a finite number, got {v}")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    given = {k: getattr(args, k) for k in ("noise_multiplier", "sample_rate", "batch_size", "dataset_size",
                                           "max_batch_size", "mechanism", "bands")}
    if args.sampling == "cyclic_poisson" and given["mechanism"] is None:
        given["mechanism"] = "bandmf"
    if args.sampling == "poisson" and given["sample_rate"] is None and given["batch_size"] and given["dataset_size"]:
        given["sample_rate"] = given["batch_size"] / given["dataset_size"]   # q = B / N, as the trainer has it
    fields = FIELDS[args.sampling]
    unused = [k for k, v in given.items() if v is not None and k not in fields
              and not (args.sampling == "poisson" and k in ("batch_size", "dataset_size"))]  # they gave q
    if unused:
        raise ValueError(f"--sampling {args.sampling} has no " + ", ".join("--" + k.replace("_", "-") for k in unused)
                         + f"; its event needs {', '.join(f for f in fields if f != 'steps')} (and steps or epochs)")
    steps = args.steps
    if steps is None and args.epochs is not None:
        if args.sampling == "shuffle":
            if not (args.batch_size and args.dataset_size):
                raise ValueError("--epochs with shuffle sampling needs --batch-size and --dataset-size")
            steps = steps_for_epochs(args.epochs, steps_per_epoch=args.dataset_size // args.batch_size)
        elif args.sampling == "none":
            raise ValueError("--epochs needs a sampling with a rate; give --steps for --sampling none")
        else:
            if not given["sample_rate"]:
                raise ValueError("--epochs needs --sample-rate (steps = ceil(epochs / sample_rate))")
            rate = given["sample_rate"] / (given["bands"] or 1) if args.sampling == "cyclic_poisson" else \
                given["sample_rate"]
            steps = steps_for_epochs(args.epochs, rate)
    if steps is None:
        raise ValueError("give --steps or --epochs (or --events JSON)")
    event = Event.from_mechanism(given["noise_multiplier"], given["sample_rate"], steps, sampling=args.sampling,
                                 dataset_size=given["dataset_size"], batch_size=given["batch_size"],
                                 max_batch_size=given["max_batch_size"], bands=given["bands"],
                                 mechanism=given["mechanism"] or "dpsgd",
                                 l2_clip_norm=None if args.sampling == "none" else args.l2_clip_norm)
    return [event.to_dict()]


def _fmt_eps(x) -> str:
    """An epsilon as text; ledger summaries carry infinity as "inf" and an undefined value (NaN) as None."""
    x = math.nan if x is None else float(x)
    if math.isnan(x):
        return "undefined"
    return f"{x:.4f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


# ---------------------------------------------------------------------------------------------- commands
def _init(args) -> int:
    from jaxdp.ledger import Ledger
    if not args.ledger:
        raise ValueError(f"no ledger given: pass --ledger PATH_OR_URL or set {ENV}")
    led = Ledger.init(args.ledger, writer_role=args.writer_role)
    out = {"ok": True, "ledger": led.url}
    text = f"ledger ready: {led.url}"
    if args.dataset:
        if args.max_epsilon is None or args.delta is None:
            raise ValueError("registering --dataset-id needs --max-epsilon and --delta")
        b = led.register_dataset(args.dataset, args.max_epsilon, args.delta, args.accountant,
                                 neighboring_relation=args.neighboring_relation, note=args.note)
        out["dataset"] = vars(b)
        text += f"\nprotected {b.dataset_id!r}: epsilon {b.max_epsilon:g} at delta {b.delta:g} ({b.accountant})"
    _cli.emit(args, out, text)
    return 0


def _register(args) -> int:
    led = _open(args)
    b = led.register_dataset(args.dataset, args.max_epsilon, args.delta, args.accountant,
                             neighboring_relation=args.neighboring_relation, note=args.note)
    _cli.emit(args, {"ok": True, "dataset": vars(b)},
              f"protected {b.dataset_id!r}: epsilon {b.max_epsilon:g} at delta {b.delta:g} ({b.accountant})")
    return 0


def _show(args) -> int:
    led = _open(args)
    s = led.summary()
    if args.dataset:
        if args.dataset not in s["datasets"]:
            raise ValueError(f"dataset {args.dataset!r} is not registered in {led.url}")
        s["datasets"] = {args.dataset: s["datasets"][args.dataset]}
    lines = [f"ledger {s['ledger']}  (head seq {s['head_seq']}, hash {s['head_hash']})"]
    for d, b in s["datasets"].items():
        lines.append(f"\n{d}: budget epsilon {b['max_epsilon']:g} at delta {b['delta']:g} ({b['accountant']})")
        lines.append(f"  spent (composed) {_fmt_eps(b['epsilon'])}   plain sum {_fmt_eps(b['plain_sum'])}   "
                     f"committed {_fmt_eps(b['epsilon_committed'])}   remaining "
                     f"{_fmt_eps(b['remaining'])}")
        lines.append(f"  runs: {b['runs_committed']} committed, {b['runs_reserved']} reserved (open), "
                     f"{b['runs_released']} released")
        for r in b["runs"]:
            tag = " [fine-tune: inherited]" if r["inherited"] else ""
            extra = f"  reason: {_cli.one_line(r['release_reason'])}" if r["release_reason"] else ""
            lines.append(f"    {_cli.one_line(r['run_id']):<24} {r['status']:<9} "
                         f"eps {_fmt_eps(r['epsilon'])}  steps {r['steps']}  "
                         f"model {_cli.one_line(r['model'])}{tag}{extra}")
            if r["status"] == "reserved":
                alive = {True: "alive", False: "NOT RUNNING (crashed or killed?)",
                         None: "unknown (another host)" if r.get("pid") is not None else "unknown"}[r.get("alive")]
                who = f"{_cli.one_line(r.get('user'))}@{_cli.one_line(r.get('host'))}"
                lines.append(f"      reserved {r['reserved_at']} by {who} pid {r.get('pid')}: {alive}")
    if not s["datasets"]:
        lines.append("no protected datasets (register one with `jaxdp ledger register`)")
    _cli.emit(args, s, "\n".join(lines))
    return 0


def _reserve(args) -> int:
    led = _open(args)
    res = led.reserve(args.dataset, args.run_id, _events_from_args(args), model=args.model,
                      config_hash=args.config_hash, code_version=args.code_version,
                      parent_run_id=args.parent_run_id)
    text = f"reserved run {res.run_id!r}"
    if res.charged:
        text += " charged to " + ", ".join(f"{d!r} (composed epsilon {_fmt_eps(res.epsilon_after[d])}, remaining "
                                           f"{_fmt_eps(res.remaining_after[d])})" for d in res.charged)
    else:
        text += f" (dataset {res.dataset_id!r} is not protected: recorded only)"
    _cli.emit(args, {"ok": True, **res.as_dict()}, text)
    return 0


def _commit(args) -> int:
    led = _open(args)
    events = _load_events(args.events)
    if events is None and args.steps is not None:
        run = led.run(args.run_id)
        if run is None:
            raise ValueError(f"run {args.run_id!r} has no reservation")
        if len(run.planned_events) != 1:
            raise ValueError("--steps needs a one-event reservation; give --events for several")
        events = [dict(run.planned_events[0], steps=args.steps)]
    out = led.commit(args.run_id, events)
    text = f"committed run {out['run_id']!r}: " + ", ".join(
        f"{d!r} now at epsilon {_fmt_eps(e)}" for d, e in out["epsilon_after"].items())
    if out["exceeds_reservation"]:
        text += "\nWARNING: the run took more than it reserved"
    if out["over_budget"]:
        text += f"\nWARNING: over budget on {out['over_budget']}"
    _cli.emit(args, {"ok": True, **out}, text)
    return 0


def _release(args) -> int:
    led = _open(args)
    out = led.release(args.run_id, args.reason)
    _cli.emit(args, {"ok": True, **out}, f"released run {out['run_id']!r} (reason recorded: {out['reason']})")
    return 0


def _verify(args) -> int:
    led = _open(args)
    expected, kept = args.expect_head, None
    if args.head_file and os.path.exists(args.head_file):
        kept = _read_head_file(args.head_file)
        expected = expected or kept.get("head_hash")
    rep = led.verify(expected_head=expected)
    if rep["ok"] and kept is not None and rep["head_seq"] < int(kept.get("head_seq", 0)):
        rep["ok"] = False
        rep["problems"].append(f"the chain ends at seq {rep['head_seq']} but {args.head_file} kept seq "
                               f"{kept['head_seq']}")
    if rep["ok"] and args.head_file:
        atomic_write(args.head_file, _cli.dumps({"ledger": led.url, "head_seq": rep["head_seq"],
                                                 "head_hash": rep["head_hash"]}))
    if rep["ok"]:
        text = (f"OK: {rep['rows']} rows, chain intact and every transition valid; head seq {rep['head_seq']} "
                f"hash {rep['head_hash']}\n"
                + (f"checked against the head kept in {args.head_file}; the new head is stored there"
                   if kept is not None else f"the head is now kept in {args.head_file}" if args.head_file else
                   "checked against " + expected if expected else
                   "keep this head hash outside the database (a ticket, a commit, --head-file): plain verify cannot "
                   "detect rows cut off the end together with the head record; `verify --expect-head HASH` can"))
    else:
        text = "FAILED:\n  " + "\n  ".join(_cli.one_line(p) for p in rep["problems"])
    _cli.emit(args, rep, text)
    return 0 if rep["ok"] else 1


def _restore(args) -> int:
    from jaxdp.ledger import Ledger
    if not args.ledger:
        raise ValueError("give the new ledger's --ledger PATH_OR_URL")
    with open(args.source) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.source} is not JSON ({e})") from None
    led = Ledger.restore(args.ledger, data)
    rep = led.verify()
    _cli.emit(args, {"ok": rep["ok"], **rep},
              f"restored {rep['rows']} rows into {led.url}; head seq {rep['head_seq']} hash {rep['head_hash']}")
    return 0 if rep["ok"] else 1


def _export(args) -> int:
    led = _open(args)
    data = led.export()
    if args.output:
        atomic_write(args.output, _cli.dumps(data, indent=2, sort_keys=True) + "\n")
        _cli.emit(args, {"ok": True, "output": args.output, "rows": len(data["log"]), "verify": data["verify"]},
                  f"exported {len(data['log'])} rows to {args.output}")
    else:
        print(_cli.dumps(data, sort_keys=True) if args.json else _cli.dumps(data, indent=2, sort_keys=True))
    return 0
