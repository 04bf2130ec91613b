"""Banded matrix-factorization noise (BandMF): DP-SGD with noise correlated across steps.

The matrix-factorization view of DP training (Denisov et al. 2022; Choquette-Choo et al. 2023). Stack the
per-step sums of clipped gradients as the rows of ``G`` (``n`` steps). SGD with a constant learning rate releases
the prefix sums ``A G`` with ``A`` the lower-triangular matrix of ones (the *workload*). Factor ``A = B C`` and
release ``B (C G + Z)`` with ``Z`` i.i.d. Gaussian: the privacy cost is that of releasing ``C G + Z`` (a Gaussian
mechanism of sensitivity ``sens(C)``), and the error in the prefix sums is ``B Z``. Equivalently, the optimiser
receives ``G + C^{-1} Z``: step ``t``'s gradient gets the noise ``w_t = (C^{-1} Z)_t``, a combination of the
fresh draw ``z_t`` and earlier ones. ``C = I`` is DP-SGD.

**Strategy.** We use b-banded lower-triangular Toeplitz strategies (McKenna 2024 shows they are near-optimal for
this workload at scale): ``C[t, s] = c_{t-s} / ||c||`` for ``0 <= t - s < b``, 0 elsewhere, ``c_0 = 1``. Dividing
by ``||c|| = sqrt(sum_l c_l^2)`` makes the largest column norm exactly 1 (the last ``b - 1`` columns are
truncated and have smaller norms). :func:`optimal_banded_toeplitz` minimises the expected total squared error
of the prefix sums per unit noise,

    L(c) = ||A C^{-1}||_F^2 = ||c||^2 * sum_{m=0}^{n-1} (n - m) s_m^2,

with ``r`` the power series of ``1 / c(x)`` (``C^{-1} = ||c|| * Toeplitz(r)``) and ``s`` its prefix sums
(``A C^{-1}`` is Toeplitz with coefficients ``||c|| s_m``). ``L`` costs ``O(n b)`` to evaluate; we minimise it over
``c_1..c_{b-1}`` with L-BFGS (analytic gradient, ``dr = -r * dc * r``), starting from the truncated coefficients
of ``(1 - x)^{-1/2}`` (the optimal un-banded Toeplitz square root of ``A``; Fichtenberger et al. 2023).
``bands = 1`` gives ``C = I`` and ``L = n (n + 1) / 2``: DP-SGD. Results are cached per ``(steps, bands)``.

**Sensitivity.** Column ``s`` of a b-banded ``C`` is non-zero only in rows ``s .. s + b - 1``. If one example takes
part in steps ``s_1 < s_2 < ...`` that are at least ``b`` apart (b-min-separation), the columns it touches have
disjoint supports, hence are orthogonal, and its contribution ``sum_j C[:, s_j] g_j^T`` (``||g_j|| <= C_clip``)
has squared Frobenius norm ``sum_j ||C[:, s_j]||^2 ||g_j||^2 <= k C_clip^2`` for ``k`` participations: the
sensitivity is ``sqrt(k) * C_clip`` with max column norm 1 (attained when all ``k`` columns have norm 1).
Without the separation the columns overlap and the sensitivity is larger (:func:`brute_force_sensitivity`).

**Amplification (cyclic Poisson sampling).** Choquette-Choo et al. 2023 ("Amplified Banded Matrix Factorization",
Theorem 4): split the data into ``b`` fixed groups; step ``t`` Poisson-samples group ``t mod b`` with rate
``p``. Each example then takes part only in steps ``b`` apart, and b-banded BandMF with column norms <= 1 and noise
``N(0, (sigma C_clip)^2)`` per entry of ``Z`` is exactly as private as DP-SGD with sampling rate ``p``, noise
multiplier ``sigma`` and ``ceil(T / b)`` steps (:class:`jaxdp.sampling.CyclicPoissonSampler`, the accounting event
``{"sampling": "cyclic_poisson", ...}`` in :mod:`jaxdp.accounting`).

**Streaming.** ``C w = z`` solved row by row: ``w_t = ||c|| z_t - sum_{l=1}^{b-1} c_l w_{t-l}``. Only the last
``b - 1`` correlated draws are kept: the state of :func:`bandmf_noise` holds ``(b - 1) x |params|`` numbers (plus
the fresh draw, ``b x |params|`` at peak). The Toeplitz recursion has no horizon: running past the ``steps`` the
strategy was optimised for stays private (the columns keep norm <= 1), it is only no longer optimal.

``momentum=beta`` optimises for SGD with heavy-ball momentum instead (workload ``A_beta``, lower Toeplitz with
``a_k = (1 - beta^(k+1)) / (1 - beta)``). Left out: learning-rate-schedule-aware workloads, general
(non-Toeplitz) banded strategies and BLT (buffered linear Toeplitz) strategies.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import _checks
from jaxdp.clipping import total_clip_norm
from jaxdp.noise import noise_buffers, step_noise

PyTree = Any


# ------------------------------------------------------------------------------------------ the strategy


def _inverse_series(c: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` coefficients of the power series ``1 / c(x)`` (``c_0 != 0``): ``C^{-1}``'s Toeplitz column."""
    from scipy.signal import lfilter
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return lfilter([1.0], np.asarray(c, float), impulse)


