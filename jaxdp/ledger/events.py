"""Mechanism events as the ledger records them, their composition, and what would still fit a budget.

An *event* is one mechanism run on a dataset, as a plain JSON-able dict in the format of
:func:`jaxdp.accounting.events_epsilon`::

    {"sampling": "poisson", "noise_multiplier": s, "sample_rate": q, "steps": T}
    {"sampling": "shuffle", "noise_multiplier": s, "batch_size": b, "dataset_size": n, "steps": T}
    {"sampling": "truncated_poisson", "noise_multiplier": s, "sample_rate": q, "max_batch_size": m,
     "dataset_size": n, "steps": T}
    {"sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": b, "noise_multiplier": s, "sample_rate": p,
     "steps": T}                             # BandMF / cyclic Poisson: DP-SGD with rate p, ceil(T/b) steps
    {"sampling": "fixed_order", "mechanism": "blt", "min_separation": b, "horizon": H, "noise_multiplier": s,
     "steps": T}                             # BLT over a fixed batch order: ONE Gaussian mechanism (T <= H)
    {"sampling": "none", "steps": T}          # non-private: epsilon = infinity

plus, for the record only, ``"l2_clip_norm"`` (the accountant never sees it: the privacy guarantee is a function
of the noise multiplier, the clip norm only scales the noise). The privacy unit is one example of the dataset.

Composing all events charged to a dataset with the dataset's accountant gives the *spent* epsilon at the
dataset's delta; the plain sum of each run's epsilon (basic composition, valid but loose) is shown beside it.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any, Iterable

SAMPLINGS = ("poisson", "shuffle", "truncated_poisson", "cyclic_poisson", "fixed_order", "none")
_REQUIRED = {
    "poisson": ("noise_multiplier", "sample_rate", "steps"),
    "shuffle": ("noise_multiplier", "batch_size", "dataset_size", "steps"),
    "truncated_poisson": ("noise_multiplier", "sample_rate", "max_batch_size", "dataset_size", "steps"),
    "cyclic_poisson": ("mechanism", "bands", "noise_multiplier", "sample_rate", "steps"),
    "fixed_order": ("mechanism", "min_separation", "horizon", "noise_multiplier", "steps"),
    "none": ("steps",),
}
_INT_KEYS = ("steps", "batch_size", "dataset_size", "max_batch_size", "bands", "min_separation", "horizon")
_STR_KEYS = ("mechanism",)
# Bounds on what one event may ask for. Composing 10^7 PRV steps takes tens of seconds and 10^9 minutes (10^18
# exhausts memory); a noise multiplier of 10^6 already gives epsilon 0 to printing precision (10^300 overflows
# the accountants). Larger requests are refused with this explanation instead of hanging or crashing.
MAX_STEPS = 10_000_000
MAX_NOISE_MULTIPLIER = 1e6
MAX_EVENTS = 1000
_RECORD_ONLY = ("l2_clip_norm",)


def normalize_events(events: Any) -> list[dict]:
    """Validate events and return canonical copies (ints as int, floats as float, unknown keys refused).

    Raises ``ValueError`` naming the event and the key that is missing or out of range.
    """
    if isinstance(events, dict):
        events = [events]
    if not isinstance(events, (list, tuple)) or not events:
        raise ValueError("events must be a non-empty list of event dicts, e.g. "
                         '[{"sampling": "poisson", "noise_multiplier": 1.1, "sample_rate": 0.004, "steps": 1000}]')
    if len(events) > MAX_EVENTS:
        raise ValueError(f"{len(events)} events: at most {MAX_EVENTS} per run")
    out = []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise ValueError(f"event {i} must be a dict, got {type(ev).__name__}")
        sampling = ev.get("sampling")
        if sampling not in SAMPLINGS:
            raise ValueError(f"event {i}: sampling must be one of {SAMPLINGS}, got {sampling!r}")
        allowed = set(_REQUIRED[sampling]) | {"sampling", *_RECORD_ONLY}
        missing = [k for k in _REQUIRED[sampling] if ev.get(k) is None]
        if missing:
            raise ValueError(f"event {i} ({sampling}): missing {missing}; a {sampling} event needs "
                             f"{list(_REQUIRED[sampling])}")
        unknown = sorted(set(ev) - allowed)
        if unknown:
            raise ValueError(f"event {i} ({sampling}): unknown keys {unknown}; allowed: {sorted(allowed)}")
        clean: dict[str, Any] = {"sampling": sampling}
        for k in sorted(allowed - {"sampling"}):
            if ev.get(k) is None:
                continue
            v = ev[k]
            if k in _STR_KEYS:
                from jaxdp.accounting.core import CYCLIC_MECHANISMS, FIXED_ORDER_MECHANISMS
                names = FIXED_ORDER_MECHANISMS if sampling == "fixed_order" else CYCLIC_MECHANISMS
                if v not in names:
                    raise ValueError(f"event {i}: {k} must be one of {names}, got {v!r}")
                clean[k] = str(v)
            elif k in _INT_KEYS:
                if isinstance(v, bool) or not float(v).is_integer() or int(v) < (0 if k == "steps" else 1):
                    raise ValueError(f"event {i}: {k} must be an integer >= {0 if k == 'steps' else 1}, got {v!r}")
                if k == "steps" and int(v) > MAX_STEPS:
                    raise ValueError(f"event {i}: steps {int(v)} is more than the ledger accounts ({MAX_STEPS}); "
                                     "a run this long cannot be composed in bounded time -- split it, or check "
                                     "the number (epochs / sample rate?)")
                clean[k] = int(v)
            else:
                try:
                    f = float(v)
                except (TypeError, ValueError):
                    raise ValueError(f"event {i}: {k} must be a number, got {v!r}") from None
                low_ok = f >= 0 if k == "noise_multiplier" else f > 0  # sigma = 0: no noise (non-private)
                if not math.isfinite(f) or not low_ok:
                    raise ValueError(f"event {i}: {k} must be a finite number {'>=' if k == 'noise_multiplier' else '>'}"
                                     f" 0, got {v!r}")
                if k == "sample_rate" and f > 1:
                    raise ValueError(f"event {i}: sample_rate must lie in (0, 1], got {v!r}")
                if k == "noise_multiplier" and f > MAX_NOISE_MULTIPLIER:
                    raise ValueError(f"event {i}: noise_multiplier {v!r} is above {MAX_NOISE_MULTIPLIER:g}, where "
                                     "epsilon is already 0 to printing precision; use at most "
                                     f"{MAX_NOISE_MULTIPLIER:g}")
                clean[k] = f
        if sampling in ("shuffle", "truncated_poisson"):
            size_key = "batch_size" if sampling == "shuffle" else "max_batch_size"
            if clean[size_key] > clean["dataset_size"]:
                raise ValueError(f"event {i}: {size_key} {clean[size_key]} exceeds dataset_size {clean['dataset_size']}")
        if sampling == "fixed_order" and clean["steps"] > clean["horizon"]:
            raise ValueError(f"event {i}: {clean['steps']} steps exceed the planned horizon of {clean['horizon']} "
                             "steps (the noise of a fixed-order run covers only its horizon)")
        out.append(clean)
    return out


def canonical(obj: Any) -> str:
    """Canonical JSON text (sorted keys, no spaces): the form that is hashed and cached."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def is_private(events: Iterable[dict]) -> bool:
    """False when any event with steps > 0 is non-private (``sampling == "none"`` or noise multiplier 0)."""
    return not any(e["steps"] > 0 and (e["sampling"] == "none" or e.get("noise_multiplier") == 0)
                   for e in events)


