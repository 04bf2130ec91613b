"""The tiny trainer run the trainer, report and audit tests share (fixtures ``tiny_private_run`` and
``tiny_nonprivate_run`` in ``tests/conftest.py``, trained once per session).

Logistic regression on digits, 2 epochs of Poisson batches of expected size 256, SGD at learning rate 2, RDP
accountant, target epsilon 2 at delta 1e-5, clip norm 1. The shared runs are read, never written: a test that
needs to change a run directory copies it first.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any


def tiny_config(out: str | os.PathLike, epochs: int = 2, *, data: Any = "digits",
                training: dict | None = None, **dp: Any) -> dict:
    """The trainer config of the tiny run, writing to ``out``; ``data`` names the dataset, ``training``
    overrides keys of ``training`` (a mechanism, a batch size) and ``dp`` keys of ``training.dp``."""
    return {
        "model": {"name": "logreg"},
        "data": {"name": str(data)},
        "optimizer": {"name": "sgd", "learning_rate": 2.0},
        "training": {"epochs": epochs, "batch_size": 256, "seed": 7, "accountant": "rdp", **(training or {}),
                     "dp": dict({"enabled": True, "epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0,
                                 "noise_multiplier": None}, **dp)},
        "output": {"dir": str(out), "progress": False},
    }


@dataclasses.dataclass(frozen=True)
class TinyRun:
    """A finished tiny run: the trainer object, its output directory and what ``train()`` returned."""
    trainer: Any
    run_dir: str
    summary: dict


def train_tiny(out: str | os.PathLike, **dp: Any) -> TinyRun:
    from jaxdp.train import DPTrainer
    trainer = DPTrainer(tiny_config(out, **dp), log=False)
    summary = trainer.train()
    return TinyRun(trainer=trainer, run_dir=str(out), summary=summary)
