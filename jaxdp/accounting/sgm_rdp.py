"""Exact Renyi DP of the Poisson-subsampled Gaussian mechanism, at integer and fractional orders.

The sampled Gaussian mechanism (SGM) releases ``sum_{i in B} f(x_i) + N(0, sigma^2 I)`` with ``||f(x)|| <= 1``
and each example in the batch ``B`` independently with probability ``q``. Under the add/remove-one relation
its RDP at order ``alpha > 1`` is (Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled
Gaussian Mechanism", arXiv:1908.10530, sections 3.2-3.3)::

    rdp(alpha) = log(A_alpha) / (alpha - 1),   A_alpha = E_{z ~ mu_0} [((1 - q) + q mu_1(z) / mu_0(z))^alpha]

with ``mu_0 = N(0, sigma^2)``, ``mu_1 = N(1, sigma^2)``. Writing ``C(alpha, k)`` for the (generalised) binomial
coefficient ``Gamma(alpha + 1) / (Gamma(k + 1) Gamma(alpha - k + 1))`` and ``Phi`` for the standard normal CDF:

* integer ``alpha``: the binomial theorem gives the finite sum
  ``A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))``;
* fractional ``alpha``: split the integral at ``z0 = sigma^2 log(1/q - 1) + 1/2`` (where ``q mu_1 = (1 - q)
  mu_0``) and expand each half in the binomial series that converges there::

      A_alpha = sum_{k>=0} C(alpha, k) (1 - q)^(alpha - k) q^k   exp((k^2 - k) / (2 sigma^2))  Phi((z0 - k) / sigma)
              + sum_{k>=0} C(alpha, k) (1 - q)^k q^(alpha - k)   exp((j^2 - j) / (2 sigma^2))  Phi((j - z0) / sigma),
                                                                                     j = alpha - k.

  ``C(alpha, k)`` is negative for every other ``k > alpha``, so both series have SIGNED terms. This module sums
  them with their signs (in log space, ``scipy.special.logsumexp`` with ``b = signs``); dp-accounting 0.6 sums
  their absolute values instead, a looser bound, and gives up (drops the order) when that fails to converge.

Truncation is rigorous, and errs on the safe side. Using that the Gaussian Mills ratio ``Phi(x) / phi(x)`` is
increasing, one checks that in both series ``|term_{k+1}| <= |term_k| (|alpha - k| / (k + 1))``: for
``k >= ceil(alpha)`` the combined terms alternate in sign with decreasing magnitude. A partial sum that ends on
a positive term with ``k >= ceil(alpha)`` is therefore an UPPER bound on ``A_alpha`` (the remainder lies in
``[term_{k+1}, 0]``), too large by at most ``|term_{k+1}|``. We stop at such a ``k`` once the term is below
``1e-14`` relative (``A_alpha >= 1``), so the reported RDP is never below the exact value and above it by at most
``~1e-14 / (alpha - 1)`` (plus rounding).

The same numbers are what Opacus and TF Privacy report (they also sum the signed series, to a relative term size
of ``e^-30``); this is an independent implementation from the paper's formulas, vectorised over orders and terms
with numpy/scipy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting import privacy_accountant as pa
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

#: Orders of Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` (TF Privacy's differ: ``core.TF_PRIVACY_ORDERS``).
OPACUS_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
#: Orders of jaxdp's ``"rdp"`` accountant: Opacus's, plus four large ones for the high-noise regime (there
#: Opacus's optimum is its largest order 63 and it warns to add more). Whenever Opacus's optimal order is not
#: its largest, the epsilon is Opacus's (the extra orders can only lower epsilon).
DEFAULT_ORDERS = OPACUS_ORDERS + (128, 256, 512, 1024)

#: Relative size of the first omitted term at which the fractional-order series stop (``A_alpha >= 1``).
SERIES_TOL = 1e-14
_LOG_TOL = math.log(SERIES_TOL)
#: Largest number of series terms per fractional order. Not reached in practice (the terms decay at least like
#: ``k^-(alpha + 1)``); if it were, the partial sum taken is still an upper bound, only a looser one.
MAX_TERMS = 1 << 20


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    a = np.asarray(orders, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 1.0):
        raise ValueError(f"RDP orders must be finite numbers > 1, got {list(orders)!r}")
    return a


def _log_binom(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``log C(n, k)`` for integers ``0 <= k <= n``."""
    return special.gammaln(n + 1.0) - special.gammaln(k + 1.0) - special.gammaln(n - k + 1.0)


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """``log A_alpha`` for integer orders: the finite binomial sum, in log space."""
    n = int(alphas.max())
    k = np.arange(n + 1, dtype=np.float64)[None, :]
    a = alphas[:, None]
    valid = k <= a
    kk = np.where(valid, k, 0.0)
    log_c = _log_binom(a, kk)
    log_terms = log_c + kk * math.log(q) + (a - kk) * math.log1p(-q) + (kk * kk - kk) / (2.0 * sigma ** 2)
    return special.logsumexp(np.where(valid, log_terms, -np.inf), axis=1)


