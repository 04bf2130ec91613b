"""The config-driven trainer (``jaxdp train``, ``jaxdp compare``); see :mod:`jaxdp.train.config`.

A run's record (``metrics.json``) is :class:`RunSummary` (:mod:`jaxdp.train.summary`). ``DPTrainer`` and
``compare`` are imported on first use, so that reading a record or a config does not import the trainer.
"""
from jaxdp.train.config import ConfigError, config_hash, load_config, validate_config
from jaxdp.train.summary import EpochRecord, RunSummary, RunSummaryError

_LAZY = {"DPTrainer", "compare"}


def __getattr__(name: str):
    if name in _LAZY:
        from jaxdp.train import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'jaxdp.train' has no attribute {name!r}")


__all__ = ["DPTrainer", "compare", "ConfigError", "load_config", "validate_config", "config_hash",
           "RunSummary", "EpochRecord", "RunSummaryError"]
