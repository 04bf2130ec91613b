"""Argument validation shared by the public API: errors that say what is wrong and what to do."""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any, TypeVar
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


class JaxdpDeprecationWarning(DeprecationWarning):
    """A deprecated jaxdp API was used. A ``DeprecationWarning`` (every filter and ``pytest.warns`` for those
    catches it) of jaxdp's own: jaxdp's test suite turns it into an error (``pyproject.toml``), so a test uses a
    deprecated jaxdp API only inside ``pytest.warns``, and jaxdp never calls one itself."""


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


def seed_key(seed: int) -> jax.Array:
    """The typed PRNG key of an integer seed, with every bit of a seed up to 64 bits.

    ``jax.random.key(seed)`` keeps only the low 32 bits of a seed when 64-bit types are off (JAX's default:
    ``key(2**32 + 5) == key(5)``), so the 63-bit seeds jaxdp draws from the OS would give only 2^32 possible noise
    streams -- few enough to search. This gives the key ``jax.random.key(seed)`` gives with 64-bit types on: the
    same key for a seed below 2^32 (and for a negative seed, as ``jax.random.key``), all 64 bits above it. (With a
    non-default PRNG implementation, the high 32 bits are folded into the key of the low 32.)

    >>> import jax
    >>> bool((jax.random.key_data(seed_key(5)) == jax.random.key_data(jax.random.key(5))).all())
    True
    >>> bool((jax.random.key_data(seed_key(2**32 + 5)) == jax.random.key_data(seed_key(5))).all())
    False

    Raises:
      TypeError: ``seed`` is not an integer.
      ValueError: ``seed`` is 2^64 or more.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"a seed must be an integer, got {seed!r}")
    seed = int(seed)
    if seed >= 2**64:
        raise ValueError(f"a seed must be below 2^64, got {seed}")
    hi, lo = seed >> 32, seed & 0xFFFFFFFF
    if seed < 0 or hi == 0:
        return jax.random.key(seed)
    key = jax.random.key(lo)
    if jax.random.key_data(key).shape == (2,):   # threefry2x32 (the default): the key data is [hi, lo]
        return jax.random.wrap_key_data(jnp.array([hi, lo], dtype=jnp.uint32), impl=jax.random.key_impl(key))
    return jax.random.fold_in(key, hi)


def prng_key(key: Any, who: str) -> jax.Array:
    """Normalise a user key (typed key, raw uint32[2] key or int seed). ``None`` is an error (privacy rule 7)."""
    if key is None:
        raise ValueError(
            f"{who} needs a PRNG key: pass key=jax.random.key(seed) (a seed you choose and keep secret), "
            "or secure=True to draw fresh key material from the OS entropy source every step. "
            "There is no default key: a predictable key makes the noise predictable.")
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return seed_key(int(key))
    if isinstance(key, jax.Array):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(key)
    raise TypeError(f"{who}: key must be a jax PRNG key (jax.random.key(seed)) or an int seed, got {key!r}")


_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


def present(value: _T | None) -> _T:
    """``value``, which an invariant the caller relies on keeps from being None (an event field its sampling
    requires, state set up before it is read). The type checker's narrowing of an ``Optional``; a broken invariant
    raises ``AssertionError`` here instead of a ``TypeError`` on None further on."""
    if value is None:
        raise AssertionError("internal invariant broken: a required value is None")
    return value


def keyword_only(*names: str) -> Callable[[_F], _F]:
    """Decorator for a function whose parameters ``names`` became keyword-only (noise multiplier and clip norm are
    floats that different functions used to take in different orders; a swap is silent and changes the privacy).

    A call that still passes them by position, in the old order after the function's own positional parameters,
    keeps working and warns with a ``DeprecationWarning`` naming the keywords to use. The wrapped function's
    signature (``inspect.signature``) is the keyword-only one.
    """
    def decorate(fn: _F) -> _F:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        n_pos = sum(p.kind in kinds for p in inspect.signature(fn).parameters.values())
        who = f"jaxdp.{fn.__name__}"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > n_pos:
                extra = args[n_pos:]
                if len(extra) > len(names):
                    raise TypeError(f"{who}() takes at most {n_pos + len(names)} positional arguments "
                                    f"({len(args)} given); pass {', '.join(names)} by keyword")
                moved = names[:len(extra)]
                for name in moved:
                    if name in kwargs:
                        raise TypeError(f"{who}() got multiple values for argument {name!r}")
                warnings.warn(
                    f"{who}: passing {', '.join(moved)} by position is deprecated and will stop working; pass them "
                    f"by keyword: {who}({', '.join(f'{n}=...' for n in moved)}). (noise_multiplier and "
                    "l2_clip_norm are both floats, and a swapped pair would silently change the privacy.)",
                    JaxdpDeprecationWarning, stacklevel=2)
                kwargs.update(zip(moved, extra))
                args = args[:n_pos]
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def delta_for_dataset(delta: float, dataset_size: int, *, allow_large_delta: bool = False,
                      override: str = "allow_large_delta=True", warn: bool = True) -> float:
    """Return ``delta``; refuse (``ValueError``) ``delta >= 1/N`` unless ``allow_large_delta`` (then warn).

    With ``delta >= 1/N`` a mechanism that publishes one random training example in the clear satisfies
    (epsilon, delta)-DP for every epsilon, so such a guarantee says nothing about any one example. ``override``
    names the expert switch in the caller's terms (keyword, config key or CLI flag).
    """
    d = positive("delta", delta)
    if d >= 1:
        raise ValueError(f"delta must be < 1, got {delta}")
    n = int(dataset_size)
    if n > 0 and d >= 1.0 / n:
        msg = (f"delta = {delta:g} is not below 1/N = 1/{n} = {1.0 / n:.3g}: with delta >= 1/N a mechanism that "
               "publishes one random training example in the clear satisfies the guarantee, so it protects "
               f"nobody. Use a delta well below 1/N, e.g. 1/N^1.1 = {n ** -1.1:.2g}")
        if not allow_large_delta:
            raise ValueError(msg + f" (experts who accept this can pass {override}; it is recorded with the run).")
        if not warn:
            return d
        import warnings
        from jaxdp.accounting.core import DeltaWarning
        warnings.warn(msg + f" ({override} given: recorded with the run).", DeltaWarning, stacklevel=3)
    return d


def renamed_keyword(where: str, new: str, new_value: Any, old: str, old_value: Any, *, new_default: Any = None,
                    stacklevel: int = 3) -> Any:
    """The value of keyword ``new`` whose old name ``old`` still works, with a DeprecationWarning naming ``new``.

    ``old_value is None`` means the old name was not used; ``new_value is new_default`` that the new one was not.
    Giving both is a ``TypeError`` (two values for one parameter).
    """
    if old_value is None:
        return new_value
    if new_value is not new_default:
        raise TypeError(f"{where}: give {new}= only ({old}= is its deprecated old name)")
    import warnings
    warnings.warn(f"{where}: {old}= is deprecated; use {new}= (same meaning)", JaxdpDeprecationWarning,
                  stacklevel=stacklevel)
    return old_value