def _workload(v: np.ndarray, momentum: float) -> np.ndarray:
    """``A_beta v`` for a Toeplitz column ``v``: SGD with heavy-ball momentum ``beta`` and a constant learning rate
    moves the parameters by ``sum_s a_{t-s} g_s`` with ``a_k = (1 - beta^(k+1)) / (1 - beta)`` -- a momentum
    filter ``1 / (1 - beta x)`` then a prefix sum. ``beta = 0`` is the prefix-sum workload."""
    if momentum:
        from scipy.signal import lfilter
        v = lfilter([1.0], [1.0, -momentum], v)
    return np.cumsum(v)


def _check_momentum(momentum) -> float:
    m = float(momentum)
    if not 0.0 <= m < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    return m


def prefix_sum_error(coefficients: np.ndarray, steps: int, momentum: float = 0.0) -> float:
    """``||A C^{-1}||_F^2`` for the column-normalised banded Toeplitz strategy with ``coefficients`` (``c_0..c_{b-1}``)
    over ``steps`` steps: the summed variance of the noise in all ``steps`` prefix sums, per unit noise std.
    With ``momentum = beta`` the workload is SGD with heavy-ball momentum (:func:`_workload`).

    DP-SGD (``coefficients = [1]``, no momentum) gives ``steps * (steps + 1) / 2``.
    """
    c = np.asarray(coefficients, float)
    n = _checks.positive_int("steps", steps)
    s = _workload(_inverse_series(c, n), _check_momentum(momentum))
    return float(np.dot(c, c) * np.dot(np.arange(n, 0, -1), s * s))


def _loss_and_grad(theta: np.ndarray, n: int, momentum: float = 0.0) -> tuple[float, np.ndarray]:
    """``L(c)`` and its gradient in ``c_1..c_{b-1}`` (``c_0 = 1``)."""
    c = np.concatenate([[1.0], theta])
    w = np.arange(n, 0, -1, dtype=float)
    norm2 = float(np.dot(c, c))
    with np.errstate(over="ignore", invalid="ignore"):   # unstable c (roots inside the unit disc): r explodes
        r = _inverse_series(c, n)
        s = _workload(r, momentum)
        f = float(np.dot(w, s * s))
    if not math.isfinite(f) or f * norm2 >= 1e300:
        return 1e300, np.zeros_like(theta)
    # dF/dr = M^T (2 w s) with M the (lower Toeplitz) workload operator: M^T = J M J (J reverses)
    g = _workload((2.0 * w * s)[::-1], momentum)[::-1]
    rr = np.convolve(r, r)[:n]     # (r * r)_k; dr_m / dc_l = -(r * r)_{m - l} (direct sum: FFT loses precision)
    b = theta.size + 1
    df_dc = np.array([-np.dot(g[l:], rr[:n - l]) for l in range(1, b)])
    return norm2 * f, 2.0 * theta * f + norm2 * df_dc


def _log_loss_and_grad(theta: np.ndarray, n: int, momentum: float = 0.0) -> tuple[float, np.ndarray]:
    """``log L`` (well scaled for L-BFGS: ``L`` grows like ``n^2`` and explodes outside the stable region)."""
    f, g = _loss_and_grad(theta, n, momentum)
    if f >= 1e300:
        return 700.0, np.zeros_like(theta)
    return math.log(f), g / f


def _sqrt_coefficients(b: int) -> np.ndarray:
    """Coefficients of ``(1 - x)^{-1/2}``: ``binom(2k, k) / 4^k``, k < b."""
    out = np.ones(b)
    for k in range(1, b):
        out[k] = out[k - 1] * (2 * k - 1) / (2 * k)
    return out


