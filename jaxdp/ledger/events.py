"""Mechanism events as the ledger records them, their composition, and what would still fit a budget.

An *event* is one mechanism run on a dataset: a :class:`jaxdp.accounting.Event`, stored in its wire format
(:meth:`~jaxdp.accounting.Event.to_dict`), e.g.::

    {"sampling": "poisson", "noise_multiplier": s, "sample_rate": q, "steps": T, "l2_clip_norm": C}

(the other samplings are listed in :mod:`jaxdp.accounting.event`). ``l2_clip_norm`` is for the record only:
the privacy guarantee is a function of the noise multiplier, the clip norm only scales the noise. The privacy
unit is one example of the dataset. The Event type validates each event; the ledger adds only its own limits
on what one reservation may cost to compose (:data:`MAX_STEPS`, :data:`MAX_NOISE_MULTIPLIER`,
:data:`MAX_EVENTS`).

Composing all events charged to a dataset with the dataset's accountant gives the *spent* epsilon at the
dataset's delta; the plain sum of each run's epsilon (basic composition, valid but loose) is shown beside it.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any
from collections.abc import Iterable

from jaxdp.accounting.event import SAMPLINGS, Event, merge  # noqa: F401  (SAMPLINGS: re-export)

# Bounds on what one event may ask for. Composing 10^7 PRV steps takes tens of seconds and 10^9 minutes (10^18
# exhausts memory); a noise multiplier of 10^6 already gives epsilon 0 to printing precision (10^300 overflows
# the accountants). Larger requests are refused with this explanation instead of hanging or crashing.
MAX_STEPS = 10_000_000
MAX_NOISE_MULTIPLIER = 1e6
MAX_EVENTS = 1000


def normalize_events(events: Any) -> list[dict]:
    """Validate events (:meth:`jaxdp.accounting.Event.from_dict`) within the ledger's cost limits and return
    their canonical wire format (ints as int, floats as float, unknown keys refused).

    Raises ``ValueError`` naming the event and the key that is missing or out of range.
    """
    if isinstance(events, (dict, Event)):
        events = [events]
    if not isinstance(events, (list, tuple)) or not events:
        raise ValueError("events must be a non-empty list of event dicts, e.g. "
                         '[{"sampling": "poisson", "noise_multiplier": 1.1, "sample_rate": 0.004, "steps": 1000}]')
    if len(events) > MAX_EVENTS:
        raise ValueError(f"{len(events)} events: at most {MAX_EVENTS} per run")
    out = []
    for i, ev in enumerate(events):
        if not isinstance(ev, (dict, Event)):
            raise ValueError(f"event {i} must be a dict, got {type(ev).__name__}")
        try:
            e = Event.coerce(ev)
        except ValueError as err:
            raise ValueError(f"event {i}: {err}") from None
        if e.steps > MAX_STEPS:
            raise ValueError(f"event {i}: steps {e.steps} is more than the ledger accounts ({MAX_STEPS}); "
                             "a run this long cannot be composed in bounded time -- split it, or check "
                             "the number (epochs / sample rate?)")
        if e.noise_multiplier is not None and e.noise_multiplier > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"event {i}: noise_multiplier {e.noise_multiplier!r} is above {MAX_NOISE_MULTIPLIER:g}, "
                             "where epsilon is already 0 to printing precision; use at most "
                             f"{MAX_NOISE_MULTIPLIER:g}")
        out.append(e.to_dict())
    return out


def canonical(obj: Any) -> str:
    """Canonical JSON text (sorted keys, no spaces): the form that is hashed and cached."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def is_private(events: Iterable[dict]) -> bool:
    """False when any event with steps > 0 is non-private (``sampling == "none"`` or noise multiplier 0)."""
    return not any(e.steps > 0 and not e.private for e in map(Event.coerce, events))


