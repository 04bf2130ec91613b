"""jaxdp.accounting against the installed Opacus (the parity extra, installed by `make test`)."""
from __future__ import annotations

import warnings

import opacus.accountants as opacus_accountants
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

from jaxdp import accounting as acct

DELTA = 1e-5


def _opacus_prv(sigma, q, steps):
    a = opacus_accountants.PRVAccountant()
    a.history = [(sigma, q, steps)]
    return a.get_epsilon(DELTA)


def _opacus_rdp(sigma, q, steps):
    a = opacus_accountants.RDPAccountant()
    a.history = [(sigma, q, steps)]
    return a.get_epsilon(DELTA)


@pytest.mark.parametrize("sigma,q,steps", [(1.5, 0.04, 2249), (1.1, 256 / 60000, 14063), (1.0, 1.0, 1)])
def test_prv_matches_opacus_within_its_error(sigma, q, steps):
    ours = acct.compute_epsilon(sigma, q, steps, DELTA, "prv")
    assert ours == pytest.approx(_opacus_prv(sigma, q, steps), abs=0.01)   # PRV's eps_error


@pytest.mark.parametrize("sigma,q,steps", [(1.5, 0.04, 2250), (1.1, 256 / 60000, 14063), (0.8, 0.01, 500),
                                            (0.8, 0.05, 3000), (0.6, 0.2, 50)])
def test_rdp_vs_opacus(sigma, q, steps):
    # Both compute the exact RDP of the Poisson-sampled Gaussian (signed series at fractional orders) on the same
    # orders with the same conversion: equal epsilon (measured <= 1e-11 relative).
    ours = acct.compute_epsilon(sigma, q, steps, DELTA, "rdp")
    assert ours == pytest.approx(_opacus_rdp(sigma, q, steps), rel=1e-6)
    # Per order, on Opacus's orders: the RDP itself (measured <= 5e-9 relative, Opacus's truncation/rounding).
    orders = list(acct.sgm_rdp.OPACUS_ORDERS)
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    assert acct.compute_rdp_poisson_gaussian(q, sigma, orders) * steps == pytest.approx(theirs, rel=1e-7)


def test_rdp_extra_large_orders_only_help_where_opacus_asks_for_them():
    # sigma 60, one full-batch step: Opacus's optimum is its largest order 63 and it warns to expand the orders.
    # jaxdp's extra orders 128..1024 give a smaller (valid) epsilon there; Opacus's orders alone give Opacus's.
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        theirs = _opacus_rdp(60.0, 1.0, 1)
    assert any("largest alpha" in str(x.message) for x in w)
    assert acct.compute_epsilon(60.0, 1.0, 1, DELTA, "rdp") < 0.6 * theirs   # 0.055 (order 256) vs 0.112
    only_opacus_orders = acct.ExactRdpAccountant(acct.sgm_rdp.OPACUS_ORDERS)
    assert only_opacus_orders.compose(acct.to_dp_event({"sampling": "poisson", "noise_multiplier": 60.0,
                                                        "sample_rate": 1.0, "steps": 1})).get_epsilon(DELTA) == \
        pytest.approx(theirs, rel=1e-12)


def test_calibration_never_larger_than_opacus_rdp():
    for eps, q, epochs in [(8.0, 0.04, 90), (3.0, 0.01, 20), (1.0, 0.02, 5)]:
        ours = acct.calibrate_noise_multiplier(eps, DELTA, q, epochs=epochs, accountant="rdp")
        theirs = get_noise_multiplier(target_epsilon=eps, target_delta=DELTA, sample_rate=q, epochs=epochs,
                                      accountant="rdp")
        assert ours <= theirs


@pytest.mark.slow
def test_calibration_never_larger_than_opacus_prv():
    ours = acct.calibrate_noise_multiplier(8.0, DELTA, 0.04, epochs=90, accountant="prv")
    theirs = get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=0.04, epochs=90,
                                  accountant="prv")
    assert ours <= theirs == 1.34765625