@functools.lru_cache(maxsize=64)
def _optimal(steps: int, bands: int, momentum: float = 0.0) -> tuple[float, ...]:
    if bands == 1:
        return (1.0,)
    from scipy.optimize import minimize
    starts = [_sqrt_coefficients(bands)[1:]]
    if momentum:   # also from the momentum-free optimum
        starts.append(np.asarray(_optimal(steps, bands))[1:])
    best = None
    for x0 in starts:
        res = minimize(_log_loss_and_grad, x0, args=(steps, momentum), jac=True, method="L-BFGS-B",
                       options={"maxiter": 2000, "gtol": 1e-10, "ftol": 1e-14})
        val = _loss_and_grad(res.x, steps, momentum)[0]
        if best is None or val < best[0]:
            best = (val, res.x)
    assert best is not None  # starts is never empty
    return tuple([1.0, *map(float, best[1])])


def optimal_banded_toeplitz(steps: int, bands: int, momentum: float = 0.0) -> np.ndarray:
    """Toeplitz coefficients ``c_0 = 1, c_1, .., c_{b-1}`` of the b-banded strategy minimising
    :func:`prefix_sum_error` over ``steps`` steps (cached per ``(steps, bands, momentum)``).

    The strategy matrix is ``C[t, s] = c_{t-s} / ||c||`` (max column norm 1); see :func:`strategy_matrix`.
    ``bands`` is capped at ``steps`` (more bands than steps changes nothing). ``momentum = beta > 0`` optimises
    for SGD with heavy-ball momentum ``beta`` (the workload-aware variant); the privacy is the same for any
    coefficients (it depends only on the bands and the column norms).
    """
    n = _checks.positive_int("steps", steps)
    b = min(_checks.positive_int("bands", bands), n)
    return np.array(_optimal(n, b, _check_momentum(momentum)))


def select_bands(steps: int, dataset_size: int, expected_batch_size: float, epsilon: float, delta: float, *,
                 candidates: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), accountant: str = "prv",
                 momentum: float = 0.0) -> tuple[int, dict[int, dict[str, float]]]:
    """The number of bands ``b`` whose BandMF run of ``steps`` steps (cyclic Poisson sampling, rate
    ``p = b B / N``, accounted as DP-SGD with ``p`` and ``ceil(T / b)`` steps) has the smallest expected error
    at ``(epsilon, delta)``:

        err(b) = sigma_b^2 * ||A C_b^{-1}||_F^2     (:func:`prefix_sum_error` of :func:`optimal_banded_toeplitz`),

    the summed noise variance of all prefix sums per unit clip norm, with ``sigma_b`` calibrated to the target.
    ``b = 1`` is DP-SGD (Poisson rate ``B / N``), so the choice is never worse than DP-SGD by this measure: more
    bands lower ``||A C^{-1}||`` but weaken the amplification by sampling (``p`` grows with ``b``), and on small
    datasets (``B / N`` not small) that loss usually wins. Candidates with ``b B > N`` are skipped.

    PRIVACY: the choice reads only public quantities (``N``, ``B``, ``T``, the target), never the data: free.

    Returns ``(b, table)``: ``table[b] = {"noise_multiplier": sigma_b, "error": err(b), "relative": err(b) /
    err(1)}`` (``relative`` is present when ``1`` is a candidate).
    """
    from jaxdp import accounting   # lazy: accounting does not import this module, but keep import time low

    n = _checks.positive_int("steps", steps)
    size = _checks.positive_int("dataset_size", dataset_size)
    e = _checks.positive("expected_batch_size", expected_batch_size)
    table: dict[int, dict[str, float]] = {}
    for b in sorted({_checks.positive_int("candidates", c) for c in candidates}):
        if b * e > size:
            continue
        sigma = accounting.calibrate_noise_multiplier(epsilon, delta, b * e / size,
                                                      steps=accounting.cyclic_participations(n, b),
                                                      accountant=accountant)
        coef = np.ones(1) if b == 1 else optimal_banded_toeplitz(n, b, momentum)
        table[b] = {"noise_multiplier": sigma, "error": sigma ** 2 * prefix_sum_error(coef, n, momentum)}
    if not table:
        raise ValueError(f"no candidate has b * expected_batch_size <= dataset_size ({size})")
    if 1 in table:
        for row in table.values():
            row["relative"] = row["error"] / table[1]["error"]
    return min(table, key=lambda b: table[b]["error"]), table


def strategy_matrix(coefficients: np.ndarray, steps: int) -> np.ndarray:
    """The dense ``[steps, steps]`` column-normalised banded Toeplitz strategy ``C`` (for tests and analysis)."""
    c = np.asarray(coefficients, float)
    n = _checks.positive_int("steps", steps)
    mat = np.zeros((n, n))
    for lag, v in enumerate(c[:n]):
        mat += np.diag(np.full(n - lag, v), -lag)
    return mat / np.linalg.norm(c)


