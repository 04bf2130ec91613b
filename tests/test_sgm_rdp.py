"""jaxdp.accounting.sgm_rdp: exact RDP of the Poisson-sampled Gaussian (Mironov, Talwar, Zhang 2019).

Independent of Opacus (the comparison with it is tests/parity/test_accounting_parity.py). Checked against:
closed forms (q = 1, sigma = 0, q = 0), numerical integration of the defining integral, continuity across the
integer/fractional boundary, monotonicity in the order, and dp-accounting (equal at integer orders, never above
its absolute-value bound at fractional ones).
"""
from __future__ import annotations

import logging
import math
import time

import dp_accounting as dpa
import numpy as np
import pytest
from scipy import integrate, stats

from jaxdp import accounting as acct
from jaxdp.accounting import sgm_rdp

SETTINGS = [(0.8, 0.05), (1.5, 0.04), (1.1, 256 / 60000), (0.5, 0.3), (4.0, 0.01), (10.0, 0.5)]
ORDERS = np.asarray(sgm_rdp.DEFAULT_ORDERS, dtype=float)


def test_closed_forms():
    orders = [1.5, 2.0, 3.7, 12, 1024]
    # q = 1: the plain Gaussian mechanism, alpha / (2 sigma^2).
    np.testing.assert_allclose(sgm_rdp.compute_rdp_poisson_gaussian(1.0, 1.3, orders),
                               np.asarray(orders) / (2 * 1.3 ** 2), rtol=1e-15)
    # sigma = 0 releases the sum in the clear; q = 0 never looks at the data.
    assert np.all(np.isinf(sgm_rdp.compute_rdp_poisson_gaussian(0.01, 0.0, orders)))
    assert np.all(sgm_rdp.compute_rdp_poisson_gaussian(0.0, 1.0, orders) == 0.0)
    # and through the accountants
    assert acct.compute_epsilon(0.0, 0.01, 10, 1e-5, "rdp") == math.inf
    assert acct.compute_epsilon(1.0, 1.0, 1, 1e-5, "rdp") == pytest.approx(4.728507067217623, rel=1e-12)


@pytest.mark.parametrize("sigma,q", [(0.8, 0.05), (1.5, 0.04), (0.5, 0.3), (4.0, 0.01)])
def test_matches_numerical_integration(sigma, q):
    # A_alpha = E_{z ~ N(0, sigma^2)} [((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha], integrated by adaptive
    # quadrature (split at z0, where the two series are glued). Measured max relative difference over these
    # orders: 5e-12, 9e-11, 7e-15, 1.2e-9 (the last limited by quad: A - 1 ~ 1e-4 there). dp-accounting's
    # absolute-value series is 11-18 % off (or inf) on the same orders, so the bound 1e-8 discriminates.
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    orders = [1.1, 1.5, 2.0, 2.5, 3.9, 7.3, 10.9, 20]

    def log_a(alpha):
        def log_f(z):   # log of mu_0(z) ((1 - q) + q mu_1(z) / mu_0(z))^alpha
            return stats.norm.logpdf(z, scale=sigma) + alpha * np.logaddexp(
                math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma ** 2))

        shift = float(np.max(log_f(np.linspace(-10 * sigma, z0 + alpha + 10 * sigma, 4001))))   # no overflow
        parts = [integrate.quad(lambda z: math.exp(log_f(z) - shift), lo, hi, epsabs=0, epsrel=1e-13, limit=200)[0]
                 for lo, hi in ((-np.inf, z0), (z0, z0 + 40 * sigma), (z0 + 40 * sigma, np.inf))]
        return shift + math.log(sum(parts))

    expected = np.array([log_a(a) / (a - 1) for a in orders])
    np.testing.assert_allclose(sgm_rdp.compute_rdp_poisson_gaussian(q, sigma, orders), expected, rtol=1e-8)


