"""Argument validation shared by the public API: errors that say what is wrong and what to do."""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def positive(name: str, value: Any) -> float:
    """Return ``float(value)``; raise ``ValueError`` unless it is finite and > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def non_negative(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def sample_rate(value: Any, name: str = "sample_rate") -> float:
    try:
        q = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < q <= 1.0):
        raise ValueError(
            f"{name} must lie in (0, 1] (the probability that an example is in a batch), got {value!r}; "
            "use sample_rate = expected_batch_size / dataset_size")
    return q


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def prng_key(key: Any, who: str) -> jax.Array:
    """Normalise a user key (typed key, raw uint32[2] key or int seed). ``None`` is an error (privacy rule 7)."""
    if key is None:
        raise ValueError(
            f"{who} needs a PRNG key: pass key=jax.random.key(seed) (a seed you choose and keep secret), "
            "or secure=True to draw fresh key material from the OS entropy source every step. "
            "There is no default key: a predictable key makes the noise predictable.")
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(key)
    raise TypeError(f"{who}: key must be a jax PRNG key (jax.random.key(seed)) or an int seed, got {key!r}")