# ----------------------------------------------------------------------------------------- sensitivity


def participation_patterns(steps: int, min_separation: int, max_participations: int):
    """All non-empty sets of steps in ``range(steps)`` with at most ``max_participations`` elements, any two at
    least ``min_separation`` apart (exponential: for tests and small analyses)."""
    for k in range(1, max_participations + 1):
        for pattern in itertools.combinations(range(steps), k):
            if all(b - a >= min_separation for a, b in zip(pattern, pattern[1:])):
                yield pattern


def brute_force_sensitivity(strategy: np.ndarray, min_separation: int, max_participations: int) -> float:
    """L2 sensitivity of ``strategy @ G`` (rows of ``G`` with norm <= 1) maximised over ALL participation
    patterns with the given separation and count.

    For a pattern ``P`` the squared sensitivity is the maximum of ``sum_{i,j in P} X_ij <g_i, g_j>`` over unit
    vectors ``g`` (``X = C^T C``); we return the maximum of the upper bound ``sum_{i,j in P} |X_ij|``, which is
    attained (by ``g_i = sign_i u``) whenever the signs of ``X_P`` are those of a rank-one matrix -- in particular
    when ``X_P`` is diagonal (banded ``C``, separated participation) or non-negative.
    """
    c = np.asarray(strategy, float)
    x = np.abs(c.T @ c)
    best = 0.0
    for p in participation_patterns(c.shape[1], min_separation, max_participations):
        idx = np.asarray(p)
        best = max(best, float(x[np.ix_(idx, idx)].sum()))
    return math.sqrt(best)


def banded_sensitivity(strategy: np.ndarray, bands: int, participations: int, min_separation: int) -> float:
    """``sqrt(k) * max column norm`` for a lower-triangular b-banded ``strategy`` under ``min_separation >= bands``
    participation with at most ``k = participations`` participations (module docstring). Refuses the other cases."""
    c = np.asarray(strategy, float)
    b = _checks.positive_int("bands", bands)
    if min_separation < b:
        raise ValueError(f"the sqrt(k) sensitivity needs participations at least bands={b} steps apart; "
                         f"got min_separation={min_separation} (use brute_force_sensitivity)")
    i, j = np.indices(c.shape)
    if np.any(c[(i < j) | (i - j >= b)] != 0):
        raise ValueError(f"strategy is not lower-triangular {b}-banded")
    return math.sqrt(_checks.positive_int("participations", participations)) * float(
        np.max(np.linalg.norm(c, axis=0)))


# ---------------------------------------------------------------------------------- the noise transform


class BandMFNoiseState(NamedTuple):
    """State of :func:`bandmf_noise`: steps taken, base key, and per leaf the last ``b - 1`` correlated noise
    draws ``[w_{t-1}, .., w_{t-b+1}]`` stacked on a leading axis (an empty tuple when ``b = 1``)."""

    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count (public name, kept)
    key: Any
    history: PyTree


def _coefficients(bands, steps, coefficients, momentum=0.0) -> np.ndarray:
    if coefficients is not None:
        c = np.asarray(coefficients, float).reshape(-1)
        if c.size == 0 or not np.all(np.isfinite(c)) or c[0] == 0:
            raise ValueError("coefficients must be finite with c_0 != 0")
        if bands is not None and int(bands) != c.size:
            raise ValueError(f"bands={bands} but {c.size} coefficients were given")
        return c / c[0]
    b = _checks.positive_int("bands", bands)
    if b == 1:
        return np.ones(1)
    if steps is None:
        raise ValueError("bandmf_noise needs steps= (the planned number of steps, the horizon the strategy is "
                         "optimised for) or explicit coefficients=")
    return optimal_banded_toeplitz(steps, b, momentum)


