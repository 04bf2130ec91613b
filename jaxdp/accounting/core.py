"""Privacy accounting for DP-SGD on top of Google's ``dp-accounting``.

A training run is a sequence of *events*: ``T`` steps of a Gaussian mechanism (noise std
``noise_multiplier * C`` on a sum of clipped per-example gradients, sensitivity ``C``) applied to a batch drawn
by some sampling scheme. An event is a :class:`jaxdp.accounting.Event` (:mod:`jaxdp.accounting.event`, the one
description of a mechanism); its wire format is a plain JSON-safe dict, so that a run's history can be
checkpointed, written to the budget ledger and re-accounted later with any accountant. Every function here
takes events or their dicts:

``{"sampling": "poisson", "noise_multiplier": s, "sample_rate": q, "steps": T}``
    Poisson subsampling: each example joins each batch independently with probability ``q``.
``{"sampling": "shuffle", "noise_multiplier": s, "batch_size": b, "dataset_size": n, "steps": T}``
    Fixed-size batches of ``b`` drawn without replacement from ``n`` examples. Only the replace-one
    neighbouring relation has an analysis (Wang, Balle, Kasiviswanathan 2019), and only the RDP accountant
    implements it.
``{"sampling": "truncated_poisson", "noise_multiplier": s, "sample_rate": q, "max_batch_size": m,
"dataset_size": n, "steps": T}``
    Poisson sampling whose batch is cut down to a uniformly random subset of ``m`` examples when larger.
``{"sampling": "cyclic_poisson", "mechanism": m, "bands": b, "noise_multiplier": s, "sample_rate": p, "steps": T}``
    Cyclic Poisson sampling (:class:`jaxdp.sampling.CyclicPoissonSampler`: ``b`` fixed groups, step ``t``
    samples group ``t mod b`` with rate ``p``) with mechanism ``m`` = ``"bandmf"`` (b-banded matrix-factorization
    noise, max column norm 1; :mod:`jaxdp.matrix_factorization`) or ``"dpsgd"`` (independent noise). Accounted as
    DP-SGD with rate ``p`` and ``ceil(T / b)`` steps (Choquette-Choo et al. 2023, Theorem 4), for ``T`` CONSECUTIVE
    steps of one cyclic schedule. :class:`Accountant` merges consecutive identical records (one run, recorded step
    by step); :func:`merge_events` never merges cyclic events (two runs, each restarting its cycle, cost
    ``ceil(T1/b) + ceil(T2/b)``).
``{"sampling": "fixed_order", "mechanism": m, "min_separation": b, "horizon": H, "noise_multiplier": s, "steps": T}``
    A fixed, data-independent batch order (:class:`jaxdp.sampling.FixedOrderSampler`: one secret permutation split
    into ``b`` batches, repeated every epoch, so each example takes part once per epoch, exactly ``b`` steps apart)
    without amplification, for ``T <= H`` consecutive steps of one run planned for ``H`` steps. Mechanism ``m`` =
    ``"blt"`` (buffered linear Toeplitz noise scaled to the sensitivity of ``ceil(H / b)`` participations b apart,
    :mod:`jaxdp.blt`): ONE Gaussian mechanism with noise multiplier ``s``, whatever ``T``; or ``"dpsgd"``
    (independent noise): ``ceil(T / b)`` Gaussian mechanisms (an example's participations). Neighbouring relation:
    zero-out (add/remove with the fixed participation schema); replace-one is refused. ``T > H`` is refused (the
    noise was not scaled for more participations); like cyclic events, these are never merged across runs.
``{"sampling": "none", "steps": T}``
    Steps that touched data without noise: epsilon is infinite.

Three accountants answer ``epsilon(delta)`` and ``delta(epsilon)`` for a list of events:

* ``"rdp"``: Renyi DP (Mironov 2017) with the EXACT RDP of the Poisson-subsampled Gaussian at integer and
  fractional orders (Mironov, Talwar, Zhang 2019, section 3.3; :mod:`jaxdp.accounting.sgm_rdp`), on
  :class:`dp_accounting.rdp.RdpAccountant` (which still accounts the other samplings) with its conversion to
  (eps, delta) of Balle et al. 2020 / Canonne et al. 2020, the one Opacus uses. Orders: Opacus's 1.1 ... 10.9,
  12 ... 63 plus 128, 256, 512, 1024. Equals Opacus's RDP epsilon; fast, loose by ~5-10 % against PLD.
* ``"pld"``: :class:`dp_accounting.pld.PLDAccountant` (privacy loss distributions, Koskela et al. 2020,
  Doroshenko et al. 2022) with ``value_discretization_interval=1e-4``, pessimistic (connect-the-dots)
  discretisation: an upper bound up to floating-point error.
* ``"prv"`` (default): Gopi, Lee and Wutschitz (2021) "privacy random variables" with Opacus's semantics: the
  reported epsilon is the upper end of the PRV error interval, ``eps_hat(delta - delta_error) + eps_error`` with
  ``eps_error = 0.01`` and ``delta_error = delta / 1000``. ``eps_hat`` is computed with dp-accounting's PLD
  numerics (a privacy loss distribution IS the distribution of the privacy random variable), not with Microsoft's
  ``prv-accountant`` package: see ``docs/accounting.md`` for why (maintained, and 10-50x faster: prv-accountant
  evaluates in ``long double``).

Neighbouring relation: ``"add_remove"`` (default: datasets differing by adding or removing one example, the
relation Opacus and TF Privacy report) or ``"replace_one"``. Each accountant refuses an event it cannot account
for under the chosen relation (privacy rule 5) instead of accounting it as something else.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting import mechanism_calibration as mcal
from dp_accounting import privacy_accountant as pa
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_lib
from dp_accounting.pld import pld_privacy_accountant

from jaxdp import _checks
from jaxdp import sampling as _sampling
from jaxdp.accounting.event import (ACCOUNTANTS, CYCLIC_MECHANISMS, FIXED_ORDER_MECHANISMS,  # noqa: F401
                                    RELATIONS, SAMPLINGS, Event, merge)
from jaxdp.accounting.sgm_rdp import OPACUS_ORDERS, ExactRdpAccountant  # noqa: F401  (OPACUS_ORDERS: re-export)

_DP_RELATIONS = {"add_remove": pa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                 "replace_one": pa.NeighboringRelation.REPLACE_ONE}
#: Each neighbouring relation (:data:`jaxdp.accounting.event.RELATIONS`) as dp-accounting names it.
NEIGHBORING_RELATIONS = {r: _DP_RELATIONS[r] for r in RELATIONS}

#: PLD discretisation used by "pld" and "prv" (dp-accounting's default; docs/privacy.md's reference figures use it).
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4
#: Opacus's PRV error budget: the epsilon reported is an upper bound, at most this much above the estimate.
PRV_EPS_ERROR = 0.01
#: Opacus's PRV delta error, relative to the target delta (``delta_error = delta * PRV_DELTA_ERROR_FRACTION``).
PRV_DELTA_ERROR_FRACTION = 1e-3
#: Largest noise multiplier calibration searches; a target that needs more is reported as unreachable.
MAX_NOISE_MULTIPLIER = 1e6
#: Orders of TF Privacy 0.9's statement (``compute_dp_sgd_privacy_statement`` composes into a default
#: ``dp_accounting.rdp.RdpAccountant``): dp-accounting's default orders 1.1, ..., 10.9, 11, 12, ..., 63, 128, 256,
#: 512, 1024. Opacus's default alphas (``OPACUS_ORDERS``) lack 11 and 128-1024, which matters when the optimal
#: order is large (little noise spent: sigma 40, one full-batch step -> 0.0846 at order 128, 0.1226 at order 63).
TF_PRIVACY_ORDERS = tuple(float(o) for o in _rdp_lib.DEFAULT_RDP_ORDERS)

_FORMAT = "jaxdp.accounting/1"


class DeltaWarning(UserWarning):
    """``delta`` is at least ``1/N``: such a guarantee allows releasing some example outright."""


# ----------------------------------------------------------------------------------------------- validation


def check_delta(delta: Any, name: str = "delta") -> float:
    """``delta`` must lie in (0, 1); returns it as a float."""
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1), got {delta!r}") from None
    if not (0.0 < d < 1.0) or math.isnan(d):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {delta!r}; the usual choice is "
                         "delta < 1/N for N training examples (e.g. 1e-5 for N = 60000)")
    return d


def check_epsilon(epsilon: Any, name: str = "epsilon") -> float:
    """``epsilon`` must be finite and > 0; returns it as a float."""
    return _checks.positive(name, epsilon)


def warn_if_delta_too_large(delta: float, dataset_size: int | None, stacklevel: int = 3) -> None:
    """Warn (``DeltaWarning``) unless ``delta < 1/N``: a larger delta permits leaking ~``delta * N`` examples."""
    if dataset_size is None:
        return
    n = int(dataset_size)
    if n > 0 and delta >= 1.0 / n:
        warnings.warn(
            f"delta = {delta:g} is not below 1/N = 1/{n} = {1.0 / n:.3g}. The rule is delta < 1/N: with "
            "delta >= 1/N a mechanism that publishes a random example in the clear satisfies the guarantee. "
            f"Choose delta well below {1.0 / n:.3g} (e.g. 1/N^1.1).", DeltaWarning, stacklevel=stacklevel)


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def _check_relation(relation: str) -> str:
    if relation not in RELATIONS:
        raise ValueError(f"neighboring_relation must be one of {RELATIONS}, got {relation!r} "
                         "('add_remove': add or remove one example, the default; 'replace_one': replace one)")
    return relation


def _noise(value: Any) -> float:
    return _checks.non_negative("noise_multiplier", value)


def _steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"steps must be a non-negative integer, got {value!r}")
    return int(value)


def validate_event(event: Mapping[str, Any] | Event) -> dict:
    """Check one event dict and return it normalised (Python ints/floats, canonical key order):
    ``Event.from_dict(event).to_dict()`` (see :class:`jaxdp.accounting.Event`)."""
    return Event.coerce(event).to_dict()


def merge_events(events: Iterable[Mapping[str, Any] | Event]) -> list[dict]:
    """Validate events, drop zero-step ones and merge consecutive events that differ only in ``steps``
    (cyclic-Poisson events never: each restarts its cycle). The dicts of :func:`jaxdp.accounting.event.merge`."""
    return [e.to_dict() for e in merge(events)]


# ------------------------------------------------------------------------------------ events -> DpEvents


def _refuse(event: Mapping[str, Any] | Event, accountant: str, relation: str) -> str | None:
    """A clear reason why ``accountant`` cannot account ``event`` under ``relation`` (None if it can)."""
    return Event.coerce(event).refusal(accountant, relation)


def cyclic_participations(steps: int, bands: int) -> int:
    """``ceil(steps / bands)``: the most steps one example takes part in under cyclic sampling with ``bands`` groups."""
    return -(-int(steps) // int(bands))


def to_dp_event(event: Mapping[str, Any] | Event) -> dpe.DpEvent:
    """The ``dp_accounting`` event for one jaxdp event, self-composed ``steps`` times
    (:meth:`jaxdp.accounting.Event.to_dp_event`)."""
    return Event.coerce(event).to_dp_event()


class PRVPrivacyAccountant(pld_privacy_accountant.PLDAccountant):
    """Gopi et al. (2021) PRV accounting with Opacus's semantics, on dp-accounting's PLD numerics.

    ``get_epsilon(delta) = eps_pld(delta - delta_error) + eps_error`` with ``delta_error = delta / 1000`` and
    ``eps_error = 0.01``, the quantity Opacus's ``PRVAccountant.get_epsilon`` returns (its ``eps_upper``).
    ``get_delta(eps) = delta_pld(eps - eps_error) / (1 - 1/1000)``, the matching upper bound (so that
    ``get_delta(get_epsilon(d)) == d`` up to rounding). ``eps_pld``/``delta_pld`` come from a pessimistic
    (connect-the-dots) privacy loss distribution, itself an upper bound; the error margins are kept so that the
    figures are Opacus's.
    """

    def __init__(self, neighboring_relation=pa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                 value_discretization_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
                 eps_error: float = PRV_EPS_ERROR, delta_error_fraction: float = PRV_DELTA_ERROR_FRACTION):
        super().__init__(neighboring_relation, value_discretization_interval)
        self.eps_error = float(eps_error)
        self.delta_error_fraction = float(delta_error_fraction)

    def get_epsilon(self, target_delta: float) -> float:
        eps = super().get_epsilon(target_delta * (1.0 - self.delta_error_fraction))
        if eps == 0.0 or math.isinf(eps):
            return float(eps)
        return float(eps) + self.eps_error

    def get_delta(self, target_epsilon: float) -> float:
        d = super().get_delta(max(0.0, target_epsilon - self.eps_error))
        return float(min(1.0, d / (1.0 - self.delta_error_fraction)))


def make_dp_accountant(accountant: str = "prv", neighboring_relation: str = "add_remove",
                       ) -> pa.PrivacyAccountant:
    """A fresh, empty ``dp_accounting`` accountant of the given kind.

    ``"rdp"`` gives an :class:`~jaxdp.accounting.sgm_rdp.ExactRdpAccountant` (a ``RdpAccountant`` subclass that
    accounts Poisson-sampled and plain Gaussian events with the exact signed-series RDP).
    """
    rel = NEIGHBORING_RELATIONS[_check_relation(neighboring_relation)]
    if _check_accountant(accountant) == "rdp":
        return ExactRdpAccountant(neighboring_relation=rel)
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(
            rel, value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)
    return PRVPrivacyAccountant(rel)


def compose_events(events: Sequence[Event | Mapping[str, Any]], accountant: str = "prv",
                   neighboring_relation: str = "add_remove", *, dataset_size_offset: int = 0,
                   ) -> pa.PrivacyAccountant:
    """A ``dp_accounting`` accountant with all ``events`` composed; refuses events it cannot account.

    ``dataset_size_offset`` is added to the ``dataset_size`` of truncated-Poisson events (see
    :func:`_compose_variants`).
    """
    acc = make_dp_accountant(accountant, neighboring_relation)
    for e in merge(Event.coerce(e).accounted() for e in events):
        if e.sampling == "truncated_poisson" and dataset_size_offset:
            e = e.replace(dataset_size=_checks.present(e.dataset_size) + dataset_size_offset)
        reason = e.refusal(accountant, neighboring_relation)
        if reason is not None:
            raise ValueError(reason)
        try:
            acc.compose(e.to_dp_event())   # sigma = 0 composes as non-private, whatever the sampling
        except pa.UnsupportedEventError as err:
            raise ValueError(f"the {accountant!r} accountant cannot account {e.to_dict()} under the "
                             f"{neighboring_relation!r} relation: {err}") from None
    return acc


def _compose_variants(events: Sequence[Event | Mapping[str, Any]], accountant: str, neighboring_relation: str,
                      ) -> list[pa.PrivacyAccountant]:
    """The composed accountants whose worst case is the guarantee.

    dp-accounting's truncated-Poisson PLD takes the size ``n`` of the dataset that contains the protected
    example. Under add/remove that is ``N`` (the example is removed from the training set) or ``N + 1`` (an
    example is added to it), the same ``n`` at every step, so the guarantee is the worse of the two compositions.
    Without truncated-Poisson events (or under replace-one) there is one composition.
    """
    merged = merge(Event.coerce(e).accounted() for e in events)
    variants = [compose_events(merged, accountant, neighboring_relation)]
    if neighboring_relation == "add_remove" and any(e.sampling == "truncated_poisson" for e in merged):
        variants.append(compose_events(merged, accountant, neighboring_relation, dataset_size_offset=1))
    return variants


def events_epsilon(events: Sequence[Event | Mapping[str, Any]], delta: float, accountant: str = "prv",
                   neighboring_relation: str = "add_remove") -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (``inf`` if any step was non-private, 0 if none)."""
    delta = check_delta(delta)
    return max(_epsilon_of(a, delta) for a in _compose_variants(events, accountant, neighboring_relation))


