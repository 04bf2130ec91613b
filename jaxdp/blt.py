"""Buffered linear Toeplitz (BLT) noise: matrix-factorization noise with O(buffers x |params|) state, whatever the
number of steps (Dvijotham, McMahan, Pillutla, Steinke, Thakurta 2024, "Efficient and Near-Optimal Noise
Generation for Streaming Differential Privacy"; McKenna 2024, "Scaling up the Banded Matrix Factorization
Mechanism").

**Matrix-factorization view** (as in :mod:`jaxdp.matrix_factorization`). Stack the per-step sums of clipped
gradients as the rows of ``G`` (``n`` steps). SGD releases the prefix sums ``A G`` (``A`` lower-triangular ones;
with heavy-ball momentum ``beta`` the workload ``A_beta``). Factor ``A = B C``, release ``C G + Z`` with
``Z`` i.i.d. Gaussian; the optimiser then receives ``G + C^{-1} Z``: step ``t``'s gradient gets the correlated
noise ``w_t = (C^{-1} Z)_t``.

**The BLT strategy.** ``C`` is lower-triangular Toeplitz with coefficients

    c_0 = 1,    c_k = sum_{j=1}^{d} omega_j theta_j^(k-1)    (k >= 1),

i.e. the generating function ``c(x) = 1 + sum_j omega_j x / (1 - theta_j x)``, a rational function with ``d``
poles (``d`` = the number of *buffers*). With ``0 < theta_j < 1``, ``omega_j > 0`` and ``sum_j omega_j <= 1``
the coefficients are positive and non-increasing.

**Streaming** (Dvijotham et al., Alg. 3). ``w = C^{-1} y`` is solved one row at a time with ``d`` running buffers
``u_j``: ``w_t = y_t - sum_j omega_j u_j``, then ``u_j <- theta_j u_j + w_t``. By induction
``u_j = sum_{s<t} theta_j^(t-1-s) w_s``, so ``sum_j omega_j u_j = sum_{s<t} c_{t-s} w_s`` and ``(C w)_t = y_t``.
The state is ``d x |params|`` numbers for ANY number of steps (BandMF keeps ``(b-1) x |params|`` and a strategy
fixed to its horizon).

**Sensitivity** (:func:`blt_sensitivity`). Neighbouring relation: **zero-out**, i.e. add/remove one example with
a FIXED participation schema -- the steps an example may take part in are fixed in advance (by the data-independent
batch order of :class:`jaxdp.sampling.FixedOrderSampler`), and removing the example zeroes its gradient rows.
The example's contribution to ``C G`` is ``sum_{s in P} C[:, s] g_s^T`` (``||g_s|| <= C_clip``), so

    sens^2 = C_clip^2 * max_P sum_{s, s' in P} |(C^T C)_{s s'}|     (attained when C^T C >= 0),

over the allowed patterns ``P``. Single participation: ``sens = C_clip * ||c_{0..n-1}||`` (column 0 is the longest).
b-min-separation with at most ``k`` participations: for non-negative, non-increasing Toeplitz coefficients the
worst pattern is ``0, b, 2b, .., (k-1) b`` (McKenna 2024, Theorem 2; checked against a brute force over all
patterns in the tests), so ``sens = C_clip * ||sum_{i<k} shift_{i b}(c)||``.

**Noise and privacy** (:func:`blt_noise`). ``z_t ~ N(0, (sigma C_clip)^2 I)`` is drawn exactly like
:func:`jaxdp.add_noise`; the optimiser receives ``(S_t + w_t) / E`` with ``w = sens(C) * C^{-1} z`` (``sens`` for
unit clip norm). That is the release ``(C / sens) G + z`` post-processed: ONE Gaussian mechanism with noise
multiplier ``sigma`` for the whole horizon of ``n`` steps, under the participation schema the sensitivity was
computed for (:func:`blt_epsilon`). Running fewer steps releases a prefix (post-processing); running past ``n``
is NOT covered (more participations, larger sensitivity) -- the engine stops at the horizon.

**Optimisation** (:func:`optimal_blt`). Minimise ``sens(C)^2 * ||A C^{-1}||_F^2`` (the summed variance of the
noise in all ``n`` prefix sums, at a fixed privacy level) over ``theta, omega``. ``C^{-1}`` has the generating
function ``Q(x) / P(x)`` with ``Q = prod_j (1 - theta_j x)`` and ``P = Q + x sum_j omega_j Q / (1 - theta_j x)``,
so its ``n`` coefficients cost ``O(n d)`` (a recursive filter); the objective is
``sens^2 * sum_{m<n} (n - m) s_m^2`` with ``s`` the prefix sums of those coefficients (momentum: filtered first).
L-BFGS-B from a few starts (the ``d - 1`` buffer optimum plus one buffer, and geometric spreads of time scales),
parameters ``theta = sigmoid(a)``, ``omega = exp(b) / (1 + sum exp(b))`` so the constraints always hold; results
cached per ``(steps, buffers, min_separation, participations, momentum)``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import _checks
from jaxdp.clipping import total_clip_norm
from jaxdp.noise import noise_buffers, step_noise

PyTree = Any


# ------------------------------------------------------------------------------------------ the strategy


def _params(theta, omega) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(theta, float).reshape(-1)
    w = np.asarray(omega, float).reshape(-1)
    if t.shape != w.shape:
        raise ValueError(f"theta and omega must have the same length (one per buffer), got {t.size} and {w.size}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(w))):
        raise ValueError("theta and omega must be finite")
    if np.any(np.abs(t) >= 1.0):
        raise ValueError(f"every buffer decay theta_j must lie in (-1, 1) (|theta| >= 1 makes C's coefficients "
                         f"grow without bound), got {t.tolist()}")
    return t, w


def blt_coefficients(theta, omega, steps: int) -> np.ndarray:
    """The first ``steps`` Toeplitz coefficients of ``C``: ``c_0 = 1``, ``c_k = sum_j omega_j theta_j^(k-1)``.

    >>> blt_coefficients([0.5], [0.5], 4).tolist()
    [1.0, 0.5, 0.25, 0.125]
    """
    t, w = _params(theta, omega)
    n = _checks.positive_int("steps", steps)
    c = np.ones(n)
    if n > 1 and t.size:
        c[1:] = (t[None, :] ** np.arange(n - 1)[:, None]) @ w
    return c


def blt_matrix(theta, omega, steps: int) -> np.ndarray:
    """The dense ``[steps, steps]`` lower-triangular Toeplitz strategy ``C`` (for tests and analysis)."""
    c = blt_coefficients(theta, omega, steps)
    n = c.size
    i, j = np.indices((n, n))
    return np.where(i >= j, c[np.clip(i - j, 0, n - 1)], 0.0)


def _polys(t: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Q(x) = prod_j (1 - theta_j x)`` and ``P(x) = Q(x) + x sum_j omega_j prod_{i != j} (1 - theta_i x)``,
    coefficients in increasing powers of ``x``: ``c(x) = P(x) / Q(x)``."""
    q = np.ones(1)
    for tj in t:
        q = np.convolve(q, [1.0, -tj])
    p = np.concatenate([q, [0.0]])
    for j, wj in enumerate(w):
        qj = np.ones(1)
        for i, ti in enumerate(t):
            if i != j:
                qj = np.convolve(qj, [1.0, -ti])
        p[1:1 + qj.size] += wj * qj
    return q, p[:q.size]