@pytest.mark.parametrize("sigma,q", SETTINGS)
def test_monotone_in_order_and_continuous_across_integers(sigma, q):
    rdp = sgm_rdp.compute_rdp_poisson_gaussian(q, sigma, ORDERS)
    assert np.all(np.isfinite(rdp)) and np.all(rdp > 0)
    # Renyi divergence is non-decreasing in the order (fractional and integer orders interleaved).
    assert np.all(np.diff(rdp) >= -1e-12 * rdp[1:]), np.min(np.diff(rdp))
    # The fractional series just below/above an integer order meets the finite binomial sum at it.
    for n in (2, 3, 5, 11):
        near = sgm_rdp.compute_rdp_poisson_gaussian(q, sigma, [n - 1e-7, n, n + 1e-7])
        np.testing.assert_allclose(near, near[1], rtol=1e-5)
        assert near[0] <= near[1] * (1 + 1e-12) and near[1] <= near[2] * (1 + 1e-12)


@pytest.mark.parametrize("sigma,q", SETTINGS)
def test_vs_dp_accounting(sigma, q):
    ours = sgm_rdp.compute_rdp_poisson_gaussian(q, sigma, ORDERS)
    theirs = dpa.rdp.RdpAccountant(ORDERS).compose(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))).rdp
    integer = ORDERS == np.round(ORDERS)
    # Integer orders: the same finite sum.
    np.testing.assert_allclose(ours[integer], theirs[integer], rtol=1e-12)
    # Fractional orders: dp-accounting sums |terms| (an upper bound, inf where it gives up): never below ours
    # beyond rounding (where its series does converge at high orders the two agree to ~1e-12 relative).
    assert np.all(ours[~integer] <= theirs[~integer] * (1 + 1e-10))


def test_no_dp_accounting_convergence_warnings(caplog):
    # dp-accounting's fractional series fails to converge at sigma 0.8, q 0.05, orders 1.1-1.3 (absl warning,
    # order dropped). jaxdp's "rdp" no longer takes that path.
    with caplog.at_level(logging.WARNING):
        acct.compute_epsilon(0.8, 0.05, 3000, 1e-5, "rdp")
        acct.compute_dp_sgd_privacy(n=1000, batch_size=50, noise_multiplier=0.8, epochs=150, delta=1e-5)
    assert not [r for r in caplog.records if "converge" in r.getMessage()]


def test_fast_for_long_runs():
    t0 = time.perf_counter()
    eps = acct.compute_epsilon(1.1, 256 / 60000, 100_000, 1e-5, "rdp")
    elapsed = time.perf_counter() - t0
    assert eps == pytest.approx(7.835187, abs=1e-5)
    assert elapsed < 1.0   # measured ~5 ms; generous for a shared 2-core machine


def test_accountant_keeps_dp_accounting_for_other_events():
    wor = dpa.SampledWithoutReplacementDpEvent(1000, 10, dpa.GaussianDpEvent(0.5))
    relation = dpa.NeighboringRelation.REPLACE_ONE
    ours = sgm_rdp.ExactRdpAccountant(neighboring_relation=relation).compose(wor, 100)
    theirs = dpa.rdp.RdpAccountant(sgm_rdp.DEFAULT_ORDERS, relation).compose(wor, 100)
    np.testing.assert_array_equal(ours.rdp, theirs.rdp)
    assert isinstance(acct.make_dp_accountant("rdp"), dpa.rdp.RdpAccountant)
    # Composition: T steps are T times one step; a ComposedDpEvent of both kinds adds up.
    one = sgm_rdp.compute_rdp_poisson_gaussian(0.02, 1.2, sgm_rdp.DEFAULT_ORDERS)
    a = sgm_rdp.ExactRdpAccountant().compose(
        dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(1.2)), 7),
                             dpa.GaussianDpEvent(3.0)]))
    np.testing.assert_allclose(a.rdp, 7 * one + ORDERS / (2 * 9.0), rtol=1e-14)


def test_bad_orders():
    for orders in ([], [1.0], [0.5, 2], [float("nan")]):
        with pytest.raises(ValueError, match="orders"):
            sgm_rdp.compute_rdp_poisson_gaussian(0.1, 1.0, orders)
    with pytest.raises(ValueError, match="sample_rate"):
        sgm_rdp.compute_rdp_poisson_gaussian(1.5, 1.0, [2])
    with pytest.raises(ValueError, match="noise_multiplier"):
        sgm_rdp.compute_rdp_poisson_gaussian(0.1, -1.0, [2])
