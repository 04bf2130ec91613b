"""From a private model to its audit, model card and report -- the ``jaxdp`` command-line pipeline, driven
from Python (each step is also a shell command; the equivalent is printed):

    jaxdp train  --config CONFIG --out RUN                                 # private model (resumable)
    jaxdp audit  --run RUN --attack loss_threshold                         # membership inference
    jaxdp report --run RUN --model-card RUN/model_card.yaml --html RUN/report.html --markdown RUN/report.md

The model card's ``model_privacy`` section and the report are generated from the run's own record
(``metrics.json``, the audit's JSON), never typed by hand.

    PYTHONPATH=. python examples/audit_card_report.py --out runs/pipeline
    PYTHONPATH=. python examples/audit_card_report.py --out /tmp/p --tiny     # 1 epoch, 2 shadow models (test)
"""
from __future__ import annotations

import argparse
import os

import yaml

from jaxdp.cli import main as jaxdp


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/pipeline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    run = os.path.join(args.out, "run")
    config = {
        "model": {"name": "mlp", "options": {"hidden": [64]}},
        "data": {"name": "digits"},
        "optimizer": {"name": "adam", "learning_rate": 0.02},
        "training": {"epochs": 1 if args.tiny else 20, "batch_size": 256, "seed": args.seed,
                     "dp": {"enabled": True, "epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}},
        "output": {"dir": run, "progress": False},
    }
    cfg_path = os.path.join(args.out, "config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    shadow = ["--num-models", "2", "--pool-size", "64", "--steps", "5"] if args.tiny else []
    card = os.path.join(run, "model_card.yaml")
    commands = [
        ["train", "--config", cfg_path, "--out", run],
        ["audit", "--run", run, "--attack", "loss_threshold", *shadow],
        ["report", "--run", run, "--model-card", card, "--html", os.path.join(run, "report.html"),
         "--markdown", os.path.join(run, "report.md")],
    ]
    for cmd in commands:
        print("$ jaxdp " + " ".join(cmd), flush=True)
        rc = jaxdp(cmd)
        if rc != 0:
            raise SystemExit(f"jaxdp {cmd[0]} exited with status {rc}")
    with open(card) as f:
        section = yaml.safe_load(f)["model_privacy"]
    print(f"model card: {card}\n  {section['guarantee']}")
    return {"run": run, "card": card, "model_privacy": section}


if __name__ == "__main__":
    main()
