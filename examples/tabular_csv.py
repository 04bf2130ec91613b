"""Your own CSV and your own Flax model through the YAML trainer: ``jaxdp train``, then ``jaxdp report``.

The steps a user takes with a table of numeric features and an integer label column:

1. a CSV with a header (here a synthetic one, written by this script: 6 numeric features, 3 classes);
2. feature standardisation from PUBLIC statistics -- here a separate public reference file with the same
   columns (``standardize: {public_csv: ...}``). The mean and std of the private training data are a function
   of every example, so jaxdp never computes them from the data it trains on (``standardize: true`` is refused);
3. the model is the user's own NNX module (``examples/tabular_model.py:WideAndDeep``), named in the config;
4. ``jaxdp train --config`` trains it privately (noise calibrated to the target epsilon, Poisson batches) and
   ``jaxdp report --run --model-card`` writes a model card whose privacy section comes from the run's record.

    PYTHONPATH=. python examples/tabular_csv.py --out runs/tabular            # 4,000 rows, 20 epochs at epsilon 3
    PYTHONPATH=. python examples/tabular_csv.py --tiny --out /tmp/tabular     # 600 rows, 2 epochs (the test)
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import yaml

from jaxdp.cli import main as jaxdp

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURES = ["age", "income", "hours", "tenure", "visits", "score"]


def synthetic_table(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of 6 features on very different scales (ages, incomes, counts) and a 3-class label that
    depends on them non-linearly -- the situation standardisation is for."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(FEATURES)))
    offsets = np.array([40.0, 50_000.0, 38.0, 5.0, 12.0, 600.0])
    scales = np.array([12.0, 20_000.0, 8.0, 3.0, 6.0, 90.0])
    x = offsets + scales * z
    logits = np.stack([z[:, 0] + z[:, 1] - 0.5 * z[:, 2] ** 2,
                       -z[:, 0] + z[:, 3] * z[:, 4],
                       0.8 * z[:, 5] - z[:, 1] + 0.3], axis=1)
    y = np.argmax(logits + 0.5 * rng.gumbel(size=logits.shape), axis=1)
    return x, y


def write_csv(path: str, x: np.ndarray, y: np.ndarray) -> None:
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=",".join([*FEATURES, "label"]), comments="",
               fmt=["%.6g"] * x.shape[1] + ["%d"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tabular", help="output folder (data, config, run)")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--accountant", default="prv", choices=["prv", "rdp", "pld"])
    ap.add_argument("--tiny", action="store_true", help="600 rows, 2 epochs, RDP accounting (a smoke test)")
    args = ap.parse_args(argv)
    rows, epochs, batch = (600, 2, 64) if args.tiny else (4000, 20, 256)
    accountant = "rdp" if args.tiny else args.accountant
    os.makedirs(args.out, exist_ok=True)
    train_csv, public_csv = os.path.join(args.out, "train.csv"), os.path.join(args.out, "public_reference.csv")
    write_csv(train_csv, *synthetic_table(rows, seed=1))          # the private data
    write_csv(public_csv, *synthetic_table(500, seed=2))          # a PUBLIC sample: its statistics may be used
    delta = 10 ** -int(np.ceil(np.log10(rows * 1.5)))              # < 1/N
    cfg = {
        "model": {"module": os.path.join(HERE, "tabular_model.py") + ":WideAndDeep", "kwargs": {"hidden": [32, 32]}},
        "data": {"name": train_csv, "options": {"label_column": "label", "test_fraction": 0.2,
                                               "standardize": {"public_csv": public_csv}}},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "training": {"epochs": epochs, "batch_size": batch, "seed": 0 if args.tiny else None,
                     "accountant": accountant,
                     "dp": {"epsilon": args.epsilon, "delta": delta, "max_grad_norm": 1.0}},
        "output": {"dir": os.path.join(args.out, "run"), "progress": False},
    }
    config = os.path.join(args.out, "tabular.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    run = cfg["output"]["dir"]
    if jaxdp(["train", "--config", config, "--fresh"]) != 0:
        raise SystemExit("jaxdp train failed (see the message above)")
    card = os.path.join(run, "model_card.yaml")
    if jaxdp(["report", "--run", run, "--model-card", card]) != 0:
        raise SystemExit("jaxdp report failed (see the message above)")
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    with open(card) as f:
        model_privacy = yaml.safe_load(f)["model_privacy"]
    return {"run": run, "card": card, "metrics": metrics, "model_privacy": model_privacy,
            "target_epsilon": args.epsilon, "config": config}


if __name__ == "__main__":
    r = main()
    print(f"model card: {r['card']}")
