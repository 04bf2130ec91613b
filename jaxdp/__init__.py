"""jaxdp: differentially private training for JAX and Flax.

The package is organised by idea (see ``README.md`` for the architecture):

* :mod:`jaxdp.clipping`  -- per-example clipping, the clipped SUM (privacy unit: one example).
* :mod:`jaxdp.per_example` -- per-example backends (vmap, ghost, auto, registered ones) and their invariants.
* :mod:`jaxdp.ghost`     -- per-example norms without materialising per-example gradients.
* :mod:`jaxdp.noise`     -- Gaussian noise and aggregation as optax ``GradientTransformation`` s.
* :mod:`jaxdp.matrix_factorization` -- banded matrix-factorization (correlated) noise, BandMF.
* :mod:`jaxdp.blt` -- buffered linear Toeplitz (BLT) correlated noise, O(buffers x |params|) state.
* :mod:`jaxdp.recipe`    -- De et al.'s recipe: augmentation multiplicity, parameter EMA.
* :mod:`jaxdp.optim`     -- ``dpsgd`` / ``dpadam``: noise chained with optax optimisers.
* :mod:`jaxdp.sampling`  -- Poisson and shuffled batch selection with fixed shapes.
* :mod:`jaxdp.accounting`-- RDP / PLD / PRV accountants, calibration (through ``dp-accounting``).
* :mod:`jaxdp.engine`    -- the Opacus-shaped :class:`PrivacyEngine`.
* :mod:`jaxdp.train`     -- the config-driven trainer behind ``jaxdp train``.
* :mod:`jaxdp.ledger`, :mod:`jaxdp.audit`, :mod:`jaxdp.report`, :mod:`jaxdp.telemetry`,
  :mod:`jaxdp.lm`, :mod:`jaxdp.distributed` -- budget ledger, privacy audits, model cards,
  Prometheus metrics, language models, multi-device training.

Heavy or optional pieces are imported lazily, on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from jaxdp.clipping import ClipStats, clipped_grad, clip_factor, total_clip_norm  # noqa: E402
from jaxdp.noise import AddNoiseState, add_noise, dp_aggregate  # noqa: E402
from jaxdp.optim import dpadam, dpsgd  # noqa: E402
from jaxdp.sampling import CyclicPoissonSampler, FixedOrderSampler, PoissonSampler, ShuffleSampler  # noqa: E402

# Public names defined in modules that are imported on first use (keeps `import jaxdp` light).
_LAZY_ATTRS = {
    "PrivacyEngine": "jaxdp.engine",
    "PrivateTraining": "jaxdp.engine",
    "NonPrivateTraining": "jaxdp.training",
    "PrivacyBudgetExhausted": "jaxdp.engine",
    "validate": "jaxdp.validation",
    "fix": "jaxdp.validation",
    "ModelValidationError": "jaxdp.validation",
    # Public errors, so `except jaxdp.PrivacyBudgetExhausted:` works without knowing the module layout.
    "DataValidationError": "jaxdp.data",
    "ConfigError": "jaxdp.train.config",
    "LedgerError": "jaxdp.ledger",
    "BudgetExceededError": "jaxdp.ledger",
    "ReservationRequiredError": "jaxdp.ledger",
    "LedgerIntegrityError": "jaxdp.ledger",
    "LedgerStoreError": "jaxdp.ledger",
    "DeltaWarning": "jaxdp.accounting",
    "adaptive_clipping": "jaxdp.adaptive",
    "virtual_batch_grad": "jaxdp.virtual",
    "bandmf_noise": "jaxdp.matrix_factorization",
    "blt_noise": "jaxdp.blt",
    "augmentation_multiplicity": "jaxdp.recipe",
    "ema_update": "jaxdp.recipe",
}
_LAZY_MODULES = (
    "accounting", "audit", "data", "distributed", "engine", "ghost", "ledger", "lm", "models",
    "report", "telemetry", "train", "validation", "adaptive", "virtual", "cli", "compat",
    "matrix_factorization", "recipe", "blt", "training",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"jaxdp.{name}")
    raise AttributeError(f"module 'jaxdp' has no attribute {name!r}")


__all__ = [
    "ClipStats", "clipped_grad", "clip_factor", "total_clip_norm",
    "AddNoiseState", "add_noise", "dp_aggregate", "dpsgd", "dpadam",
    "PoissonSampler", "CyclicPoissonSampler", "FixedOrderSampler", "ShuffleSampler", *_LAZY_ATTRS,
]