def inverse_coefficients(theta, omega, steps: int) -> np.ndarray:
    """The first ``steps`` Toeplitz coefficients of ``C^{-1}`` (the power series of ``Q(x) / P(x)``), in ``O(n d)``."""
    from scipy.signal import lfilter
    t, w = _params(theta, omega)
    n = _checks.positive_int("steps", steps)
    q, p = _polys(t, w)
    impulse = np.zeros(n)
    impulse[0] = 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        return lfilter(q, p, impulse)


def _minsep_column(c: np.ndarray, b: int, k: int) -> np.ndarray:
    """``sum_{i<k} shift_{i b}(c)`` truncated to ``len(c)``: the contribution of participations at 0, b, .., (k-1) b."""
    n = c.size
    pad = (-n) % b
    v = np.cumsum(np.concatenate([c, np.zeros(pad)]).reshape(-1, b), axis=0).reshape(-1)
    if k * b < v.size:
        v[k * b:] = v[k * b:] - v[:v.size - k * b]
    return v[:n]


def _participations(steps: int, min_separation: int, participations: int | None) -> int:
    most = -(-steps // min_separation)
    if participations is None:
        return most
    return min(_checks.positive_int("participations", participations), most)


def blt_sensitivity(theta, omega, steps: int, *, min_separation: int = 1, participations: int | None = 1,
                    ) -> float:
    """L2 sensitivity of ``C G`` per unit clip norm over ``steps`` steps (zero-out neighbours, fixed schema).

    ``participations=1`` (default): single participation, ``||c_{0..n-1}||_2`` (any Toeplitz ``C``).
    Otherwise an example takes part at most ``participations`` times (``None``: as often as the separation
    allows, ``ceil(steps / min_separation)``), any two participations at least ``min_separation`` steps apart;
    for non-negative, non-increasing coefficients the worst pattern is ``0, b, 2b, ...`` (module docstring).
    Coefficients that are not (``omega_j < 0``, ``sum omega > 1``, ...) are refused: use
    :func:`jaxdp.matrix_factorization.brute_force_sensitivity` on :func:`blt_matrix` for small problems.

    >>> round(blt_sensitivity([0.5], [0.5], 3), 6)   # ||(1, 0.5, 0.25)||
    1.145644
    >>> round(blt_sensitivity([0.5], [0.5], 3, min_separation=2, participations=2), 6)   # ||(1, .5, 1.25)||
    1.677051
    """
    n = _checks.positive_int("steps", steps)
    b = _checks.positive_int("min_separation", min_separation)
    k = _participations(n, b, participations)
    c = blt_coefficients(theta, omega, n)
    if k > 1:
        if np.any(c < 0) or np.any(np.diff(c) > 1e-12 * np.abs(c[:-1]).max(initial=1.0)):
            raise ValueError(
                "the min-separation sensitivity formula needs non-negative, non-increasing Toeplitz coefficients "
                "(theta_j in [0, 1), omega_j >= 0, sum(omega) <= 1); these are not. Use "
                "jaxdp.matrix_factorization.brute_force_sensitivity(blt_matrix(theta, omega, steps), ...) on a "
                "small problem, or optimal_blt's parameters")
        c = _minsep_column(c, b, k)
    return float(np.linalg.norm(c))


def blt_error(theta, omega, steps: int, momentum: float = 0.0) -> float:
    """``||A C^{-1}||_F^2``: the summed variance of the noise in all ``steps`` prefix sums (heavy-ball momentum
    ``beta``: the workload ``A_beta``), per unit noise std on ``C G``. Multiply by ``blt_sensitivity^2`` for the
    error at a fixed privacy level. ``theta = omega = []`` (``C = I``, DP-SGD) gives ``n (n + 1) / 2``.

    >>> blt_error([], [], 4)
    10.0
    """
    from jaxdp.matrix_factorization import _check_momentum, _workload
    n = _checks.positive_int("steps", steps)
    s = _workload(inverse_coefficients(theta, omega, n), _check_momentum(momentum))
    return float(np.dot(np.arange(n, 0, -1), s * s))


# ----------------------------------------------------------------------------------------- optimisation


def _unpack(x: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    a, bb = x[:d], x[d:]
    theta = 1.0 / (1.0 + np.exp(-a))
    m = max(0.0, float(np.max(bb, initial=0.0)))
    e = np.exp(bb - m)
    omega = e / (math.exp(-m) + e.sum())
    return theta, omega


def _pack(theta: np.ndarray, omega: np.ndarray) -> np.ndarray:
    theta = np.clip(theta, 1e-9, 1 - 1e-12)
    rest = max(1e-12, 1.0 - float(np.sum(omega)))
    return np.concatenate([np.log(theta) - np.log1p(-theta), np.log(np.maximum(omega, 1e-300)) - math.log(rest)])


def _prod(roots: np.ndarray) -> np.ndarray:
    """``prod_j (1 - roots_j x)`` in increasing powers of ``x``."""
    q = np.ones(1)
    for t in roots:
        q = np.convolve(q, [1.0, -t])
    return q


def _lagged_dots(g: np.ndarray, u: np.ndarray, d: int) -> np.ndarray:
    """``sum_{m >= i} g_m u_{m-i}`` for ``i = 1..d``."""
    n = g.size
    return np.array([np.dot(g[i:], u[:n - i]) if i < n else 0.0 for i in range(1, d + 1)])


def _objective(x: np.ndarray, d: int, n: int, b: int, k: int, momentum: float) -> tuple[float, np.ndarray]:
    """``log(sens^2 * ||A C^{-1}||_F^2)`` and its gradient in the unconstrained parameters ``x = (a, b)``.

    Error part: ``r = Q / P`` (series), so ``dr/dQ_i = x^i / P`` and ``dr/dP_i = -x^i Q / P^2``; ``Q`` and ``P``
    are polynomials in ``theta, omega`` (:func:`_polys`). Sensitivity part: ``sens^2 = ||M c||^2`` with ``M`` the
    sum of shifts by ``0, b, .., (k-1) b`` (``M^T = J M J``, ``J`` reversing) and ``c_m = sum_j omega_j
    theta_j^(m-1)``."""
    from scipy.signal import lfilter

    from jaxdp.matrix_factorization import _workload
    theta, omega = _unpack(x, d)
    bad = (700.0, np.zeros_like(x))
    if np.any(theta >= 1.0):
        return bad
    q, p = _polys(theta, omega)
    impulse = np.zeros(n)
    impulse[0] = 1.0
    w = np.arange(n, 0, -1, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        r = lfilter(q, p, impulse)
        s = _workload(r, momentum)
        err = float(np.dot(w, s * s))
    if not math.isfinite(err) or err >= 1e300:
        return bad
    # d err / d r, then / d Q_i and d P_i (i = 1..d)
    g = _workload((2.0 * w * s)[::-1], momentum)[::-1]
    u = lfilter([1.0], p, impulse)            # 1 / P
    y = lfilter([1.0], p, r)                  # Q / P^2
    de_dq, de_dp = _lagged_dots(g, u, d), -_lagged_dots(g, y, d)
    # Q = prod (1 - theta_j x); P = Q + x sum_j omega_j Q_{-j}
    de_dtheta, de_domega = np.zeros(d), np.zeros(d)
    for j in range(d):
        qj = _prod(np.delete(theta, j))                       # Q_{-j}, degree d - 1
        dq = -np.concatenate([[0.0], qj])                     # dQ / dtheta_j
        dp = dq.copy()
        for i in range(d):
            if i != j:
                dp[2:2 + d - 1] -= omega[i] * _prod(np.delete(theta, [i, j]))   # x * omega_i * d Q_{-i} / d theta_j
        de_dtheta[j] = np.dot(de_dq, dq[1:]) + np.dot(de_dp, dp[1:])
        de_domega[j] = np.dot(de_dp, qj)                      # dP / domega_j = x Q_{-j}
    # sensitivity
    powers = theta[None, :] ** np.arange(n - 1)[:, None] if n > 1 else np.zeros((0, d))
    c = np.concatenate([[1.0], powers @ omega])
    v = _minsep_column(c, b, k) if k > 1 else c
    sens2 = float(np.dot(v, v))
    gc = 2.0 * (_minsep_column(v[::-1].copy(), b, k)[::-1] if k > 1 else v)
    g1 = gc[1:]
    ds_domega = powers.T @ g1
    dpow = np.zeros_like(powers)                              # d theta^m / d theta = m theta^(m-1)
    if n > 2:
        dpow[1:] = np.arange(1, n - 1)[:, None] * powers[:-1]
    ds_dtheta = omega * (dpow.T @ g1)
    gtheta = de_dtheta / err + ds_dtheta / sens2
    gomega = de_domega / err + ds_domega / sens2
    ga = gtheta * theta * (1.0 - theta)
    gb = omega * (gomega - np.dot(gomega, omega))
    return math.log(err * sens2), np.concatenate([ga, gb])


@functools.lru_cache(maxsize=64)
def _optimal(n: int, d: int, b: int, k: int, momentum: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if d == 0:
        return (), ()
    from scipy.optimize import minimize
    starts = []
    if d > 1:   # the (d - 1)-buffer optimum plus a slow buffer of small weight
        t0, w0 = map(np.asarray, _optimal(n, d - 1, b, k, momentum))
        starts.append((np.append(t0, 1.0 - 1.0 / max(2.0, math.sqrt(n))), np.append(w0 * 0.95, 0.02)))
    for lo, hi, weight in ((0.0, 1.0, 0.5), (0.25, 1.0, 0.3), (0.0, 0.6, 0.5)):
        tau = np.maximum(1.5, float(n) ** np.linspace(lo + (hi - lo) / (2 * d), hi - (hi - lo) / (2 * d), d))
        starts.append((1.0 - 1.0 / tau, np.full(d, weight / d)))
    best = None
    for t, w in starts:
        res = minimize(_objective, _pack(t, w), args=(d, n, b, k, momentum), jac=True, method="L-BFGS-B",
                       options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
        val = _objective(res.x, d, n, b, k, momentum)[0]
        if best is None or val < best[0]:
            best = (val, res.x)
    assert best is not None  # starts is never empty
    theta, omega = _unpack(best[1], d)
    order = np.argsort(-theta)
    return tuple(map(float, theta[order])), tuple(map(float, omega[order]))


def optimal_blt(steps: int, buffers: int, *, min_separation: int = 1, participations: int | None = 1,
                momentum: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(theta, omega)`` of the ``buffers``-buffer BLT minimising ``sens^2 * ||A C^{-1}||_F^2`` over ``steps`` steps.

    ``min_separation``/``participations`` are the participation schema of :func:`blt_sensitivity` (default:
    single participation); ``momentum = beta`` optimises for SGD with heavy-ball momentum (accuracy only --
    privacy comes from the sensitivity the noise is scaled to, whatever the parameters). Cached.
    The result satisfies ``0 < theta_j < 1``, ``omega_j > 0``, ``sum omega < 1`` (sorted by decreasing ``theta``).

    >>> theta, omega = optimal_blt(64, 2)
    >>> bool(blt_error(theta, omega, 64) * blt_sensitivity(theta, omega, 64) ** 2 < 64 * 65 / 2 / 4)
    True
    """
    from jaxdp.matrix_factorization import _check_momentum
    n = _checks.positive_int("steps", steps)
    d = int(buffers)
    if isinstance(buffers, bool) or d != buffers or d < 0:
        raise ValueError(f"buffers must be a non-negative integer, got {buffers!r}")
    b = _checks.positive_int("min_separation", min_separation)
    k = _participations(n, b, participations)
    t, w = _optimal(n, d, b, k, _check_momentum(momentum))
    return np.array(t, float), np.array(w, float)


# ---------------------------------------------------------------------------------- the noise transform


class BLTNoiseState(NamedTuple):
    """State of :func:`blt_noise`: steps taken, base key (None in secure mode), and per leaf the ``d`` buffers
    ``u_j = sum_{s<t} theta_j^(t-1-s) w_s`` stacked on a leading axis (``d x |params|`` numbers)."""

    count: jax.Array  # type: ignore[assignment]  # the optax name; shadows tuple.count
    key: Any
    buffers: PyTree


def blt_noise(
    *,
    noise_multiplier: float,
    l2_clip_norm: float | PyTree,
    expected_batch_size: float,
    key: jax.Array | int | None = None,
    steps: int,
    buffers: int | None = None,
    theta: Any = None,
    omega: Any = None,
    min_separation: int = 1,
    participations: int | None = None,
    momentum: float = 0.0,
    secure: bool = False,
    trainable: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """BLT noise: ``update_t(S_t) = (S_t + w_t) / E`` with ``w = sens * C^{-1} z``, streamed with ``d`` buffers.

    ``z_t ~ N(0, (sigma C_clip)^2 I)`` is :func:`jaxdp.add_noise`'s draw (key ``fold_in(key, t)``,
    :func:`jaxdp.noise.gaussian_like`); ``w_t = sens * z_t - sum_j omega_j u_j``, ``u_j <- theta_j u_j + w_t``
    (module docstring), with ``sens = blt_sensitivity(theta, omega, steps, min_separation, participations)``.

    MEMORY: ``d x |params|`` numbers of state (the buffers), whatever the number of steps.

    PRIVACY: one Gaussian mechanism with noise multiplier ``sigma`` (:func:`blt_epsilon`) for at most ``steps``
    steps, under the zero-out (add/remove with a fixed participation schema) relation, PROVIDED every example
    takes part at most ``participations`` times, any two at least ``min_separation`` steps apart, in steps fixed
    independently of the data (:class:`jaxdp.sampling.FixedOrderSampler`; ``PrivacyEngine.make_private(
    mechanism="blt")`` does all of this). Defaults are conservative: ``min_separation=1`` and
    ``participations=None`` (as many as the separation allows) assume an example may be in EVERY step.
    Steps beyond ``steps`` are not covered; Poisson sampling gives no amplification here.

    Args:
      noise_multiplier, l2_clip_norm, expected_batch_size, key, secure, trainable: as in :func:`jaxdp.add_noise`
        (keyword-only).
      steps: the horizon ``n``: the sensitivity (and the optimised strategy) are for ``n`` steps.
      buffers: ``d``; the strategy is :func:`optimal_blt` for the schema (cached). Or give ``theta``/``omega``.
      min_separation, participations: the participation schema (see :func:`blt_sensitivity`).
      momentum: optimise the strategy for SGD with this heavy-ball momentum (accuracy only, never privacy).

    >>> import jax.numpy as jnp
    >>> tx = blt_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=8.0, key=0, steps=16,
    ...                buffers=2, min_separation=4)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> state.buffers["w"].shape
    (2, 3)

    Raises:
      ValueError: a negative ``noise_multiplier``, an invalid clip norm, ``expected_batch_size``, ``steps`` or
        ``min_separation``, neither ``buffers`` nor ``theta``/``omega`` (or only one of the two), ``buffers``
        that disagrees with the given ``theta``/``omega``, or no ``key`` without ``secure``.
    """
    sigma = _checks.non_negative("noise_multiplier", noise_multiplier)
    clip = total_clip_norm(l2_clip_norm)
    e = _checks.positive("expected_batch_size", expected_batch_size)
    n = _checks.positive_int("steps", steps)
    sep = _checks.positive_int("min_separation", min_separation)
    k = _participations(n, sep, participations)
    if (theta is None) != (omega is None):
        raise ValueError("give both theta and omega (explicit BLT parameters), or neither (with buffers=)")
    if theta is None:
        if buffers is None:
            raise ValueError("blt_noise needs buffers= (the number of buffers d; the strategy is optimised for "
                             "the horizon) or explicit theta= and omega=")
        t, w = optimal_blt(n, buffers, min_separation=sep, participations=k, momentum=momentum)
    else:
        t, w = _params(theta, omega)
        if buffers is not None and int(buffers) != t.size:
            raise ValueError(f"buffers={buffers} but {t.size} theta/omega values were given")
    d = t.size
    sens = blt_sensitivity(t, w, n, min_separation=sep, participations=k)
    base_key = None if secure else _checks.prng_key(key, "blt_noise")
    std = sigma * clip
    thetas, omegas = [float(v) for v in t], [float(v) for v in w]

    def init_fn(params):
        return BLTNoiseState(count=jnp.zeros([], jnp.int32), key=base_key, buffers=noise_buffers(params, d))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        z = step_noise(state.key, state.count, updates, std, secure, trainable)
        bufs = treedef.flatten_up_to(state.buffers)
        out, new_bufs = [], []
        for g, zi, u in zip(leaves, z, bufs):
            if zi is None:
                new_bufs.append(u)
            else:
                wt = jnp.asarray(sens, u.dtype) * zi.astype(u.dtype)
                for j in range(d):       # w_t = sens z_t - sum_j omega_j u_j
                    wt = wt - jnp.asarray(omegas[j], u.dtype) * u[j]
                new_bufs.append(jnp.stack([jnp.asarray(thetas[j], u.dtype) * u[j] + wt for j in range(d)])
                                if d else u)
                g = g + wt.astype(g.dtype)
            out.append(g / jnp.asarray(e, dtype=g.dtype))
        new_state = BLTNoiseState(count=optax.safe_increment(state.count), key=state.key,
                                  buffers=jax.tree_util.tree_unflatten(treedef, new_bufs))
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def blt_epsilon(noise_multiplier: float, delta: float, *, accountant: str = "prv",
                neighboring_relation: str = "add_remove") -> float:
    """Epsilon at ``delta`` of a BLT run within its horizon: ONE Gaussian mechanism with noise multiplier ``sigma``
    (the noise is scaled to the sensitivity of the whole participation schema). Zero-out neighbours = add/remove
    with a fixed participation schema; replace-one is refused (it would double the sensitivity).

    >>> round(blt_epsilon(1.0, 1e-5, accountant="pld"), 3)
    4.377
    """
    from jaxdp import accounting
    return accounting.events_epsilon(
        [{"sampling": "fixed_order", "mechanism": "blt", "min_separation": 1, "horizon": 1,
          "noise_multiplier": noise_multiplier, "steps": 1}], delta, accountant, neighboring_relation)


__all__ = ["BLTNoiseState", "blt_noise", "blt_coefficients", "blt_matrix", "blt_sensitivity", "blt_error",
           "inverse_coefficients", "optimal_blt", "blt_epsilon"]
