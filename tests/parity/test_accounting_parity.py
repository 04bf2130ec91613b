"""Accounting parity with Opacus 1.6 over a grid of (sigma, q, steps, delta).

* RDP: Opacus and dp-accounting (behind jaxdp's "rdp") use the same orders (1.1..10.9 step 0.1, 12..63) and
  the same RDP -> (eps, delta) conversion. At integer orders the per-order RDP is the same closed form, and
  the epsilon agrees to 1e-6 relative. With all orders, jaxdp's epsilon equals Opacus's to 1e-6 relative on
  10 of the 16 grid points; on the other 6 (larger q) dp-accounting's fractional-order series (absolute values
  of the binomial terms, and non-convergence at alpha 1.1-1.3 for sigma 0.8, q 0.05) gives a larger epsilon,
  by up to 3.4 % -- never a smaller one. Those are strict xfails, documented in docs/parity.md.
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


# Grid points where jaxdp's RDP epsilon differs from Opacus's by more than 1e-6 relative (measured):
# dp-accounting's fractional-order series (|terms|, and no convergence at alpha 1.1-1.3 for sigma 0.8, q 0.05,
# which drops those orders) gives a LARGER epsilon: +3.0e-4 / +3.8e-4 (sigma 0.8, q 0.05, 100 steps),
# +3.4e-2 / +1.8e-2 (sigma 0.8, q 0.05, 3000 steps), +3.9e-5 / +1.0e-4 (sigma 1.5, q 0.05, 3000 steps).
# Strict xfail: if jaxdp.accounting starts matching Opacus there, these turn into failures to be removed.
_KNOWN_FRACTIONAL_GAP = {(0.8, 0.05, 100, 1e-5), (0.8, 0.05, 100, 1e-6), (0.8, 0.05, 3000, 1e-5),
                         (0.8, 0.05, 3000, 1e-6), (1.5, 0.05, 3000, 1e-5), (1.5, 0.05, 3000, 1e-6)}
_GAP_REASON = ("dp-accounting's fractional-order RDP series is a looser upper bound than Opacus's signed series "
               "(jaxdp is conservative); see docs/parity.md")
EQ_GRID = [pytest.param(*g, marks=pytest.mark.xfail(strict=True, reason=_GAP_REASON))
           if g in _KNOWN_FRACTIONAL_GAP else g for g in GRID]


@pytest.mark.parametrize("sigma,q,steps,delta", EQ_GRID)
def test_rdp_epsilon_equals_opacus_to_1e6(sigma, q, steps, delta):
    ours = accounting.compute_epsilon(sigma, q, steps, delta, accountant="rdp")
    assert ours == pytest.approx(opacus_rdp_eps(sigma, q, steps, delta), rel=1e-6)


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_rdp_never_below_opacus_and_equal_at_integer_orders(sigma, q, steps, delta):
    import dp_accounting as dpa

    ours = accounting.compute_epsilon(sigma, q, steps, delta, accountant="rdp")
    theirs = opacus_rdp_eps(sigma, q, steps, delta)
    assert ours >= theirs * (1 - 1e-9), (ours, theirs)   # never less private than Opacus claims
    assert ours <= theirs * 1.05, (ours, theirs)         # and the known gap stays below 5 %
    # Integer orders 2..63: the same closed form in both libraries, 1e-6 relative (measured <= 2e-14).
    acc = dpa.rdp.RdpAccountant(INTEGER_ORDERS)
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert acc.get_epsilon(delta) == pytest.approx(opacus_rdp_eps(sigma, q, steps, delta, INTEGER_ORDERS),
                                                   rel=1e-6)


def test_rdp_reference_point_equals_opacus_to_1e6_where_optimal_order_is_shared():
    # MNIST setting (DESIGN.md): q = 256/60000, sigma 1.1, 14063 steps -> 2.5967 in both (3e-10 relative).
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
