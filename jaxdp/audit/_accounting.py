"""Epsilon for the audit trainer's recipes (Poisson-sampled Gaussian, ``T`` steps), through jaxdp.accounting."""
from __future__ import annotations

import math

from jaxdp import accounting


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of DP-SGD with Poisson rate ``q``, noise multiplier ``sigma``, ``T`` steps, at ``delta`` (PRV)."""
    if noise_multiplier <= 0:
        return math.inf
    return float(accounting.compute_epsilon(noise_multiplier, sample_rate, steps, delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier whose epsilon is at most ``target_epsilon`` (PRV; never above the target)."""
    return float(accounting.calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps=steps))


def accountant_name() -> str:
    return "jaxdp.accounting (prv)"
