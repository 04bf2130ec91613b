"""One description of a mechanism run on a dataset: :class:`Event`, and the vocabulary it is written in.

An event is "``steps`` steps of a Gaussian mechanism with noise multiplier ``sigma`` on batches drawn by a
sampling scheme". Noise std is ``sigma * C`` on a sum of per-example gradients clipped to norm ``C`` (the
sensitivity), so the privacy guarantee depends on ``sigma``, the sampling and the steps -- never on ``C``, which
an event may carry for the record only (``l2_clip_norm``). The privacy unit is one example of the dataset.

Every part of jaxdp that describes a mechanism builds an :class:`Event`: the samplers (``sampler.event(...)``),
the engine, the :class:`~jaxdp.accounting.Accountant`, the budget ledger, the report and the CLIs. Its wire
format (:meth:`Event.to_dict` / :meth:`Event.from_dict`) is the JSON the ledger and the accountant's
checkpoints store::

    {"sampling": "poisson", "noise_multiplier": s, "sample_rate": q, "steps": T}
    {"sampling": "shuffle", "noise_multiplier": s, "batch_size": b, "dataset_size": n, "steps": T}
    {"sampling": "truncated_poisson", "noise_multiplier": s, "sample_rate": q, "max_batch_size": m,
     "dataset_size": n, "steps": T}
    {"sampling": "cyclic_poisson", "mechanism": "bandmf" | "dpsgd", "bands": b, "noise_multiplier": s,
     "sample_rate": p, "steps": T}
    {"sampling": "fixed_order", "mechanism": "blt" | "dpsgd", "min_separation": b, "horizon": H,
     "noise_multiplier": s, "steps": T}
    {"sampling": "none", "steps": T}                      # steps without noise: epsilon is infinite

each optionally with ``"l2_clip_norm": C`` (recorded, never accounted).

``poisson``
    each example joins each batch independently with probability ``q`` (Abadi et al. 2016).
``shuffle``
    fixed-size batches of ``b`` drawn without replacement from ``n`` examples; analysed only under the
    replace-one relation (Wang, Balle, Kasiviswanathan 2019), by the RDP accountant.
``truncated_poisson``
    Poisson sampling whose batch is cut to a uniformly random subset of ``m`` examples when larger.
``cyclic_poisson``
    the data split once into ``b`` groups, step ``t`` Poisson-samples group ``t mod b`` at rate ``p``, with
    b-banded matrix-factorization noise (``"bandmf"``) or independent noise (``"dpsgd"``). ``T`` CONSECUTIVE
    steps of one cyclic schedule are accounted as DP-SGD with rate ``p`` and ``ceil(T / b)`` steps
    (Choquette-Choo et al. 2023, Theorem 4; :meth:`Event.equivalent_poisson`). Two runs each restart their
    cycle, so their events never merge (:func:`merge`).
``fixed_order``
    one secret permutation split into ``b`` batches, the same order every epoch (``FixedOrderSampler``): every
    example takes part at most ``ceil(T / b)`` times in ``T`` steps, ``b`` steps apart (min-separation ``b``),
    with no amplification by sampling. With BLT noise (``"blt"``, :mod:`jaxdp.blt`) the noise is scaled to the
    sensitivity of the whole schema of ``H`` planned steps, so ``T <= H`` steps are ONE Gaussian mechanism with
    noise multiplier ``s`` (McKenna et al. 2024, zero-out relation); with independent noise (``"dpsgd"``) they
    are ``ceil(T / b)`` Gaussian mechanisms (:meth:`Event.equivalent_poisson`: Poisson with rate 1). Steps past
    the horizon (``T > H``) are covered by no analysis and refused, as is the replace-one relation (it doubles
    the sensitivity the noise was scaled to). Each run is its own schema: events of two runs never merge.
``none``
    steps that touched the data without noise.

To add a sampling scheme: give it a :class:`SamplingSpec` in :data:`SAMPLING_SPECS` (its wire fields, the
mechanisms it allows, whether its steps count within one schedule), an :class:`Event` field for any new key
(with its kind in ``_KINDS``), and its branches in :meth:`Event.to_dp_event` and :meth:`Event.refusal`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import KW_ONLY, dataclass
from typing import Any
from collections.abc import Iterable, Mapping

import numpy as np

from jaxdp._checks import present as _present  # fields an event's sampling requires (__post_init__ checks them)

#: The accountants (``jaxdp.accounting.make_dp_accountant``): Renyi DP, privacy loss distributions, and
#: Opacus's PRV upper bound (the default everywhere).
ACCOUNTANTS = ("rdp", "pld", "prv")
#: Neighbouring relations a guarantee can be about: add or remove one example (the default), or replace one.
RELATIONS = ("add_remove", "replace_one")
#: How a model card or a plot names each relation.
RELATION_LABELS = {"add_remove": "add/remove-one", "replace_one": "replace-one"}
#: Noise mechanisms a cyclic-Poisson event may name (both accounted by the same theorem).
CYCLIC_MECHANISMS = ("bandmf", "dpsgd")
#: Noise mechanisms a fixed-order event may name: BLT (one Gaussian mechanism) or independent noise.
FIXED_ORDER_MECHANISMS = ("blt", "dpsgd")
#: Keys an event may carry for the record only; the accountant never sees them.
RECORD_ONLY = ("l2_clip_norm",)


@dataclass(frozen=True)
class SamplingSpec:
    """What an event of one sampling scheme holds.

    Attributes:
      fields: its wire keys besides ``"sampling"``, all required, in wire order (``"steps"`` last).
      mechanisms: the values its ``"mechanism"`` key may take (when ``"mechanism"`` is one of its fields).
      one_schedule: its steps count within ONE schedule (a cycle that restarts with every run), so events of
        two runs never merge; consecutive steps of one run do (:func:`merge` with ``one_run=True``).
    """

    fields: tuple[str, ...]
    mechanisms: tuple[str, ...] = ()
    one_schedule: bool = False


#: Every sampling scheme an event may name, with its fields. The single source of ``SAMPLINGS`` and ``FIELDS``.
SAMPLING_SPECS: dict[str, SamplingSpec] = {
    "poisson": SamplingSpec(("noise_multiplier", "sample_rate", "steps")),
    "shuffle": SamplingSpec(("noise_multiplier", "batch_size", "dataset_size", "steps")),
    "truncated_poisson": SamplingSpec(("noise_multiplier", "sample_rate", "max_batch_size", "dataset_size", "steps")),
    "cyclic_poisson": SamplingSpec(("mechanism", "bands", "noise_multiplier", "sample_rate", "steps"),
                                   mechanisms=CYCLIC_MECHANISMS, one_schedule=True),
    "fixed_order": SamplingSpec(("mechanism", "min_separation", "horizon", "noise_multiplier", "steps"),
                                mechanisms=FIXED_ORDER_MECHANISMS, one_schedule=True),
    "none": SamplingSpec(("steps",)),
}
#: The sampling schemes, in the order error messages list them.
SAMPLINGS = tuple(SAMPLING_SPECS)
#: The required wire keys of each sampling scheme (besides ``"sampling"``).
FIELDS = {name: spec.fields for name, spec in SAMPLING_SPECS.items()}

# What each field holds: "count" an int >= 0, "size" an int >= 1, "noise" a finite float >= 0, "rate" a float in
# (0, 1], "positive" a finite float > 0, "mechanism" one of the sampling's mechanisms.
_KINDS = {"steps": "count", "batch_size": "size", "dataset_size": "size", "max_batch_size": "size",
          "bands": "size", "min_separation": "size", "horizon": "size", "noise_multiplier": "noise",
          "sample_rate": "rate", "mechanism": "mechanism", "l2_clip_norm": "positive"}


def _integer(name: str, value: Any, low: int) -> int:
    """An int (a float only when it is integral, e.g. ``10.0`` read from JSON) that is at least ``low``."""
    ok = isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating))
                                                  and math.isfinite(value) and float(value).is_integer())
    if isinstance(value, (bool, np.bool_)) or not ok or int(value) < low:
        what = "a non-negative integer" if low == 0 else "a positive integer"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _number(name: str, value: Any, kind: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    f = float(value)
    if kind == "rate":
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1] (the probability that an example is in a batch), got "
                             f"{value!r}; use sample_rate = expected_batch_size / dataset_size")
    elif not math.isfinite(f) or (f < 0 if kind == "noise" else f <= 0):
        raise ValueError(f"{name} must be a finite number {'>=' if kind == 'noise' else '>'} 0, got {value!r}")
    return f


@dataclass(frozen=True)
class Event:
    """``steps`` steps of one Gaussian mechanism on batches of one sampling scheme: frozen and validated.

    Build it with the fields of its sampling (:data:`FIELDS`), from the wire format (:meth:`from_dict`), from
    a sampler's parameters (:meth:`from_mechanism`) or from the sampler itself (``sampler.event(sigma, steps)``).
    Numbers are normalised (ints as ``int``, floats as ``float``), so equal mechanisms compare and hash equal.

    Raises:
      ValueError: an unknown sampling, a missing field, a field the sampling does not have, or a value out of
        range (the message names the field and what it must be).

    >>> e = Event("poisson", noise_multiplier=1.1, sample_rate=0.004, steps=250)
    >>> e.to_dict()
    {'sampling': 'poisson', 'noise_multiplier': 1.1, 'sample_rate': 0.004, 'steps': 250}
    >>> Event.from_dict(e.to_dict()) == e
    True
    >>> cyc = Event("cyclic_poisson", mechanism="bandmf", bands=4, noise_multiplier=2.0, sample_rate=0.02,
    ...             steps=103)
    >>> cyc.equivalent_poisson().to_dict()    # Choquette-Choo et al. 2023: ceil(103 / 4) participations
    {'sampling': 'poisson', 'noise_multiplier': 2.0, 'sample_rate': 0.02, 'steps': 26}
    >>> Event("poisson", noise_multiplier=1.1, steps=250)
    Traceback (most recent call last):
    ...
    ValueError: a 'poisson' event needs noise_multiplier, sample_rate, steps; missing ['sample_rate']
    """

    sampling: str
    _: KW_ONLY
    steps: int
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    batch_size: int | None = None
    dataset_size: int | None = None
    max_batch_size: int | None = None
    mechanism: str | None = None
    bands: int | None = None
    min_separation: int | None = None
    horizon: int | None = None
    l2_clip_norm: float | None = None

    def __post_init__(self) -> None:
        spec = SAMPLING_SPECS.get(self.sampling) if isinstance(self.sampling, str) else None
        if spec is None:
            raise ValueError(f"event sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        missing = [k for k in spec.fields if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.sampling!r} event needs {', '.join(spec.fields)}; missing {missing}")
        extra = sorted(k for k in _KINDS if k not in spec.fields and k not in RECORD_ONLY
                       and getattr(self, k) is not None)
        if extra:
            raise ValueError(f"a {self.sampling!r} event has keys sampling, {', '.join(spec.fields)}; unknown keys "
                             f"{extra}")
        for k in (*spec.fields, *RECORD_ONLY):
            v = getattr(self, k)
            if v is None:
                continue
            kind = _KINDS[k]
            if kind == "mechanism":
                if v not in spec.mechanisms:
                    raise ValueError(f"a {self.sampling} event's mechanism must be one of {spec.mechanisms}, got "
                                     f"{v!r}")
                v = str(v)
            elif kind in ("count", "size"):
                v = _integer(k, v, 0 if kind == "count" else 1)
            else:
                v = _number(k, v, kind)
            object.__setattr__(self, k, v)
        for size in ("batch_size", "max_batch_size"):
            if (size in spec.fields and "dataset_size" in spec.fields
                    and getattr(self, size) > _present(self.dataset_size)):
                raise ValueError(f"{size} {getattr(self, size)} is larger than dataset_size {self.dataset_size}")
        if self.sampling == "fixed_order" and self.steps > _present(self.horizon):
            raise ValueError(f"a fixed_order event of {self.steps} steps exceeds its planned horizon of "
                             f"{self.horizon} steps: the noise was scaled for ceil(horizon / min_separation) "
                             "participations, and later steps are not covered by any analysis. Stop at the horizon "
                             "(the engine does), or plan a longer run (more epochs) from the start")

    # -- wire format -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON-able wire format: ``sampling``, the sampling's fields in order, then any record-only key."""
        out: dict[str, Any] = {"sampling": self.sampling}
        out.update((k, getattr(self, k)) for k in FIELDS[self.sampling])
        out.update((k, getattr(self, k)) for k in RECORD_ONLY if getattr(self, k) is not None)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        """The event of a wire-format dict (a ``None`` value counts as absent).

        Raises:
          TypeError: ``d`` is not a mapping.
          ValueError: as the constructor, and for a key no event of its sampling has.
        """
        if isinstance(d, Event):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"an accounting event must be a dict, got {type(d).__name__}")
        sampling = d.get("sampling")
        spec = SAMPLING_SPECS.get(sampling) if isinstance(sampling, str) else None
        if spec is None:
            raise ValueError(f"event sampling must be one of {SAMPLINGS}, got {sampling!r} in {dict(d)!r}")
        allowed = {"sampling", *spec.fields, *RECORD_ONLY}
        unknown = sorted(str(k) for k in d if k not in allowed)
        if unknown:
            raise ValueError(f"a {sampling!r} event has keys sampling, {', '.join(spec.fields)} (and, for the "
                             f"record, {', '.join(RECORD_ONLY)}); unknown keys {unknown} in {dict(d)!r}")
        missing = [k for k in spec.fields if d.get(k) is None]
        if missing:
            raise ValueError(f"a {sampling!r} event needs {', '.join(spec.fields)}; missing {missing} in {dict(d)!r}")
        return cls(**{k: v for k, v in d.items() if v is not None})

    @classmethod
    def coerce(cls, event: Event | Mapping[str, Any]) -> Event:
        """``event`` itself if it is an :class:`Event`, else :meth:`from_dict` of it."""
        return event if isinstance(event, Event) else cls.from_dict(event)

    @classmethod
    def from_mechanism(cls, noise_multiplier: float | None, sample_rate: float | None = None, steps: int = 1, *,
                       sampling: str = "poisson", dataset_size: int | None = None, batch_size: int | None = None,
                       max_batch_size: int | None = None, bands: int | None = None, mechanism: str = "dpsgd",
                       min_separation: int | None = None, horizon: int | None = None,
                       l2_clip_norm: float | None = None) -> Event:
        """The event of ``steps`` steps of a sampler's mechanism, from its parameters.

        Keeps only the parameters ``sampling`` uses (so a caller may pass all it knows): ``"poisson"`` needs
        ``sample_rate``; ``"shuffle"`` needs ``dataset_size`` and ``batch_size`` (default
        ``round(sample_rate * dataset_size)``); ``"truncated_poisson"`` needs ``sample_rate``, ``max_batch_size``
        and ``dataset_size``; ``"cyclic_poisson"`` needs ``sample_rate``, ``bands`` and ``mechanism``;
        ``"fixed_order"`` needs ``mechanism``, ``min_separation`` and ``horizon``; ``"none"`` only ``steps``.

        >>> Event.from_mechanism(1.0, 0.05, 100, sampling="shuffle", dataset_size=1000).to_dict()
        {'sampling': 'shuffle', 'noise_multiplier': 1.0, 'batch_size': 50, 'dataset_size': 1000, 'steps': 100}
        """
        if sampling == "shuffle" and batch_size is None and sample_rate is not None and dataset_size is not None:
            batch_size = int(round(sample_rate * dataset_size))
        given: dict[str, Any] = {"steps": steps, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                 "batch_size": batch_size, "dataset_size": dataset_size, "max_batch_size": max_batch_size,
                 "bands": bands, "mechanism": mechanism, "min_separation": min_separation, "horizon": horizon}
        if sampling not in SAMPLING_SPECS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        return cls(sampling, **{k: given[k] for k in FIELDS[sampling]}, l2_clip_norm=l2_clip_norm)

    # -- derived views -----------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> Event:
        """A copy with ``changes`` (validated again), e.g. ``event.replace(steps=10)``."""
        return dataclasses.replace(self, **changes)

    def accounted(self) -> Event:
        """The event as an accountant sees it: without its record-only keys (``l2_clip_norm``)."""
        if all(getattr(self, k) is None for k in RECORD_ONLY):
            return self
        return self.replace(**{k: None for k in RECORD_ONLY})

    @property
    def private(self) -> bool:
        """Whether its steps add noise (``sampling != "none"`` and ``noise_multiplier > 0``)."""
        return self.sampling != "none" and bool(self.noise_multiplier)

    @property
    def epochs(self) -> float | None:
        """Passes over the data its steps amount to (``steps * q``, ``steps * p / b`` or ``steps * b / n``)."""
        if self.sampling in ("poisson", "truncated_poisson"):
            return self.steps * _present(self.sample_rate)
        if self.sampling == "cyclic_poisson":
            return self.steps * _present(self.sample_rate) / _present(self.bands)
        if self.sampling == "shuffle":
            return self.steps * _present(self.batch_size) / _present(self.dataset_size)
        if self.sampling == "fixed_order":
            return self.steps / _present(self.min_separation)
        return None

    def same_mechanism(self, other: Event) -> bool:
        """Equal in everything but ``steps``: ``T1`` steps then ``T2`` steps are ``T1 + T2`` steps of it."""
        return self.replace(steps=0) == other.replace(steps=0)

    def equivalent_poisson(self) -> Event:
        """The event an accountant composes in its place: a cyclic-Poisson run of ``T`` consecutive steps over
        ``b`` groups is DP-SGD with rate ``p`` and ``ceil(T / b)`` steps (Choquette-Choo et al. 2023, Theorem 4);
        a fixed-order run of ``T <= H`` steps is ONE Gaussian mechanism with BLT noise and ``ceil(T / b)`` with
        independent noise (Poisson with rate 1: no amplification); every other event is itself. Apply it per
        run, BEFORE merging runs (:func:`merge`).

        >>> Event("fixed_order", mechanism="blt", min_separation=10, horizon=30, noise_multiplier=3.0,
        ...       steps=30).equivalent_poisson().to_dict()
        {'sampling': 'poisson', 'noise_multiplier': 3.0, 'sample_rate': 1.0, 'steps': 1}
        """
        if self.sampling == "fixed_order":
            separation = _present(self.min_separation)
            gaussians = min(1, self.steps) if self.mechanism == "blt" else -(-self.steps // separation)
            return Event("poisson", noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=gaussians,
                         l2_clip_norm=self.l2_clip_norm)
        if self.sampling != "cyclic_poisson":
            return self
        return Event("poisson", noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                     steps=-(-self.steps // _present(self.bands)), l2_clip_norm=self.l2_clip_norm)

    def refusal(self, accountant: str, relation: str) -> str | None:
        """Why ``accountant`` cannot account this event under ``relation`` (``None`` if it can). An accountant
        that lacks an analysis refuses rather than account the event as something else (privacy rule 5)."""
        s = self.sampling
        if s == "shuffle":
            if accountant != "rdp":
                return (f"the {accountant!r} accountant cannot account fixed-size batches sampled without "
                        "replacement ('shuffle' events): dp-accounting has no PLD for that sampling, and accounting "
                        "them as Poisson would understate epsilon. Use Accountant('rdp', "
                        "neighboring_relation='replace_one'), or train with Poisson sampling (PoissonSampler).")
            if relation != "replace_one":
                return ("fixed-size batches sampled without replacement ('shuffle' events) only have an analysis "
                        "under the replace-one relation (Wang, Balle, Kasiviswanathan 2019); create the accountant "
                        "with neighboring_relation='replace_one' (its epsilon is not comparable with add/remove "
                        "epsilons), or train with Poisson sampling.")
        if s == "fixed_order" and relation != "add_remove":
            return ("a fixed-order run (BLT or independent noise over a fixed batch order) is analysed under the "
                    "zero-out relation, i.e. add/remove one example with a fixed participation schema; replacing an "
                    "example changes the released sum by up to 2 C, which the noise was not scaled for. Use "
                    "neighboring_relation='add_remove'.")
        if s == "truncated_poisson" and accountant == "rdp":
            return ("the 'rdp' accountant has no analysis of truncated Poisson sampling (batches cut to "
                    "max_batch_size); use accountant='pld' or 'prv' (dp-accounting's truncated subsampled Gaussian "
                    "PLD), or sample without truncation.")
        if s in ("poisson", "cyclic_poisson") and relation == "replace_one" and accountant == "rdp":
            return ("the RDP analysis of Poisson sampling (Mironov, Talwar, Zhang 2019) is for the add/remove "
                    "relation only; use "
                    "neighboring_relation='add_remove' (the default) or accountant='pld'/'prv'.")
        return None

    def to_dp_event(self) -> Any:
        """The ``dp_accounting`` event: the step's mechanism self-composed ``steps`` times (``noise_multiplier
        0`` is a non-private event, whatever the sampling)."""
        from dp_accounting import dp_event as dpe   # imported here: describing a mechanism needs no accountant
        e = self.equivalent_poisson()
        if e.sampling == "none" or e.noise_multiplier == 0.0:
            inner: Any = dpe.NonPrivateDpEvent()
        elif e.sampling == "poisson":
            gauss = dpe.GaussianDpEvent(e.noise_multiplier)
            inner = gauss if e.sample_rate == 1.0 else dpe.PoissonSampledDpEvent(e.sample_rate, gauss)
        elif e.sampling == "shuffle":
            # dp-accounting's RDP for sampling without replacement (Wang, Balle, Kasiviswanathan 2019) takes the
            # noise relative to the REPLACE-ONE sensitivity of the released sum. Replacing one example moves a sum
            # of gradients clipped to norm C by up to 2C, so the noise std sigma*C is (sigma/2) times that
            # sensitivity. (Its PLD, by contrast, models replace-one as the shift from +C to -C itself.)
            inner = dpe.SampledWithoutReplacementDpEvent(e.dataset_size, e.batch_size,
                                                         dpe.GaussianDpEvent(_present(e.noise_multiplier) / 2.0))
        else:
            inner = dpe.TruncatedSubsampledGaussianDpEvent(
                dataset_size=e.dataset_size, sampling_probability=e.sample_rate,
                truncated_batch_size=e.max_batch_size, noise_multiplier=e.noise_multiplier)
        return dpe.SelfComposedDpEvent(inner, e.steps)

    def __repr__(self) -> str:
        return "Event(" + ", ".join([repr(self.sampling)] + [f"{k}={v!r}" for k, v in self.to_dict().items()
                                                             if k != "sampling"]) + ")"


def _canonical(event: Event) -> str:
    return json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":"))


def merge(events: Iterable[Event | Mapping[str, Any]], *, one_run: bool = False,
          canonical_order: bool = False) -> list[Event]:
    """Validate events, drop zero-step ones and merge those that differ only in ``steps``.

    Args:
      events: :class:`Event` s or wire-format dicts.
      one_run: the events are consecutive steps of ONE run, so consecutive one-schedule events (cyclic
        Poisson, fixed order) merge too (a fixed-order event still within its horizon: more is refused);
        otherwise each of them restarts its schedule and stays apart.
      canonical_order: merge equal mechanisms wherever they occur (composition is commutative) and sort the
        result by its canonical JSON, so the result does not depend on how the runs were split or ordered;
        otherwise only consecutive events merge and the order is kept.

    >>> a = Event("poisson", noise_multiplier=1.0, sample_rate=0.01, steps=10)
    >>> [e.steps for e in merge([a, a.replace(steps=5), a.replace(noise_multiplier=2.0), a])]
    [15, 10, 10]
    >>> [e.steps for e in merge([a, a.replace(noise_multiplier=2.0), a], canonical_order=True)]
    [20, 10]
    """
    out: list[Event] = []
    index: dict[Event, int] = {}
    for e in events:
        e = Event.coerce(e)
        if e.steps == 0:
            continue
        mergeable = one_run or not SAMPLING_SPECS[e.sampling].one_schedule
        key = e.replace(steps=0)
        if canonical_order:
            at = index.get(key) if mergeable else None
        else:
            at = len(out) - 1 if out and mergeable and out[-1].same_mechanism(e) else None
        if at is None:
            if mergeable:
                index[key] = len(out)
            out.append(e)
        else:
            out[at] = out[at].replace(steps=out[at].steps + e.steps)
    return sorted(out, key=_canonical) if canonical_order else out


__all__ = ["ACCOUNTANTS", "CYCLIC_MECHANISMS", "Event", "FIELDS", "FIXED_ORDER_MECHANISMS", "RECORD_ONLY",
           "RELATIONS", "RELATION_LABELS", "SAMPLINGS", "SAMPLING_SPECS", "SamplingSpec", "merge"]