def events_delta(events: Sequence[Mapping[str, Any]], epsilon: float, accountant: str = "prv",
                 neighboring_relation: str = "add_remove") -> float:
    """Delta at ``epsilon`` of the composition of ``events`` (1 if any step was non-private, 0 if none)."""
    epsilon = check_epsilon(epsilon)
    return max(_delta_of(a, epsilon) for a in _compose_variants(events, accountant, neighboring_relation))


def _is_empty(acc: pa.PrivacyAccountant) -> bool:
    return isinstance(acc.ledger, dpe.NoOpDpEvent) or (
        isinstance(acc.ledger, dpe.ComposedDpEvent) and not acc.ledger.events)


def _epsilon_of(acc: pa.PrivacyAccountant, delta: float) -> float:
    if _is_empty(acc):
        return 0.0
    return float(max(0.0, acc.get_epsilon(delta)))


def _delta_of(acc: pa.PrivacyAccountant, epsilon: float) -> float:
    if _is_empty(acc):
        return 0.0
    return float(min(1.0, max(0.0, acc.get_delta(epsilon))))


# ------------------------------------------------------------------------------------------- Accountant


class Accountant:
    """A running privacy accountant: records DP-SGD steps as events and answers epsilon / delta queries.

    Args:
      accountant: ``"prv"`` (default; Opacus's PRV semantics), ``"pld"`` or ``"rdp"``; kept as :attr:`method`
        (``.accountant`` is its deprecated old name).
      neighboring_relation: ``"add_remove"`` (default) or ``"replace_one"``; the guarantee is about datasets
        related this way.

    ``step`` records steps; consecutive identical steps merge into one event, so a run of a million identical
    steps is a single history entry. The history is JSON (``to_json``/``from_json``) for checkpoints and the
    ledger. Queries re-account the whole history with the chosen accountant (the composed result is cached).
    """

    def __init__(self, accountant: str = "prv", neighboring_relation: str = "add_remove") -> None:
        self.method = _check_accountant(accountant)
        self.neighboring_relation = _check_relation(neighboring_relation)
        self._history: list[Event] = []
        self._cache: tuple[Any, list[pa.PrivacyAccountant]] | None = None

    @property
    def accountant(self) -> str:
        """Deprecated name of :attr:`method` (``"prv"``, ``"pld"`` or ``"rdp"``)."""
        import warnings
        warnings.warn("Accountant.accountant is deprecated; use Accountant.method (same value)",
                      _checks.JaxdpDeprecationWarning, stacklevel=2)
        return self.method

    # -- recording
    def step(self, noise_multiplier: float, sample_rate: float | None = None, num_steps: int = 1, *,
             sampling: str = "poisson", dataset_size: int | None = None, batch_size: int | None = None,
             max_batch_size: int | None = None, bands: int | None = None, mechanism: str = "dpsgd",
             min_separation: int | None = None, horizon: int | None = None) -> None:
        """Record ``num_steps`` DP-SGD steps with noise std ``noise_multiplier * C``.

        ``sampling`` is the batch selection actually used (the samplers' ``.sampling``): ``"poisson"`` needs
        ``sample_rate``; ``"shuffle"`` needs ``batch_size`` and ``dataset_size``; ``"truncated_poisson"`` needs
        ``sample_rate``, ``max_batch_size`` and ``dataset_size``; ``"cyclic_poisson"`` needs ``sample_rate``,
        ``bands`` and ``mechanism`` (consecutive steps of ONE cyclic schedule); ``"fixed_order"`` needs
        ``mechanism``, ``min_separation`` and ``horizon`` (consecutive steps of ONE run); ``"none"`` records
        non-private steps.
        Raises ``ValueError`` at once if this accountant cannot account the sampling (privacy rule 5).
        """
        self.record(Event.from_mechanism(noise_multiplier, sample_rate, num_steps, sampling=sampling,
                                         dataset_size=dataset_size, batch_size=batch_size,
                                         max_batch_size=max_batch_size, bands=bands, mechanism=mechanism,
                                         min_separation=min_separation, horizon=horizon))

    def record(self, event: Mapping[str, Any] | Event) -> None:
        """Record one :class:`~jaxdp.accounting.Event` (or its dict), as :meth:`step` does: validated, refused
        at once if this accountant cannot account it, and merged into the last event when only ``steps``
        differ (the steps of one run, so consecutive cyclic-Poisson steps merge too). Record-only keys
        (``l2_clip_norm``) are dropped."""
        e = Event.coerce(event).accounted()
        reason = e.refusal(self.method, self.neighboring_relation)
        if reason is not None:
            raise ValueError(reason)
        self._history[-1:] = merge(self._history[-1:] + [e], one_run=True)

    # -- views
    @property
    def history(self) -> list[dict]:
        """The merged events, oldest first (copies: editing them does not change the accountant)."""
        return [e.to_dict() for e in self._history]

    @property
    def steps(self) -> int:
        """Total number of steps recorded (private and non-private)."""
        return sum(e.steps for e in self._history)

    def __len__(self) -> int:
        return self.steps

    # -- queries
    def _composed(self) -> list[pa.PrivacyAccountant]:
        key = tuple(self._history)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _compose_variants(self._history, self.method, self.neighboring_relation))
        return self._cache[1]

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded, at ``delta`` (0 with no steps; ``inf`` after non-private steps)."""
        delta = check_delta(delta)
        return max(_epsilon_of(a, delta) for a in self._composed())

    def get_delta(self, epsilon: float) -> float:
        """Delta of everything recorded, at ``epsilon`` (0 with no steps; 1 after non-private steps)."""
        epsilon = check_epsilon(epsilon)
        return max(_delta_of(a, epsilon) for a in self._composed())

    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        return self.get_epsilon(delta), float(delta)

    # -- serialisation
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "accountant": self.method,
                "neighboring_relation": self.neighboring_relation, "history": self.history}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Accountant:
        if not isinstance(d, Mapping) or "history" not in d:
            raise ValueError("not a serialised jaxdp Accountant (expected a dict with 'history')")
        if d.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"unknown accountant format {d.get('format')!r} (this jaxdp reads {_FORMAT!r})")
        acc = cls(d.get("accountant", "prv"), d.get("neighboring_relation", "add_remove"))
        for e in d["history"]:
            acc.record(e)
        return acc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Accountant:
        return cls.from_dict(json.loads(s))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Accountant) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"Accountant(accountant={self.method!r}, neighboring_relation={self.neighboring_relation!r}, "
                f"steps={self.steps}, events={len(self._history)})")


# ---------------------------------------------------------------------------------- one-shot functions


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """``ceil(epochs / q)``: steps that see each example ``epochs`` times in expectation (``q = B / N``); the one
    rule, :func:`jaxdp.sampling.steps_for_epochs`."""
    return _sampling.steps_for_epochs(epochs, sample_rate)


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "prv", *, neighboring_relation: str = "add_remove",
                    sampling: str = "poisson", dataset_size: int | None = None, batch_size: int | None = None,
                    max_batch_size: int | None = None) -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps with noise multiplier ``sigma`` and sample rate ``q``.

    Poisson sampling by default; ``sampling="shuffle"`` (needs ``dataset_size``, ``accountant="rdp"`` and
    ``neighboring_relation="replace_one"``) or ``"truncated_poisson"`` (needs ``dataset_size`` and
    ``max_batch_size``) otherwise. ``sigma = 0`` gives ``inf``; ``steps = 0`` gives 0. With ``dataset_size``
    given, warns (:class:`DeltaWarning`) unless ``delta < 1/N``.

    Example: 60 epochs of Poisson batches of expected size 256 from 60,000 examples at noise multiplier 1.1:

    >>> from jaxdp import accounting
    >>> eps = accounting.compute_epsilon(1.1, 256 / 60000, steps=14063, delta=1e-5, accountant="rdp")
    >>> round(eps, 2)
    2.6
    >>> accounting.compute_epsilon(1.1, 256 / 60000, steps=0, delta=1e-5)   # nothing released
    0.0
    """
    delta = check_delta(delta)
    _check_accountant(accountant)
    q = _checks.sample_rate(sample_rate)
    warn_if_delta_too_large(delta, dataset_size)
    event = Event.from_mechanism(noise_multiplier, q, steps, sampling=sampling, dataset_size=dataset_size,
                                 batch_size=batch_size, max_batch_size=max_batch_size)
    return events_epsilon([event], delta, accountant, neighboring_relation)


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float,
                               steps: int | None = None, epochs: float | None = None, accountant: str = "prv",
                               *, neighboring_relation: str = "add_remove", sampling: str = "poisson",
                               dataset_size: int | None = None, max_batch_size: int | None = None,
                               tol: float = 1e-5, _single_variant: bool = False) -> float:
    """The smallest noise multiplier whose epsilon at ``target_delta`` is at most ``target_epsilon``.

    Exactly one of ``steps`` or ``epochs`` (``steps = ceil(epochs / q)``). Brent's method through
    :func:`dp_accounting.calibrate_dp_mechanism`, which guarantees the returned sigma meets the target (never
    above ``target_epsilon``) and lies within ``tol`` of the optimum; Opacus's bisection stops up to 0.01 in
    epsilon short of the target, so for the same inputs it never returns a smaller sigma than ours (beyond
    ``tol``). Raises ``ValueError`` if even ``sigma = 1e6`` does not reach the target.

    Example: the noise for epsilon 3 at delta 1e-5 over 10 epochs at sample rate 0.01 (1,000 steps):

    >>> from jaxdp import accounting
    >>> sigma = accounting.calibrate_noise_multiplier(3.0, 1e-5, 0.01, epochs=10, accountant="rdp")
    >>> round(sigma, 3)
    0.865
    >>> accounting.compute_epsilon(sigma, 0.01, steps=1000, delta=1e-5, accountant="rdp") <= 3.0
    True
    """
    target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
    target_delta = check_delta(target_delta, "target_delta")
    _check_accountant(accountant)
    q = _checks.sample_rate(sample_rate)
    warn_if_delta_too_large(target_delta, dataset_size)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs (steps = ceil(epochs / sample_rate))")
    if epochs is not None:
        steps = steps_for_epochs(epochs, q)
    steps = _steps(steps)
    if steps == 0:
        raise ValueError("steps is 0: nothing is released, any noise multiplier (including 0) meets the target")
    if sampling == "truncated_poisson" and neighboring_relation == "add_remove" and not _single_variant:
        if dataset_size is None:
            raise ValueError("truncated Poisson sampling needs dataset_size and max_batch_size")
        # The guarantee is the worse of n = N and n = N + 1 (see _compose_variants): meet both.
        return max(calibrate_noise_multiplier(
            target_epsilon, target_delta, q, steps=steps, accountant=accountant,
            neighboring_relation=neighboring_relation, sampling=sampling, dataset_size=n,
            max_batch_size=max_batch_size, tol=tol, _single_variant=True) for n in (dataset_size, dataset_size + 1))
    batch_size = int(round(q * dataset_size)) if (sampling == "shuffle" and dataset_size) else None

    def event(sigma: float) -> Event:
        return Event.from_mechanism(sigma, q, steps, sampling=sampling, dataset_size=dataset_size,
                                    batch_size=batch_size, max_batch_size=max_batch_size)

    def make_event(sigma: float) -> dpe.DpEvent:
        e = event(sigma)
        reason = e.refusal(accountant, neighboring_relation)
        if reason is not None:
            raise ValueError(reason)
        return e.to_dp_event()

    memo: dict = {}   # PLD/PRV evaluations cost ~0.5 s: never compute the same one twice

    def fresh() -> pa.PrivacyAccountant:
        return _MemoAccountant(lambda: make_dp_accountant(accountant, neighboring_relation), memo)

    def eps(sigma: float) -> float:
        return float(fresh().compose(make_event(sigma)).get_epsilon(target_delta))

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi). PLD/PRV evaluations cost ~0.5 s, so their bracket
    # starts from the (cheap, looser, hence larger) RDP sigma when RDP can account the sampling.
    hi = 1.0
    if accountant != "rdp" and event(1.0).refusal("rdp", neighboring_relation) is None:
        try:
            hi = calibrate_noise_multiplier(target_epsilon, target_delta, q, steps=steps, accountant="rdp",
                                            neighboring_relation=neighboring_relation, sampling=sampling,
                                            dataset_size=dataset_size, max_batch_size=max_batch_size, tol=1e-4)
        except ValueError:
            hi = 1.0
    while eps(hi) > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon:g} at delta "
                f"{target_delta:g} with {steps} steps at sample rate {q:g} ({accountant}): the target is out of "
                "reach; raise target_epsilon or target_delta, or train fewer steps / with a smaller sample rate")
        hi = min(hi * 2.0, MAX_NOISE_MULTIPLIER)
    shrink = 0.5 if accountant == "rdp" else 0.85
    lo = hi * shrink
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo * shrink
        if lo < 1e-3:
            return hi   # even tiny noise meets the (very loose) target: return the smallest sigma tried
    sigma = mcal.calibrate_dp_mechanism(fresh, make_event, target_epsilon, target_delta,
                                        mcal.ExplicitBracketInterval(lo, hi), tol=tol)
    if eps(sigma) > target_epsilon:   # belt and braces (memoised): calibrate_dp_mechanism guarantees this
        sigma = hi
    return float(sigma)


