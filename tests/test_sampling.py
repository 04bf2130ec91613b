"""PoissonSampler and ShuffleSampler.

Statistical bounds (fixed seeds; a correct sampler fails each check with probability ~1e-6):
* Batch sizes over T steps are i.i.d. Binomial(N, q) with mean mu = Nq, variance v = Nq(1-q). The sample mean
  is within z * sqrt(v / T) of mu, z = norm.ppf(1 - 5e-7) ~ 4.89 (normal approximation, T large).
* The sample variance s^2 satisfies (T-1) s^2 / v ~ chi2(T-1) (normal approximation; the binomial's excess
  kurtosis (1 - 6q(1-q)) / v ~ 0.02 here, negligible), so s^2 / v lies within the chi2 quantiles at 5e-7.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import jaxdp
from jaxdp.sampling import PoissonSampler, ShuffleSampler, default_pad_multiple

ALPHA = 1e-6
Z = stats.norm.ppf(1 - ALPHA / 2)


def _sizes(sampler, steps):
    return np.array([sampler.sample(t)[1].sum() for t in range(steps)])


def test_poisson_batch_sizes_are_binomial():
    N, q, T = 1000, 0.05, 2000
    sizes = _sizes(PoissonSampler(N, q, seed=0), T)
    mu, v = N * q, N * q * (1 - q)
    assert abs(sizes.mean() - mu) < Z * np.sqrt(v / T), sizes.mean()
    ratio = sizes.var(ddof=1) / v
    assert stats.chi2.ppf(ALPHA / 2, T - 1) / (T - 1) <= ratio <= stats.chi2.ppf(1 - ALPHA / 2, T - 1) / (T - 1)


def test_poisson_every_index_is_eligible_and_masks_mark_padding():
    # P(a given index never appears in 400 steps) = 0.95^400 ~ 1.2e-9; over 200 indices ~ 2.4e-7.
    N, q = 200, 0.05
    s = PoissonSampler(N, q, seed=1)
    seen = np.zeros(N, bool)
    for t in range(400):
        idx, mask = s.sample(t)
        assert idx.dtype == np.int32 and mask.dtype == bool and idx.shape == mask.shape
        assert idx.shape[0] % s.pad_to_multiple == 0
        assert ((idx >= 0) & (idx < N)).all()          # padding indices are valid (gather-safe)
        real = idx[mask]
        assert len(np.unique(real)) == real.size        # no example twice in one batch
        assert mask[:real.size].all() and not mask[real.size:].any()
        seen[real] = True
    assert seen.all()


def test_poisson_few_distinct_shapes():
    s = PoissonSampler(10_000, 0.01, seed=2)
    shapes = {s.sample(t)[0].shape for t in range(2000)}
    assert 1 <= len(shapes) <= 6, shapes
    assert s.pad_to_multiple == default_pad_multiple(10_000, 0.01)


def test_poisson_empty_batches_are_all_false_masks():
    s = PoissonSampler(100, 0.001, seed=3, pad_to_multiple=8)   # P(empty) = 0.999^100 ~ 0.90
    empties = 0
    for t in range(50):
        idx, mask = s.sample(t)
        assert idx.shape == (8,)
        if not mask.any():
            empties += 1
    assert empties > 25


def test_poisson_deterministic_and_resumable():
    a = PoissonSampler(500, 0.03, seed=4)
    b = PoissonSampler(500, 0.03, seed=4)
    for t in (0, 1, 17, 1000):
        for x, y in zip(a.sample(t), b.sample(t)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.sample(0)[0], a.sample(1)[0])
    c = PoissonSampler(500, 0.03, seed=5)
    assert not all(np.array_equal(a.sample(t)[1], c.sample(t)[1]) and np.array_equal(a.sample(t)[0], c.sample(t)[0])
                   for t in range(5))
    # Iterate one epoch and a half, stop, resume from state_dict in a new sampler: same batches.
    full = PoissonSampler(500, 0.03, seed=4)
    ref = [batch for _ in range(2) for batch in full]
    first = PoissonSampler(500, 0.03, seed=4)
    it = iter(first)
    got = [next(it) for _ in range(20)]
    resumed = PoissonSampler(500, 0.03, seed=4)
    resumed.load_state_dict(first.state_dict())
    assert resumed.step == 20
    got += [b for b in resumed] + [b for b in resumed]
    for (i1, m1), (i2, m2) in zip(ref, got[:len(ref)]):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(m1, m2)
    assert full.steps_per_epoch == 34 and full.step == 67  # two epochs end at ceil(2 / 0.03), as planned
    assert full.steps_for_epochs(2) == 67  # ceil(2 / 0.03)


def test_poisson_truncation_is_recorded():
    s = PoissonSampler(1000, 0.05, seed=6, max_batch_size=45)
    assert PoissonSampler(1000, 0.05, seed=6).sampling == "poisson"
    assert s.sampling == "truncated_poisson"
    sizes = _sizes(s, 200)
    assert sizes.max() == 45 and s.truncated_steps > 0
    n = s.truncated_steps
    s.sample(0), s.sample(0), [s.sample(t) for t in range(200)]  # re-drawing the same steps counts nothing new
    assert s.truncated_steps == n
    r = PoissonSampler(1000, 0.05, seed=6, max_batch_size=45)
    r.load_state_dict(s.state_dict())
    assert r.truncated_steps == n and r.step == s.step
    assert s.expected_batch_size == pytest.approx(50.0)


def test_poisson_secure_mode_needs_no_seed():
    s = PoissonSampler(1000, 0.05, secure=True)
    a, b = s.sample(0), s.sample(0)
    assert not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))   # fresh OS entropy per call


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan")])
def test_bad_sample_rate(q):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        PoissonSampler(100, q, seed=0)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="seed"):
        PoissonSampler(100, 0.1)
    with pytest.raises(ValueError, match="seed"):
        ShuffleSampler(100, 10)
    with pytest.raises(ValueError, match="dataset_size"):
        PoissonSampler(0, 0.1, seed=0)
    with pytest.raises(ValueError, match="larger than dataset_size"):
        ShuffleSampler(10, 20, seed=0)
    assert PoissonSampler(100, 1.0, seed=0).sample(0)[1].sum() == 100   # q = 1: full batch


@pytest.mark.parametrize("secure", [False, True])
def test_shuffle_partitions_each_epoch(secure):
    N, bs = 103, 10
    s = ShuffleSampler(N, bs, seed=None if secure else 7, secure=secure)
    assert s.sampling == "shuffle" and jaxdp.ShuffleSampler.sampling == "shuffle"
    epochs = []
    for _ in range(2):
        batches = list(s)
        assert len(batches) == 10 and all(i.shape == (bs,) and m.all() for i, m in batches)
        idx = np.concatenate([i for i, _ in batches])
        assert len(np.unique(idx)) == idx.size == 100          # no index twice within an epoch
        epochs.append(idx)
    assert not np.array_equal(epochs[0], epochs[1])             # a fresh permutation each epoch


def test_shuffle_keep_last_and_determinism():
    s = ShuffleSampler(25, 10, seed=8, drop_last=False)
    batches = list(s)
    assert len(batches) == 3
    idx, mask = batches[-1]
    assert idx.shape == (10,) and mask.sum() == 5 and not mask[5:].any()
    real = np.concatenate([i[m] for i, m in batches])
    np.testing.assert_array_equal(np.sort(real), np.arange(25))
    t = ShuffleSampler(25, 10, seed=8, drop_last=False)
    t.load_state_dict({"step": 2})
    np.testing.assert_array_equal(t.sample(2)[0], batches[2][0])


def test_epochs_of_iteration_are_the_planned_epochs():
    """E epochs of iteration take exactly steps_for_epochs(E) steps (issue 19: the README loop overran its plan
    because an iterated epoch had ceil(1/q) steps while the plan counted ceil(E/q) in all)."""
    for n, b in [(1437, 256), (500, 15), (100, 100), (1000, 7)]:
        s = PoissonSampler(n, b / n, seed=0)
        for epochs in (1, 2, 7, 30):
            s.step = 0
            taken = sum(1 for _ in range(epochs) for _ in s)
            assert taken == s.steps_for_epochs(epochs) == s.step
    sh = ShuffleSampler(100, 7, seed=0)
    assert sum(1 for _ in range(3) for _ in sh) == sh.steps_for_epochs(3) == 42
    # resumed mid-epoch: iteration finishes the current epoch only
    s = PoissonSampler(1437, 256 / 1437, seed=0)
    s.step = 8                                       # epoch 2 ends at ceil(2 * 1437 / 256) = 12
    assert len(list(s)) == 4 and s.step == 12
