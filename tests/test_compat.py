"""jaxdp.compat without torch: jaxdp's convention (E = q N) and Opacus's (q = 1/ceil(N/B), E = int(N q))."""
import pytest

import jaxdp
from jaxdp import compat


def test_default_is_q_times_n():
    assert compat.sample_rate(60_000, 64) == 64 / 60_000
    assert compat.expected_batch_size(60_000, 64 / 60_000) == pytest.approx(64.0)
    assert compat.expected_batch_size(1_000, 0.0625) == 62.5   # a real number, not truncated


def test_opacus_compat_truncates():
    q = compat.sample_rate(60_000, 64, opacus_compat=True)
    assert q == 1 / 938
    assert compat.expected_batch_size(60_000, q, opacus_compat=True) == 63.0
    assert compat.expected_batch_size(60_000, q) == pytest.approx(63.966, abs=1e-3)
    assert compat.expected_batch_size(1_000, 1 / 16, opacus_compat=True) == 62.0
    assert compat.sample_rate(1_000, 10, opacus_compat=True) == compat.sample_rate(1_000, 10) == 0.01


def test_lazy_module_and_errors():
    assert jaxdp.compat is compat
    with pytest.raises(ValueError, match="int"):
        compat.expected_batch_size(10, 0.05, opacus_compat=True)
    with pytest.raises(ValueError, match="exceed"):
        compat.sample_rate(10, 20)
    with pytest.raises(ValueError):
        compat.expected_batch_size(100, 0.0)
    with pytest.raises(ValueError):
        compat.sample_rate(0, 1)
