"""Noise parity: for the same sigma, C (flat, or per-layer with total ||(C_1..C_K)||_2) and expected batch size,
the noise in jaxdp's update and in Opacus's update has the same standard deviation sigma * C / E.

Statistics: each library gives n = 15,552 i.i.d. N(0, s^2) coordinates (a 64 -> 96 -> 96 linear model). The
sample standard deviation has relative standard error 1/sqrt(2(n-1)) = 0.0057; we allow 5 standard errors
(0.028) against the prediction, and sqrt(2) * 5 = 0.040 on the ratio of the two libraries' estimates
(two-sided miss probability < 1e-6 each). The mean must lie within 5 s / sqrt(n) of 0. Seeds are fixed.
"""
import math

import pytest

import parity_harness as h


@pytest.mark.parametrize("clip", [1.0, [0.5, 0.2, 1.0, 0.3]], ids=["flat", "per_layer"])
@pytest.mark.parametrize("sigma,e", [(1.1, 16.0), (0.5, 63.0)])
def test_noise_std_matches_opacus(clip, sigma, e):
    j, o, predicted = h.noise_samples(sigma, clip, e, seed=3)
    n = j.size
    assert o.size == n > 10_000
    se = 1.0 / math.sqrt(2 * (n - 1))
    for name, x in (("jaxdp", j), ("opacus", o)):
        assert abs(x.std() / predicted - 1) < 5 * se, (name, x.std(), predicted)
        assert abs(x.mean()) < 5 * predicted / math.sqrt(n), (name, x.mean())
    assert abs(j.std() / o.std() - 1) < 5 * math.sqrt(2) * se


def test_per_layer_noise_uses_l2_of_clip_norms():
    """Opacus's per-layer optimizer and jaxdp both scale the noise by ||(C_1..C_K)||_2 (not sum, not max)."""
    clips = [0.5, 0.2, 1.0, 0.3]
    j, o, predicted = h.noise_samples(1.0, clips, 1.0, seed=4)
    assert predicted == pytest.approx(math.sqrt(sum(c * c for c in clips)))
    wrong = sum(clips)  # the plausible mistake
    for x in (j, o):
        assert abs(x.std() / predicted - 1) < 0.03
        assert abs(x.std() / wrong - 1) > 0.3
