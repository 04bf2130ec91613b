"""Privacy accounting: RDP, PLD and PRV accountants, noise calibration, TF Privacy's statement.

Everything is built on Google's ``dp-accounting`` (plus the exact RDP of the Poisson-sampled Gaussian,
:mod:`jaxdp.accounting.sgm_rdp`); see :mod:`jaxdp.accounting.core` and ``docs/accounting.md``. A mechanism is
described once, by :class:`Event` (:mod:`jaxdp.accounting.event`).
"""
from jaxdp.accounting.core import (  # noqa: F401
    ACCOUNTANTS, NEIGHBORING_RELATIONS, SAMPLINGS, Accountant, DeltaWarning, DpSgdPrivacy, PRVPrivacyAccountant,
    calibrate_noise_multiplier, check_delta, check_epsilon, compose_events, compute_dp_sgd_privacy,
    compute_epsilon, events_delta, events_epsilon, make_dp_accountant, merge_events, steps_for_epochs,
    to_dp_event, validate_event, warn_if_delta_too_large, CYCLIC_MECHANISMS, FIXED_ORDER_MECHANISMS,
    cyclic_participations,
)
from jaxdp.accounting.core import __all__  # noqa: F401
from jaxdp.accounting.event import FIELDS, RELATION_LABELS, RELATIONS, Event, merge  # noqa: F401
from jaxdp.accounting.sgm_rdp import ExactRdpAccountant, compute_rdp_poisson_gaussian  # noqa: F401

__all__ = [*__all__, "ExactRdpAccountant", "compute_rdp_poisson_gaussian", "FIELDS", "RELATION_LABELS"]
