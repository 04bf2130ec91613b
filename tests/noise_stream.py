"""Shared by the BandMF and BLT covariance tests: the empirical covariance across steps of a correlated-noise
optax transformation, and the standard error of each entry.

With ``d`` i.i.d. coordinates, each coordinate's noise over the ``T`` steps is ``N(0, S)``; the empirical
covariance entry ``(i, j)`` has mean ``S_ij`` and variance ``(S_ii S_jj + S_ij^2) / d`` (Isserlis).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def step_covariance(tx: Any, steps: int, d: int) -> tuple[np.ndarray, Any]:
    """``(w w^T / d, final state)``: ``w [steps, d]`` the updates ``tx`` makes to a zero gradient of ``d``
    coordinates, step after step (float64)."""
    params = {"p": jnp.zeros((d,), jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rows = []
    for _ in range(steps):
        u, state = update(params, state)
        rows.append(np.asarray(u["p"], np.float64))
    w = np.stack(rows)
    return w @ w.T / d, state


def covariance_se(true: np.ndarray, d: int) -> np.ndarray:
    """Standard error of each entry of the empirical covariance of ``d`` i.i.d. ``N(0, true)`` vectors."""
    diag = np.diag(true)
    return np.sqrt((np.outer(diag, diag) + true ** 2) / d)