def _signed_logsumexp(log_abs: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ``log |sum sign * exp(log_abs)|`` and the sign of the sum (max-shifted)."""
    m = np.max(log_abs, axis=1, keepdims=True)
    total = np.sum(sign * np.exp(log_abs - m), axis=1)
    with np.errstate(divide="ignore"):
        return m[:, 0] + np.log(np.abs(total)), np.sign(total)


def _frac_terms(q: float, sigma: float, alpha: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Log magnitude and sign of the combined terms ``k = lo .. hi-1`` of the two series, one row per order."""
    a = alpha[:, None]
    k = np.arange(lo, hi, dtype=np.float64)[None, :]
    # log|C(alpha, k)|: gammaln at k = lo, then the ratio |C(alpha, k+1) / C(alpha, k)| = |alpha - k| / (k + 1).
    log_c0 = special.gammaln(a + 1.0) - special.gammaln(lo + 1.0) - special.gammaln(a - lo + 1.0)
    ratio = np.log(np.abs(a - k[:, :-1])) - np.log1p(k[:, :-1])
    log_c = log_c0 + np.concatenate((np.zeros_like(a), np.cumsum(ratio, axis=1)), axis=1)
    # C(alpha, k) > 0 for k <= ceil(alpha), then alternates: sign (-1)^(k - ceil(alpha)).
    first_alt = np.ceil(a)
    sign = np.where((k <= first_alt) | ((k - first_alt) % 2 == 0), 1.0, -1.0)
    z0 = sigma ** 2 * (math.log1p(-q) - math.log(q)) + 0.5
    j = a - k
    lq, l1q, inv2s2 = math.log(q), math.log1p(-q), 0.5 / sigma ** 2
    t1 = k * lq + j * l1q + (k * k - k) * inv2s2 + special.log_ndtr((z0 - k) / sigma)
    t2 = j * lq + k * l1q + (j * j - j) * inv2s2 + special.log_ndtr((j - z0) / sigma)
    return log_c + np.logaddexp(t1, t2), sign


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """``log A_alpha`` for fractional orders: the signed series, stopped on a positive term (an upper bound).

    Terms are computed in chunks ``[lo, hi)`` of growing size for all orders not yet converged; the running sum
    ``S`` over ``[0, lo)`` is kept in log space (it never nears 0: cancellation is at most 2x). For each order
    the value returned is the partial sum through the last positive term ``e >= ceil(alpha)`` of the chunk,
    once its successor satisfies ``|t_{e+1}| <= tol * S``.
    """
    out = np.empty_like(alphas)
    pending = np.arange(alphas.size)
    log_s = np.full(alphas.size, -np.inf)
    sign_s = np.ones(alphas.size)
    first_alt = np.ceil(alphas).astype(np.int64)
    lo, hi = 0, max(64, 2 * int(first_alt.max()) + 8)
    while pending.size:
        log_t, sign = _frac_terms(q, sigma, alphas[pending], lo, hi)
        rows = np.arange(pending.size)
        e = np.where((hi - 2 - first_alt[pending]) % 2 == 0, hi - 2, hi - 3)   # last positive term, + successor
        in_head = np.arange(lo, hi)[None, :] <= e[:, None]
        head, head_sign = _signed_logsumexp(
            np.column_stack((np.where(in_head, log_t, -np.inf), log_s[pending])),
            np.column_stack((sign, sign_s[pending])))
        if np.any(head_sign <= 0):   # impossible in exact arithmetic (A >= 1, cancellation at most 2x)
            raise FloatingPointError(f"RDP series lost all precision at q={q}, sigma={sigma}")
        done = (log_t[rows, e - lo + 1] <= head + _LOG_TOL) | (hi >= MAX_TERMS)
        out[pending[done]] = head[done]
        keep = ~done
        log_s[pending[keep]], sign_s[pending[keep]] = _signed_logsumexp(
            np.column_stack((log_t[keep], log_s[pending[keep]])), np.column_stack((sign[keep], sign_s[pending[keep]])))
        pending = pending[keep]
        lo, hi = hi, min(4 * hi, MAX_TERMS)
    return out


def compute_rdp_poisson_gaussian(sample_rate: float, noise_multiplier: float,
                                 orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP at each order of ONE step of the Poisson-subsampled Gaussian mechanism (add/remove relation).

    Args:
      sample_rate: ``q`` in ``[0, 1]``, the probability that an example is in the batch.
      noise_multiplier: ``sigma >= 0``, noise std over the L2 sensitivity (the clipping norm).
      orders: RDP orders ``alpha > 1``, integer or fractional.

    Returns ``rdp[i] = log(A_alpha) / (alpha - 1)`` as a float64 array (see the module docstring); ``T`` steps
    compose to ``T * rdp``. ``q = 0`` gives 0; ``sigma = 0`` (with ``q > 0``) gives ``inf``; ``q = 1`` is the
    plain Gaussian mechanism, ``alpha / (2 sigma^2)``.
    """
    q, sigma = float(sample_rate), float(noise_multiplier)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample_rate must lie in [0, 1], got {sample_rate!r}")
    if not (sigma >= 0.0):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    alphas = _check_orders(orders)
    if q == 0.0 or math.isinf(sigma):
        return np.zeros_like(alphas)
    if sigma == 0.0:
        return np.full_like(alphas, np.inf)
    if q == 1.0:
        return alphas / (2.0 * sigma ** 2)
    log_a = np.empty_like(alphas)
    is_int = alphas == np.round(alphas)
    if is_int.any():
        log_a[is_int] = _log_a_integer(q, sigma, alphas[is_int])
    if not is_int.all():
        log_a[~is_int] = _log_a_fractional(q, sigma, alphas[~is_int])
    # A_alpha >= 1 exactly; rounding can only bring log A a hair below 0 when the RDP is ~1e-16.
    return np.maximum(log_a, 0.0) / (alphas - 1.0)


class ExactRdpAccountant(rdp_privacy_accountant.RdpAccountant):
    """dp-accounting's :class:`RdpAccountant` with the exact signed-series RDP of the (Poisson-sampled) Gaussian.

    ``GaussianDpEvent`` and ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (add/remove relation) are
    accounted with :func:`compute_rdp_poisson_gaussian`; every other event (sampling without replacement,
    Laplace, ...) and the conversion to ``(epsilon, delta)`` (Balle et al. 2020, Proposition 12 / Canonne et al.
    2020: ``eps = rdp + log1p(-1/alpha) - log(delta alpha) / (alpha - 1)``, the conversion Opacus uses) are
    dp-accounting's. Default orders: :data:`DEFAULT_ORDERS`.
    """

    def __init__(self, orders: Sequence[float] | None = None,
                 neighboring_relation: pa.NeighboringRelation = pa.NeighboringRelation.ADD_OR_REMOVE_ONE):
        orders = DEFAULT_ORDERS if orders is None else orders
        _check_orders(orders)
        super().__init__(list(orders), neighboring_relation)

    def _maybe_compose(self, event: dpe.DpEvent, count: int, do_compose: bool):
        if isinstance(event, dpe.GaussianDpEvent):
            if do_compose:
                self._rdp += count * compute_rdp_poisson_gaussian(1.0, event.noise_multiplier, self._orders)
            return None
        if (isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(event.event, dpe.GaussianDpEvent)
                and self._neighboring_relation is pa.NeighboringRelation.ADD_OR_REMOVE_ONE):
            if do_compose:
                self._rdp += count * compute_rdp_poisson_gaussian(
                    event.sampling_probability, event.event.noise_multiplier, self._orders)
            return None
        return super()._maybe_compose(event, count, do_compose)


__all__ = ["DEFAULT_ORDERS", "OPACUS_ORDERS", "ExactRdpAccountant", "compute_rdp_poisson_gaussian"]