class _MemoAccountant(pa.PrivacyAccountant):
    """Records events; ``get_epsilon`` composes them on a real accountant, memoised across instances."""

    def __init__(self, factory, memo: dict) -> None:
        self._factory, self._memo = factory, memo
        self._events: list[tuple[Any, int]] = []
        super().__init__(factory().neighboring_relation)

    def _maybe_compose(self, event, count, do_compose):
        if do_compose:
            self._events.append((event, count))
        return None

    def get_epsilon(self, target_delta: float) -> float:
        key = (repr(self._events), float(target_delta))
        if key not in self._memo:
            acc = self._factory()
            for event, count in self._events:
                acc.compose(event, count)
            self._memo[key] = float(acc.get_epsilon(target_delta))
        return self._memo[key]

    def get_delta(self, target_epsilon: float) -> float:  # not used by calibration
        acc = self._factory()
        for event, count in self._events:
            acc.compose(event, count)
        return float(acc.get_delta(target_epsilon))


# --------------------------------------------------------------------------------- TF Privacy statement


@dataclass(frozen=True)
class DpSgdPrivacy:
    """Result of :func:`compute_dp_sgd_privacy` (TF Privacy's Poisson-sampling statement, see there)."""

    epsilon: float                  # RDP epsilon at delta, Poisson sampling, add/remove relation
    order: float                    # the optimal RDP order
    steps: int                      # ceil(epochs * n / batch_size)
    sample_rate: float              # batch_size / n
    delta: float
    epsilon_basic_conversion: float  # same RDP, old conversion eps = rdp + log(1/delta)/(order-1)
    epsilon_once_per_epoch: float   # no amplification: ceil(epochs) Gaussian mechanisms (arbitrary order)
    statement: str

    def __iter__(self):   # allows `eps, order = compute_dp_sgd_privacy(...)[:2]`-style unpacking
        return iter((self.epsilon, self.order))

    def __getitem__(self, i):
        return (self.epsilon, self.order)[i]