def _accountant_events(events: list[dict]) -> list[Event]:
    """Events as the accountant sees them: record-only keys dropped, and a cyclic-Poisson run (T consecutive
    steps, b groups) as its equivalent Poisson event (rate p, ceil(T/b) steps) HERE, before the runs merge: two
    runs each restart their cycle, so their participations add (ceil(T1/b) + ceil(T2/b)), not their steps."""
    return [e.accounted().equivalent_poisson() for e in map(Event.coerce, events) if e.steps > 0]


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(events_json: str, delta: float, accountant: str, relation: str) -> float:
    events = json.loads(events_json)
    if not events:
        return 0.0
    if not is_private(events):
        return math.inf
    from jaxdp.accounting import events_epsilon  # RDP / PLD / PRV on dp-accounting
    try:
        return float(events_epsilon(events, delta, accountant=accountant, neighboring_relation=relation))
    except (OverflowError, MemoryError, RecursionError, FloatingPointError, ZeroDivisionError) as e:
        raise ValueError(f"the {accountant} accountant cannot compose these events ({type(e).__name__}: {e}); "
                         "nothing was recorded") from None


def compose(events: list[dict], delta: float, accountant: str = "prv",
            neighboring_relation: str = "add_remove") -> float:
    """Epsilon at ``delta`` of all ``events`` composed with ``accountant`` (cached; 0 for no steps; inf if
    any event with steps is non-private). Events must be normalized (:func:`normalize_events`)."""
    merged = [e.to_dict() for e in merge(_accountant_events(events), canonical_order=True)]
    return _cached_epsilon(canonical(merged), float(delta), accountant, neighboring_relation)


def total_steps(events: list[dict]) -> int:
    return sum(e["steps"] for e in events)


def epochs_of(event: dict) -> float | None:
    """Passes over the data that ``event``'s steps amount to (:attr:`jaxdp.accounting.Event.epochs`)."""
    return Event.coerce(event).epochs


def suggest(prior: list[dict], planned: list[dict], max_epsilon: float, delta: float, accountant: str,
            relation: str) -> dict:
    """What would fit in the budget next to ``prior`` events: the planned run with fewer steps (same sigma),
    or with a larger noise multiplier (same steps). Both by bisection on the composed epsilon.

    Returns ``{"max_steps": [...per planned event], "max_epochs": [...], "fraction_of_steps": f,
    "min_noise_multiplier": [...per event] or None}``; ``max_steps`` all 0 when nothing fits.
    """
    def eps_with(events):
        return compose(prior + events, delta, accountant, relation)

    out: dict[str, Any] = {}
    if compose(prior, delta, accountant, relation) >= max_epsilon or not is_private(planned):
        out.update(max_steps=[0] * len(planned), max_epochs=[0.0] * len(planned), fraction_of_steps=0.0,
                   min_noise_multiplier=None)
        return out

    def scaled_steps(frac):
        return [dict(e, steps=int(math.floor(e["steps"] * frac))) for e in planned]

    lo, hi = 0.0, 1.0  # eps_with(scaled_steps(lo)) fits; hi does not (that is why we are here)
    for _ in range(30):
        mid = (lo + hi) / 2
        if eps_with(scaled_steps(mid)) <= max_epsilon:
            lo = mid
        else:
            hi = mid
        if all(math.floor(e["steps"] * lo) == math.floor(e["steps"] * hi) for e in planned):
            break
    fit = scaled_steps(lo)
    out["max_steps"] = [e["steps"] for e in fit]
    out["max_epochs"] = [None if (epochs := epochs_of(e)) is None else round(epochs, 4) for e in fit]
    out["fraction_of_steps"] = round(lo, 4)

    def scaled_sigma(f):
        return [dict(e, noise_multiplier=e["noise_multiplier"] * f) if "noise_multiplier" in e else e
                for e in planned]

    lo_f, hi_f = 1.0, 2.0
    while eps_with(scaled_sigma(hi_f)) > max_epsilon and hi_f < 1e4:
        lo_f, hi_f = hi_f, hi_f * 2
    if eps_with(scaled_sigma(hi_f)) > max_epsilon:
        out["min_noise_multiplier"] = None
    else:
        for _ in range(40):
            mid = (lo_f + hi_f) / 2
            if eps_with(scaled_sigma(mid)) <= max_epsilon:
                hi_f = mid
            else:
                lo_f = mid
            if hi_f / lo_f < 1 + 1e-3:
                break
        out["min_noise_multiplier"] = [None if "noise_multiplier" not in e else
                                       math.ceil(e["noise_multiplier"] * 1e4) / 1e4 for e in scaled_sigma(hi_f)]
    return out
