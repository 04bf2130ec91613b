"""``jaxdp train`` and ``jaxdp compare``."""
from __future__ import annotations

import argparse
import math
import sys

from jaxdp import _cli


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (`jaxdp config --example` prints one with every key)")
    p.add_argument("--out", default=None, help="output directory (overrides output.dir)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _cli.add_json_flag(p)


def _train(args) -> int:
    from jaxdp.distributed import initialize_from_env
    initialize_from_env()  # several processes when JAXDP_COORDINATOR etc. are set (see docs/distributed.md)
    from jaxdp.train import DPTrainer
    from jaxdp.train.lifecycle import interrupted_message
    trainer = None
    try:
        trainer = DPTrainer(args.config, out_dir=args.out, progress=not args.no_progress, log=not args.json,
                            resume=not args.fresh)
        summary = trainer.train()
    except KeyboardInterrupt:
        raise _cli.Interrupted(interrupted_message(trainer)) from None
    if not trainer.main:  # several processes: process 0 reports
        return 0
    if args.json:
        _cli.emit(args, {k: v for k, v in summary.items() if k != "epochs"})
    else:
        print(f"done: {_summary_line(summary)}")
        print(f"outputs: {trainer.out_dir}/metrics.json, {trainer.out_dir}/checkpoint/, {trainer.out_dir}/config.yaml")
    return 0


def _summary_line(summary: dict) -> str:
    """``status=... steps=... test accuracy=... epsilon=...``; every field may be missing (0 steps, sigma 0)."""
    acc, eps = summary.get("final_test_accuracy"), summary.get("epsilon")
    acc_s = "n/a (no epoch finished)" if acc is None else f"{acc:.4f}"
    if eps is not None:
        eps_s = f"epsilon={eps:.4f} (delta={summary['delta']:g}, {summary['accountant']} accountant)"
    elif summary.get("dp"):
        eps_s = "epsilon=inf (noise multiplier 0: no privacy guarantee)"
    else:
        eps_s = "non-private (no privacy guarantee)"
    return f"status={summary['status']} steps={summary['steps']} test accuracy={acc_s} {eps_s}"


def _compare(args) -> int:
    from jaxdp.train import compare
    try:
        s = compare(args.config, out_dir=args.out, progress=not args.no_progress, log=not args.json)
    except KeyboardInterrupt:
        raise _cli.Interrupted("jaxdp compare: interrupted; re-run the same command to resume both runs from their "
                               "checkpoints") from None
    if args.json:
        _cli.emit(args, s)
    else:
        eps = s["epsilon"]
        print()
        print(f"{'run':<14}{'test accuracy':>15}{'epsilon':>10}")
        acc = {k: ("n/a" if s[k] is None else f"{s[k]:.4f}") for k in ("dp_accuracy", "non_private_accuracy")}
        print(f"{'DP':<14}{acc['dp_accuracy']:>15}{(eps if eps is not None else math.inf):>10.3f}")
        print(f"{'non-private':<14}{acc['non_private_accuracy']:>15}{'inf':>10}")
        cost = ("n/a" if s["accuracy_difference"] is None else f"{100 * s['accuracy_difference']:.1f} points")
        print(f"accuracy cost of privacy: {cost} "
              f"(delta={s['delta']:g}, noise multiplier {s['noise_multiplier']:.3f})")
        print(f"outputs: {s['dp_dir']}/  {s['non_private_dir']}/")
    return 0


_TRAIN_DESCRIPTION = """\
Train the model a YAML config describes with DP-SGD (or without privacy when training.dp.enabled is false).
The run directory (--out, else output.dir) receives config.yaml (the full config, defaults filled in),
metrics.json (per epoch loss, accuracy, epsilon, clipping; the mechanism) and a checkpoint. Re-running the same
command resumes an interrupted run from its checkpoint; a finished run is not trained again (use --fresh).

`jaxdp config --example` prints a commented example config with every key."""

_COMPARE_DESCRIPTION = """\
Train one YAML config twice -- privately (training.dp.enabled: true) and as a non-private baseline with the
same model, data, optimiser (and seed, when training.seed pins one) -- and print the accuracy each reaches
and the accuracy cost of privacy.
Outputs: OUT/dp/, OUT/non_private/ (run directories as for `jaxdp train`) and OUT/comparison.json."""


def _config(args) -> int:
    from jaxdp.train.config import example_config
    if not args.example:
        raise ValueError("give --example to print a commented example config (`jaxdp config --example > my.yaml`)")
    sys.stdout.write(example_config())
    return 0


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train a model from a YAML config (privately unless dp.enabled: false)",
                       description=_TRAIN_DESCRIPTION, formatter_class=raw)
    _add_common(p)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the output directory")
    p.set_defaults(func=_train)
    p = sub.add_parser("compare", help="train a config privately and non-privately and compare accuracy",
                       description=_COMPARE_DESCRIPTION, formatter_class=raw)
    _add_common(p)
    p.set_defaults(func=_compare)
    p = sub.add_parser("config", help="print a commented example config for `jaxdp train`",
                       description="Print a commented example YAML config with every key, its default and its "
                                   "meaning: `jaxdp config --example > my.yaml`.")
    p.add_argument("--example", action="store_true", help="print the example config")
    p.set_defaults(func=_config)