def _accountant_events(events: list[dict]) -> list[dict]:
    """Events as the accountant sees them. A cyclic-Poisson run (T consecutive steps, b groups) becomes its
    equivalent Poisson event (rate p, ceil(T/b) steps) HERE, before :func:`_merge` adds up steps: two runs each
    restart their cycle, so their participations add (ceil(T1/b) + ceil(T2/b)), not their steps."""
    out = []
    for e in events:
        if e["steps"] <= 0:
            continue
        e = {k: v for k, v in e.items() if k not in _RECORD_ONLY}
        if e["sampling"] == "cyclic_poisson":
            e = {"sampling": "poisson", "noise_multiplier": e["noise_multiplier"], "sample_rate": e["sample_rate"],
                 "steps": -(-e["steps"] // e["bands"])}
        elif e["sampling"] == "fixed_order":   # BLT: one Gaussian per run; independent noise: one per participation
            e = {"sampling": "poisson", "noise_multiplier": e["noise_multiplier"], "sample_rate": 1.0,
                 "steps": 1 if e["mechanism"] == "blt" else -(-e["steps"] // e["min_separation"])}
        out.append(e)
    return out


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
    merged = _merge(_accountant_events(events))
    return _cached_epsilon(canonical(merged), float(delta), accountant, neighboring_relation)


def _merge(events: list[dict]) -> list[dict]:
    """Merge events that differ only in steps (T1 steps then T2 steps of one mechanism = T1 + T2 steps):
    same composition, fewer accountant calls, and a cache key independent of how the runs were split."""
    acc: dict[str, dict] = {}
    for e in events:
        key = canonical({k: v for k, v in e.items() if k != "steps"})
        if key in acc:
            acc[key]["steps"] += e["steps"]
        else:
            acc[key] = dict(e)
    return sorted(acc.values(), key=canonical)


def total_steps(events: list[dict]) -> int:
    return sum(e["steps"] for e in events)


def epochs_of(event: dict) -> float | None:
    """Passes over the data that ``event``'s steps amount to (``steps * q`` or ``steps * b / n``)."""
    if event["sampling"] in ("poisson", "truncated_poisson"):
        return event["steps"] * event["sample_rate"]
    if event["sampling"] == "cyclic_poisson":
        return event["steps"] * event["sample_rate"] / event["bands"]
    if event["sampling"] == "shuffle":
        return event["steps"] * event["batch_size"] / event["dataset_size"]
    if event["sampling"] == "fixed_order":
        return event["steps"] / event["min_separation"]
    return None


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
    out["max_epochs"] = [None if epochs_of(e) is None else round(epochs_of(e), 4) for e in fit]
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
