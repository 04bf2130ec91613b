"""Gradient parity with Opacus at noise 0: per-example norms, the clipped sum (Opacus ``p.summed_grad``) and the
update after division by the expected batch size (Opacus ``p.grad`` after ``pre_step``), for an MLP, a CNN with
Conv + GroupNorm, a text model (Embedding + LayerNorm + Linear) and a pre-LN transformer block, with flat and
per-layer clipping, and Opacus's mean- and sum-reduced losses. float32 against float32, atol 1e-5, rtol 1e-4.

The clip norms are chosen to bind (the median per-example norm, per parameter tensor for per-layer clipping),
so an error in the clip factor or in the division shows up in every comparison.
"""
import numpy as np
import pytest

import parity_harness as h

CASES = [(m, c, r) for m in h.MODELS for c, r in (("flat", "mean"), ("per_layer", "mean"), ("flat", "sum"))]


@pytest.mark.parametrize("model,clipping,loss_reduction", CASES)
def test_step_matches_opacus(model, clipping, loss_reduction):
    out = h.compare_step(model, clipping, loss_reduction, batch_size=16)
    j_norms, o_norms = out["norms"]
    np.testing.assert_allclose(j_norms, o_norms, rtol=h.RTOL, atol=h.ATOL, err_msg="per-example norms")
    j_sum, o_sum = out["summed"]
    j_upd, o_upd = out["update"]
    assert set(j_sum) == set(o_sum)
    for name in o_sum:
        np.testing.assert_allclose(j_sum[name], o_sum[name], rtol=h.RTOL, atol=h.ATOL,
                                   err_msg=f"clipped sum (summed_grad) of {name}")
        np.testing.assert_allclose(j_upd[name], o_upd[name], rtol=h.RTOL, atol=h.ATOL,
                                   err_msg=f"update (grad / expected_batch_size) of {name}")
    # The clip norm binds for about half of the batch, so the comparison exercises the clip factor.
    assert 0 < np.mean(o_norms > np.median(o_norms)) < 1


def test_mean_reduction_is_per_example_losses_divided_by_e():
    """Opacus loss_reduction="mean" (mean loss; per-sample grads rescaled by B; update = sum / E) is, in jaxdp,
    the UNREDUCED per-example loss with add_noise(..., expected_batch_size=E): both updates equal the
    clipped sum divided by E, and the "sum" variant of Opacus equals the clipped sum itself."""
    mean = h.compare_step("mlp", "flat", "mean", batch_size=16)
    total = h.compare_step("mlp", "flat", "sum", batch_size=16)
    for name, o_upd in mean["update"][1].items():
        np.testing.assert_allclose(o_upd * 16, total["update"][1][name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean["update"][0][name] * 16, mean["summed"][0][name], rtol=1e-5, atol=1e-6)