@_checks.keyword_only("noise_multiplier", "l2_clip_norm", "expected_batch_size", "key")
def bandmf_noise(
    *,
    noise_multiplier: float,
    l2_clip_norm: float | PyTree,
    expected_batch_size: float,
    key: jax.Array | int | None = None,
    bands: int | None = None,
    steps: int | None = None,
    coefficients: np.ndarray | None = None,
    momentum: float = 0.0,
    secure: bool = False,
    trainable: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Banded matrix-factorization noise: ``update_t(S_t) = (S_t + w_t) / E`` with ``w = C^{-1} z``.

    ``z_t ~ N(0, (sigma * C_clip)^2 I)`` is drawn exactly like :func:`jaxdp.add_noise` (key ``fold_in(key, t)``,
    :func:`jaxdp.noise.gaussian_like`), and ``w_t = ||c|| z_t - sum_{l=1}^{b-1} c_l w_{t-l}`` (module docstring):
    the noise of step ``t`` is correlated with the previous ``b - 1`` steps' so that the noise in the running sum
    of updates partly cancels. ``bands = 1`` is :func:`jaxdp.add_noise`, bit for bit with the same key.

    MEMORY: the state keeps the last ``b - 1`` noise draws, ``(b - 1) x |params|`` numbers (``b x |params|`` with
    the fresh draw during the update).

    PRIVACY: with ``C``'s max column norm 1 this releases what a Gaussian mechanism of noise std
    ``sigma * C_clip`` on ``C G`` releases. That is as private as DP-SGD with the same ``sigma`` ONLY under the
    matching sampling: cyclic Poisson sampling with ``b`` groups (:class:`jaxdp.sampling.CyclicPoissonSampler`),
    accounted as DP-SGD with rate ``p`` and ``ceil(T/b)`` steps (Choquette-Choo et al. 2023); or any sampling
    where an example's participations are >= ``b`` steps apart, with sensitivity ``sqrt(k) C_clip`` for ``k``
    participations. Under ordinary Poisson sampling (no separation) the sensitivity is larger and DP-SGD's
    epsilon does NOT hold.

    Args:
      noise_multiplier, l2_clip_norm, expected_batch_size, key, secure, trainable: as in :func:`jaxdp.add_noise`
        (keyword-only; positional calls still work, with a ``DeprecationWarning``).
      bands: ``b``, the number of bands (1 = DP-SGD).
      steps: the planned number of steps; the strategy is optimised for this horizon
        (:func:`optimal_banded_toeplitz`, cached). Not needed with ``bands=1`` or explicit ``coefficients``.
      coefficients: explicit Toeplitz coefficients ``c_0..c_{b-1}`` (normalised by ``c_0``, then by ``||c||``).
      momentum: optimise the strategy for SGD with this heavy-ball momentum (the optimiser that follows);
        0 = plain SGD's prefix sums. Affects accuracy only, never privacy.

    Raises:
      ValueError: a negative ``noise_multiplier``, an invalid clip norm or ``expected_batch_size``, ``bands``
        not a positive integer, no ``steps`` for ``bands > 1`` without ``coefficients``, coefficients that are
        not finite (or ``c_0 = 0``) or whose number is not ``bands``, a momentum outside ``[0, 1)``, or no
        ``key`` without ``secure``.
    """
    sigma = _checks.non_negative("noise_multiplier", noise_multiplier)
    clip = total_clip_norm(l2_clip_norm)
    e = _checks.positive("expected_batch_size", expected_batch_size)
    c = _coefficients(bands, steps, coefficients, momentum)
    b = c.size
    base_key = None if secure else _checks.prng_key(key, "bandmf_noise")
    std = sigma * clip
    scale = float(np.linalg.norm(c))          # ||c|| (with c_0 = 1): the diagonal of C^{-1}
    lags = [float(v) for v in c[1:]]

    def init_fn(params):
        hist = () if b == 1 else noise_buffers(params, b - 1)
        return BandMFNoiseState(count=jnp.zeros([], jnp.int32), key=base_key, history=hist)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        z = step_noise(state.key, state.count, updates, std, secure, trainable)
        hist = [] if b == 1 else treedef.flatten_up_to(state.history)
        out, new_hist = [], []
        for i, (g, zi) in enumerate(zip(leaves, z)):
            if b == 1:
                w = zi
            else:
                h = hist[i]
                if zi is None:
                    w = None
                    new_hist.append(h)
                else:
                    w = scale * zi
                    for lag, cl in enumerate(lags):   # w_t = ||c|| z_t - sum_l c_l w_{t-l}
                        w = w - cl * h[lag]
                    w = w.astype(h.dtype)
                    new_hist.append(jnp.concatenate([w[None], h[:-1]], axis=0))
            if w is not None:
                g = g + w
            out.append(g / jnp.asarray(e, dtype=g.dtype))
        new_state = BandMFNoiseState(
            count=optax.safe_increment(state.count), key=state.key,
            history=() if b == 1 else jax.tree_util.tree_unflatten(treedef, new_hist))
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["BandMFNoiseState", "bandmf_noise", "optimal_banded_toeplitz", "prefix_sum_error", "select_bands",
           "strategy_matrix",
           "brute_force_sensitivity", "banded_sensitivity", "participation_patterns"]