def compute_dp_sgd_privacy(n: int, batch_size: int, noise_multiplier: float, epochs: float,
                           delta: float) -> DpSgdPrivacy:
    """RDP epsilon of DP-SGD with Poisson sampling, as TF Privacy states it (the "Epsilon assuming Poisson sampling"
    line of TF Privacy 0.9's ``compute_dp_sgd_privacy_statement`` with ``used_microbatching=False``).

    ``q = batch_size / n``, ``steps = ceil(epochs * n / batch_size)``, RDP orders :data:`TF_PRIVACY_ORDERS`
    (dp-accounting's defaults, which TF Privacy's statement uses), the exact RDP of the Poisson-sampled Gaussian
    at each, conversion of Balle et al. 2020 as in dp-accounting. Returns epsilon, the optimal order and a
    statement that also gives the epsilon that holds if batches were shuffled (each example once per epoch, in
    an arbitrary order) instead of Poisson-sampled.

    How it relates to TF Privacy's numbers: TF Privacy 0.9 has no function of this name (older releases had
    one); its ``compute_dp_sgd_privacy_statement`` halves sigma by default (``used_microbatching=True``: with
    microbatches of more than one example the add/remove sensitivity is 2 C), giving a larger epsilon. MNIST,
    sigma 1.1, 60 epochs, B 256: 2.597 here and in TF Privacy without the halving, 16.42 in TF Privacy with it
    (``noise_multiplier / 2`` here: 16.384, from the exact RDP at fractional orders where dp-accounting's series
    is slightly above it).
    """
    n = _checks.positive_int("n", n)
    batch_size = _checks.positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than n {n}")
    sigma = _noise(noise_multiplier)
    epochs = _checks.non_negative("epochs", epochs)
    delta = check_delta(delta)
    warn_if_delta_too_large(delta, n)
    q = batch_size / n
    steps = int(math.ceil(epochs * n / batch_size))
    acc = ExactRdpAccountant(TF_PRIVACY_ORDERS)
    if steps and sigma > 0:
        acc.compose(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps))
        eps, order = acc.get_epsilon_and_optimal_order(delta)
        basic = float(np.min(acc._rdp + math.log(1.0 / delta) / (np.asarray(acc._orders) - 1.0)))
    elif steps:
        eps, order, basic = math.inf, float("nan"), math.inf
    else:
        eps, order, basic = 0.0, float("nan"), 0.0
    epochs_int = int(math.ceil(epochs))
    once = ExactRdpAccountant(TF_PRIVACY_ORDERS)
    if epochs_int and sigma > 0:
        once.compose(dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(sigma), epochs_int))
        eps_once = float(once.get_epsilon(delta))
    else:
        eps_once = math.inf if (epochs_int and sigma == 0) else 0.0
    lines = [
        f"DP-SGD with sampling rate = {100 * q:.3g}% and noise_multiplier = {sigma:g} iterated over {steps} "
        f"steps satisfies differential privacy with eps = {eps:.3g} and delta = {delta:g}.",
        f"The optimal RDP order is {order:g}.",
    ]
    if steps and sigma > 0 and order in (min(TF_PRIVACY_ORDERS), max(TF_PRIVACY_ORDERS)):
        lines.append("The privacy estimate is likely to be improved by expanding the set of orders.")
    lines += [
        "This holds for example-level privacy with the add-or-remove-one relation, for Poisson sampling (each "
        f"example joins each batch independently with probability {q:.3g}), and protects every checkpoint, not "
        "only the final model.",
        "If batches were shuffled fixed-size batches instead of Poisson-sampled, the epsilon above is not "
        "proven to hold, and it can be optimistic (Chua et al. 2024, 'How private are DP-SGD "
        "implementations?'). What holds without amplification by sampling (each example used once per epoch, "
        f"in any order) is eps = {eps_once:.3g} for {epochs_int} epochs at the same delta. jaxdp accounts "
        "shuffled batches only as sampling without replacement under the replace-one relation "
        "(Accountant('rdp', neighboring_relation='replace_one')).",
    ]
    return DpSgdPrivacy(epsilon=float(eps), order=float(order), steps=steps, sample_rate=q, delta=delta,
                        epsilon_basic_conversion=float(basic), epsilon_once_per_epoch=eps_once,
                        statement="\n".join(lines))


__all__ = [
    "ACCOUNTANTS", "NEIGHBORING_RELATIONS", "SAMPLINGS", "Accountant", "DeltaWarning", "DpSgdPrivacy",
    "PRVPrivacyAccountant", "calibrate_noise_multiplier", "check_delta", "check_epsilon", "compose_events",
    "compute_dp_sgd_privacy", "compute_epsilon", "events_delta", "events_epsilon", "make_dp_accountant",
    "merge_events", "steps_for_epochs", "to_dp_event", "validate_event", "warn_if_delta_too_large",
    "CYCLIC_MECHANISMS", "FIXED_ORDER_MECHANISMS", "cyclic_participations", "Event", "RELATIONS",
]
