"""Accounting parity with Opacus 1.6 over a grid of (sigma, q, steps, delta).

* RDP: jaxdp's "rdp" computes the exact RDP of the Poisson-sampled Gaussian (signed series at fractional
  orders, Mironov, Talwar, Zhang 2019, section 3.3), as Opacus does, on Opacus's orders (1.1..10.9 step 0.1,
  12..63; jaxdp adds 128..1024, which only matter where Opacus's optimum is its largest order), with the same
  RDP -> (eps, delta) conversion. Its epsilon must equal Opacus's to 1e-6 relative on the whole grid (measured:
  <= 1.1e-11). dp-accounting's own fractional-order series (absolute values of the terms, and no convergence at
  alpha 1.1-1.3 for sigma 0.8, q 0.05) is not used for Poisson sampling any more.
* PRV: jaxdp's "prv" (Opacus semantics on dp-accounting's PLD numerics) must lie inside Opacus's own error
  interval: its estimate (ours - eps_error) within [eps_lower, eps_upper] of Opacus's discrete PRV, and the
  reported value within eps_error = 0.01 of Opacus's reported eps_upper.
* Calibration: jaxdp's sigma reaches epsilon <= target and is never above Opacus's get_noise_multiplier.

Opacus is imported unconditionally: `make test` installs it (the parity extra).
"""
import itertools

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier

from jaxdp import accounting
from parity_harness import opacus_prv_interval, opacus_rdp_eps

GRID = list(itertools.product((0.8, 1.5), (0.004, 0.05), (100, 3000), (1e-5, 1e-6)))
INTEGER_ORDERS = list(range(2, 64))


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_rdp_epsilon_equals_opacus_to_1e6(sigma, q, steps, delta):
    ours = accounting.compute_epsilon(sigma, q, steps, delta, accountant="rdp")
    assert ours == pytest.approx(opacus_rdp_eps(sigma, q, steps, delta), rel=1e-6)


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_rdp_equal_to_opacus_at_integer_orders_with_dp_accounting(sigma, q, steps, delta):
    import dp_accounting as dpa

    # Integer orders 2..63: dp-accounting's closed form, Opacus's and ours agree (measured <= 2e-14).
    acc = dpa.rdp.RdpAccountant(INTEGER_ORDERS)
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    theirs = opacus_rdp_eps(sigma, q, steps, delta, INTEGER_ORDERS)
    assert acc.get_epsilon(delta) == pytest.approx(theirs, rel=1e-6)
    ours = accounting.ExactRdpAccountant(INTEGER_ORDERS).compose(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert ours.get_epsilon(delta) == pytest.approx(theirs, rel=1e-6)


def test_rdp_reference_point_equals_opacus_to_1e6_where_optimal_order_is_shared():
    # MNIST setting (docs/privacy.md): q = 256/60000, sigma 1.1, 14063 steps -> 2.5967 in both (3e-10 relative).
    ours = accounting.compute_epsilon(1.1, 256 / 60000, 14063, 1e-5, accountant="rdp")
    assert ours == pytest.approx(opacus_rdp_eps(1.1, 256 / 60000, 14063, 1e-5), rel=1e-6)


PRV_GRID = [(0.8, 0.05, 100, 1e-5), (1.5, 0.004, 3000, 1e-6), (1.1, 256 / 60000, 14063, 1e-5),
            (1.5, 0.04, 2250, 1e-5)]


@pytest.mark.parametrize("sigma,q,steps,delta", PRV_GRID)
def test_prv_within_opacus_error_bounds(sigma, q, steps, delta):
    lower, estimate, upper = opacus_prv_interval(sigma, q, steps, delta)
    ours = accounting.compute_epsilon(sigma, q, steps, delta, accountant="prv")
    eps_error = 0.01
    assert abs(ours - upper) <= eps_error, (ours, upper)
    assert lower <= ours - eps_error <= upper, (ours - eps_error, lower, upper)


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.04, 2250), (3.0, 0.01, 2000), (1.0, 0.02, 250)])
def test_rdp_calibration_reaches_target_with_no_more_noise_than_opacus(target, q, steps):
    delta = 1e-5
    ours = accounting.calibrate_noise_multiplier(target, delta, q, steps=steps, accountant="rdp")
    theirs = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                  accountant="rdp")
    assert accounting.compute_epsilon(ours, q, steps, delta, accountant="rdp") <= target
    assert ours <= theirs


def test_prv_calibration_reaches_target_with_no_more_noise_than_opacus():
    target, delta, q, steps = 2.0, 1e-5, 0.02, 200
    ours = accounting.calibrate_noise_multiplier(target, delta, q, steps=steps, accountant="prv")
    theirs = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                  accountant="prv")
    assert accounting.compute_epsilon(ours, q, steps, delta, accountant="prv") <= target
    assert ours <= theirs
    # and Opacus's own accountant agrees that jaxdp's sigma meets the target within its eps_error
    acc = PRVAccountant()
    acc.history = [(ours, q, steps)]
    assert acc.get_epsilon(delta) <= target + 0.01
