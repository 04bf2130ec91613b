"""``jaxdp train`` and ``jaxdp compare``."""
from __future__ import annotations

import argparse
import json
import math
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see `jaxdp.train.config` for the schema)")
    p.add_argument("--out", default=None, help="output directory (overrides output.dir)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


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
        print("\n" + interrupted_message(trainer), file=sys.stderr)
        return 130
    if not trainer.main:  # several processes: process 0 reports
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "epochs"}))
    else:
        eps = summary["epsilon"]
        print(f"done: status={summary['status']} steps={summary['steps']} "
              f"test accuracy={summary['final_test_accuracy']:.4f} "
              + (f"epsilon={eps:.4f} (delta={summary['delta']:g}, {summary['accountant']} accountant)"
                 if eps is not None else "non-private (no privacy guarantee)"))
        print(f"outputs: {trainer.out_dir}/metrics.json, {trainer.out_dir}/checkpoint/, {trainer.out_dir}/config.yaml")
    return 0


def _compare(args) -> int:
    from jaxdp.train import compare
    try:
        s = compare(args.config, out_dir=args.out, progress=not args.no_progress, log=not args.json)
    except KeyboardInterrupt:
        print("\njaxdp compare: interrupted; re-run the same command to resume both runs from their checkpoints",
              file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(s))
    else:
        eps = s["epsilon"]
        print()
        print(f"{'run':<14}{'test accuracy':>15}{'epsilon':>10}")
        print(f"{'DP':<14}{s['dp_accuracy']:>15.4f}{(eps if eps is not None else math.inf):>10.3f}")
        print(f"{'non-private':<14}{s['non_private_accuracy']:>15.4f}{'inf':>10}")
        print(f"accuracy cost of privacy: {100 * s['accuracy_difference']:.1f} points "
              f"(delta={s['delta']:g}, noise multiplier {s['noise_multiplier']:.3f})")
        print(f"outputs: {s['dp_dir']}/  {s['non_private_dir']}/")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config (privately unless dp.enabled: false)")
    _add_common(p)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the output directory")
    p.set_defaults(func=_train)
    p = sub.add_parser("compare", help="train a config privately and non-privately and compare accuracy")
    _add_common(p)
    p.set_defaults(func=_compare)
