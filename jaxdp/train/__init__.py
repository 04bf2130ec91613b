"""The config-driven trainer (``jaxdp train``, ``jaxdp compare``); see :mod:`jaxdp.train.config`."""
from jaxdp.train.config import ConfigError, load_config, validate_config
from jaxdp.train.trainer import DPTrainer, compare

__all__ = ["DPTrainer", "compare", "ConfigError", "load_config", "validate_config"]
