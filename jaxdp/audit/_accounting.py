"""Epsilon for the audit trainer's recipes: Poisson-sampled Gaussian mechanism, ``T`` steps.

Uses :mod:`jaxdp.accounting` when it is present in the build; otherwise falls back to ``dp_accounting``'s RDP
accountant directly (an upper bound on epsilon, slightly looser than PRV/PLD -- fine for claims under audit).
TODO(accounting): drop the fallback once jaxdp.accounting is merged everywhere.
"""
from __future__ import annotations

import math


def _jaxdp_accounting():
    try:
        from jaxdp import accounting  # noqa: WPS433
    except ImportError:
        return None
    if hasattr(accounting, "compute_epsilon") and hasattr(accounting, "calibrate_noise_multiplier"):
        return accounting
    return None


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    import dp_accounting
    orders = [2 + 0.5 * i for i in range(60)] + list(range(33, 257))  # orders < 2 fail to converge at large q
    acc = dp_accounting.rdp.RdpAccountant(orders)
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of DP-SGD with Poisson rate ``q``, noise multiplier ``sigma``, ``T`` steps, at ``delta``."""
    if noise_multiplier <= 0:
        return math.inf
    acc = _jaxdp_accounting()
    if acc is not None:
        return float(acc.compute_epsilon(noise_multiplier, sample_rate, steps, delta))
    return _rdp_epsilon(noise_multiplier, sample_rate, steps, delta)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 1e-4 relative) whose epsilon is at most ``target_epsilon``."""
    acc = _jaxdp_accounting()
    if acc is not None:
        return float(acc.calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps=steps))
    lo, hi = 0.05, 1.0
    while _rdp_epsilon(hi, sample_rate, steps, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at q={sample_rate}, T={steps}")
    while (hi - lo) / hi > 1e-4:
        mid = 0.5 * (lo + hi)
        if _rdp_epsilon(mid, sample_rate, steps, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def accountant_name() -> str:
    return "jaxdp.accounting (prv)" if _jaxdp_accounting() is not None else "dp_accounting RDP (fallback)"
