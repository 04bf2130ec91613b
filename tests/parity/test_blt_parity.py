"""BLT parity with jax-privacy 2.0's ``matrix_factorization.buffered_toeplitz`` (a test-only oracle; our code is our
own). Same BLT parameters -> the same Toeplitz coefficients, inverse, single-participation sensitivity (its closed
form, Dvijotham et al. Lemma 5.3), min-separation sensitivity (its Toeplitz theorem) and summed prefix-sum error;
and (slow) our optimiser reaches the loss of ``buffered_toeplitz.optimize``.

jax-privacy 2.0 pins newer jax/flax than jaxdp's tests, so it is installed without dependencies
(``pip install --no-deps jax-privacy==2.0.0``); the tests skip, saying so, where it is not importable.
"""
import math

import jax
import numpy as np
import pytest

from jaxdp import blt

try:
    from jax_privacy.matrix_factorization import buffered_toeplitz as jp_bt
    from jax_privacy.matrix_factorization import toeplitz as jp_tp
except Exception as err:  # noqa: BLE001 -- any import failure means: no oracle here
    pytestmark = pytest.mark.skip(reason=f"jax_privacy is not importable ({type(err).__name__}: {err}); install "
                                         "it with `pip install --no-deps jax-privacy==2.0.0`")

CASES = [(np.array([0.95, 0.6]), np.array([0.2, 0.25])), (np.array([0.99, 0.8, 0.3]), np.array([0.05, 0.2, 0.3])),
         (np.array([0.7]), np.array([0.5]))]


def _jp(theta, omega):
    return jp_bt.BufferedToeplitz.build(buf_decay=theta, output_scale=omega)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_blt_coefficients_inverse_sensitivity_and_error_match_jax_privacy(case):
    theta, omega = CASES[case]
    n = 60
    with jax.enable_x64(True):
        ref = _jp(theta, omega)
        np.testing.assert_allclose(blt.blt_coefficients(theta, omega, n), np.asarray(ref.toeplitz_coefs(n)),
                                   rtol=1e-12, atol=1e-15)
        inv = np.asarray(ref.inverse().toeplitz_coefs(n))
        np.testing.assert_allclose(blt.inverse_coefficients(theta, omega, n), inv, rtol=1e-9, atol=1e-12)
        sens1 = math.sqrt(float(jp_bt.sensitivity_squared(ref, n)))
        assert math.isclose(blt.blt_sensitivity(theta, omega, n), sens1, rel_tol=1e-12)
        for sep, k in ((5, 3), (7, None), (1, 4), (12, 2)):
            s2 = float(jp_tp.minsep_sensitivity_squared(ref.toeplitz_coefs(n), min_sep=sep, max_participations=k))
            ours = blt.blt_sensitivity(theta, omega, n, min_separation=sep, participations=k)
            assert math.isclose(ours, math.sqrt(s2), rel_tol=1e-12), (sep, k)
        err = float(np.sum(np.asarray(jp_tp.per_query_error(noising_coef=ref.inverse().toeplitz_coefs(n)))))
        assert math.isclose(blt.blt_error(theta, omega, n), err, rel_tol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("n,d,sep,k", [(64, 2, 1, 1), (64, 3, 8, None)])
def test_optimal_blt_reaches_jax_privacys_optimum(n, d, sep, k):
    """Mean squared error x sens^2: ours within 1e-6 of (or below) ``buffered_toeplitz.optimize`` (~1 min each)."""
    theta, omega = blt.optimal_blt(n, d, min_separation=sep, participations=k)
    ours = blt.blt_error(theta, omega, n) * blt.blt_sensitivity(theta, omega, n, min_separation=sep,
                                                                participations=k) ** 2 / n
    with jax.enable_x64(True):
        ref = jp_bt.optimize(n=n, min_sep=sep, max_participations=k, error="mean", min_buffers=d, max_buffers=d)
        theirs = float(jp_bt.LossFn.build_min_sep(n=n, error="mean", min_sep=sep, max_participations=k).loss(ref))
    assert ours <= theirs * (1 + 1e-6), (ours, theirs)
    assert ours >= theirs * (1 - 1e-3)     # same problem: not "better" by a different objective
