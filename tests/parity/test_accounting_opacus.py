"""jaxdp.accounting against the installed Opacus (skipped without it)."""
from __future__ import annotations

import pytest

opacus_accountants = pytest.importorskip("opacus.accountants")
from opacus.accountants.analysis import rdp as opacus_rdp  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

from jaxdp import accounting as acct  # noqa: E402

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


@pytest.mark.parametrize("sigma,q,steps", [(1.5, 0.04, 2250), (1.1, 256 / 60000, 14063), (0.8, 0.01, 500)])
def test_rdp_vs_opacus(sigma, q, steps):
    ours = acct.compute_epsilon(sigma, q, steps, DELTA, "rdp")
    theirs = _opacus_rdp(sigma, q, steps)
    # dp-accounting sums |terms| of the fractional-order series (an upper bound); Opacus the signed terms.
    assert theirs * (1 - 1e-9) <= ours <= theirs * (1 + 1e-4)
    # At integer orders both use the same closed form: agreement to 1e-6 relative.
    orders = list(range(2, 64))
    o_eps, _ = opacus_rdp.get_privacy_spent(
        orders=orders, rdp=opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders),
        delta=DELTA)
    import dp_accounting as dpa
    a = dpa.rdp.RdpAccountant(orders)
    a.compose(acct.to_dp_event({"sampling": "poisson", "noise_multiplier": sigma, "sample_rate": q,
                                "steps": steps}))
    assert a.get_epsilon(DELTA) == pytest.approx(o_eps, rel=1e-6)


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
