"""Batch selection with fixed shapes.

:class:`PoissonSampler` is the sampling that DP-SGD's privacy analysis (Abadi et al. 2016; the RDP/PLD/PRV
accountants in :mod:`jaxdp.accounting`) assumes: at every step each of the ``N`` examples is included
independently with probability ``q``. The batch size is therefore random (Binomial(N, q)), and empty batches
happen; each such step still counts (privacy rule 6). To keep ``jax.jit`` from recompiling at every new size,
the indices are padded up to a multiple of ``pad_to_multiple`` with a mask that marks the padding (padding
examples contribute exactly zero gradient in :func:`jaxdp.clipped_grad`). The number of distinct shapes is
therefore a handful: the batch size concentrates within a few standard deviations of ``qN``.

:class:`ShuffleSampler` gives shuffled fixed-size batches. It is labelled ``sampling = "shuffle"``; it is NOT
Poisson sampling, and :mod:`jaxdp.accounting` accounts it differently (privacy rule 5).

Both are deterministic functions of ``(seed, step)`` so a resumed run draws exactly the same batches; with
``secure=True`` each step's randomness comes from the OS entropy source instead (not reproducible).
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Iterator

import numpy as np

from jaxdp import _checks


def _rng(seed: int | None, *stream: int, secure: bool = False) -> np.random.Generator:
    if secure:
        return np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    assert seed is not None  # _check_seed ran in every constructor: a seed is required unless secure
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, stream)])))


def _check_seed(seed, secure: bool, who: str) -> None:
    if secure:
        return
    if seed is None:
        raise ValueError(f"{who} needs a seed (an int you choose), or secure=True to use OS entropy; "
                         "there is no default seed")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{who}: seed must be a non-negative int, got {seed!r}")


def steps_for_epochs(epochs: float, sample_rate: float | None = None, *, steps_per_epoch: int | None = None) -> int:
    """The number of steps in which each example takes part ``epochs`` times (in expectation): THE rule for
    turning epochs into steps, used by the samplers, the engine, the trainer and the ``jaxdp epsilon`` and
    ``jaxdp ledger reserve`` commands, so a plan, a reservation and a run agree on the step count.

    Give exactly one of:
      sample_rate: the expected fraction of the data one step uses (Poisson: ``q``; cyclic Poisson over ``b``
        groups at rate ``p``: ``p / b``): ``ceil(epochs / sample_rate)``.
      steps_per_epoch: the whole number of steps of one pass (shuffled batches: ``N // B``, the last partial
        batch dropped): ``ceil(epochs * steps_per_epoch)``.

    A tolerance of ``1e-9`` keeps floating-point noise from adding a step (``3 / 0.1`` is ``30.000000000000004``
    in floating point, and is 30 steps). Epoch ``k`` of a sampler ends at step ``steps_for_epochs(k, ...)``.

    Raises:
      ValueError: ``epochs`` is negative or not finite, a rate outside (0, 1], or not exactly one of the two.

    >>> steps_for_epochs(3, 0.1)
    30
    >>> steps_for_epochs(2.5, steps_per_epoch=234)   # 60000 // 256 batches per epoch
    585
    """
    epochs = _checks.non_negative("epochs", epochs)
    if (sample_rate is None) == (steps_per_epoch is None):
        raise ValueError("steps_for_epochs needs exactly one of sample_rate (Poisson: q) or steps_per_epoch "
                         "(shuffled batches: N // B)")
    if sample_rate is not None:
        return max(0, math.ceil(epochs / _checks.sample_rate(sample_rate) - 1e-9))
    return max(0, math.ceil(epochs * _checks.positive_int("steps_per_epoch", steps_per_epoch) - 1e-9))


def default_pad_multiple(dataset_size: int, sample_rate: float) -> int:
    """Power of two >= 4 standard deviations of Binomial(N, q) (at least 8).

    Nearly all batch sizes lie within +-4 sd of qN, so about three padded shapes occur (three compilations),
    at the price of ~2 sd of padding per batch on average."""
    sd = math.sqrt(dataset_size * sample_rate * (1 - sample_rate))
    return int(2 ** math.ceil(math.log2(max(8.0, 4.0 * sd))))


class _Sampler:
    """Shared stepping: iterating yields the rest of the current epoch of ``sample(step)`` and advances ``step``.

    Epoch ``k`` (1-based) ends at step ``steps_for_epochs(k)``: the same definition the planner, the budget
    (``make_private_with_epsilon(epochs=...)``) and the trainer use, so ``E`` epochs of iteration take exactly
    ``steps_for_epochs(E)`` steps. (For Poisson sampling with a non-integer ``1/q`` epochs therefore alternate
    between ``floor(1/q)`` and ``ceil(1/q)`` steps.)
    """

    step: int
    dataset_size: int

    @property
    def steps_per_epoch(self) -> int:
        """The number of steps of the longest epoch."""
        raise NotImplementedError

    @property
    def expected_batch_size(self) -> float:
        """The public normaliser of the noisy sum (never the realised batch size)."""
        raise NotImplementedError

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def steps_for_epochs(self, epochs: float) -> int:
        raise NotImplementedError

    def event(self, noise_multiplier: float, steps: int, *, mechanism: str = "dpsgd",
              l2_clip_norm: float | None = None):
        """The accounting event (:class:`jaxdp.accounting.Event`) of ``steps`` steps on this sampler's batches."""
        raise NotImplementedError

    def epoch_end(self, step: int) -> int:
        """The step at which the epoch containing ``step`` ends: the smallest ``steps_for_epochs(k) > step``."""
        step = int(step)
        # Start from a lower bound on the (1-based) epoch number, then walk to the exact one.
        k = max(1, int(step / self.steps_per_epoch), int(step * self.expected_batch_size / self.dataset_size) - 1)
        while k > 1 and self.steps_for_epochs(k - 1) > step:
            k -= 1
        while self.steps_for_epochs(k) <= step:
            k += 1
        return self.steps_for_epochs(k)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _ in range(self.epoch_end(self.step) - self.step):
            batch = self.sample(self.step)
            self.step += 1
            yield batch


class PoissonSampler(_Sampler):
    """Poisson subsampling with fixed-shape, masked batches.

    Args:
      dataset_size: ``N``, the number of examples (the privacy unit is one example).
      sample_rate: ``q`` in (0, 1]; the expected batch size is ``q * N``. Accounting uses ``q``.
      seed: int seed for the sampling randomness (required unless ``secure``). Keep it secret: an attacker who
        knows it knows which examples were in which batch, which voids the amplification by sampling.
      pad_to_multiple: batches are padded to a multiple of this (default: :func:`default_pad_multiple`).
      max_batch_size: optional truncation: a batch larger than this keeps a uniformly random subset of this
        size. Recorded (``sampling == "truncated_poisson"``) so the accountant can use the truncated analysis.
      secure: draw every step's randomness from the OS entropy source.

    ``sample(step)`` returns ``(indices, mask)``: int32 indices of shape ``[P]`` (``P`` a multiple of
    ``pad_to_multiple``), padding index 0, and a bool mask that is False on padding.
    Iterating the sampler yields one epoch and advances ``step``; epoch ``k`` ends at step ``ceil(k / q)``
    (:meth:`steps_for_epochs`), so an epoch has ``floor(1/q)`` or ``ceil(1/q)`` steps and ``E`` epochs take
    exactly ``steps_for_epochs(E)`` steps. ``steps_per_epoch = ceil(1/q)`` is the longest epoch.

    Example: each of 1,000 examples joins each batch with probability 0.01 (expected batch size 10); the
    batch is padded to a fixed shape so a jitted step compiles once:

    >>> from jaxdp.sampling import PoissonSampler
    >>> sampler = PoissonSampler(dataset_size=1000, sample_rate=0.01, seed=0)
    >>> indices, mask = sampler.sample(0)
    >>> indices.shape, mask.dtype
    ((16,), dtype('bool'))
    >>> int(mask.sum())    # the realised batch size: random, about q * N
    11
    >>> sampler.expected_batch_size, sampler.steps_for_epochs(2)
    (10.0, 200)

    Raises:
      ValueError: ``dataset_size``, ``pad_to_multiple`` or ``max_batch_size`` not a positive integer,
        ``sample_rate`` outside ``(0, 1]``, or no (or a negative) ``seed`` without ``secure``.
      TypeError: a ``sample_rate`` that is not a number.
    """

    def __init__(self, dataset_size: int, sample_rate: float, seed: int | None = None, *,
                 pad_to_multiple: int | None = None, max_batch_size: int | None = None,
                 secure: bool = False) -> None:
        self.dataset_size = _checks.positive_int("dataset_size", dataset_size)
        self.sample_rate = _checks.sample_rate(sample_rate)
        _check_seed(seed, secure, "PoissonSampler")
        self.seed = None if seed is None else int(seed)
        self.secure = bool(secure)
        self.pad_to_multiple = (default_pad_multiple(self.dataset_size, self.sample_rate)
                                if pad_to_multiple is None else _checks.positive_int("pad_to_multiple",
                                                                                     pad_to_multiple))
        self.max_batch_size = None if max_batch_size is None else _checks.positive_int(
            "max_batch_size", max_batch_size)
        self.step = 0
        self._truncated: set[int] = set()

    @property
    def sampling(self) -> str:
        return "poisson" if self.max_batch_size is None else "truncated_poisson"

    @property
    def expected_batch_size(self) -> float:
        """``q * N``: the public normaliser of the noisy sum (never the realised batch size)."""
        return self.sample_rate * self.dataset_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(1.0 / self.sample_rate - 1e-9))

    def steps_for_epochs(self, epochs: float) -> int:
        """``ceil(epochs / q)``: the number of steps that sees each example ``epochs`` times in expectation."""
        return steps_for_epochs(epochs, self.sample_rate)

    def event(self, noise_multiplier: float, steps: int, *, mechanism: str = "dpsgd",
              l2_clip_norm: float | None = None):
        """The :class:`jaxdp.accounting.Event` of ``steps`` steps with noise multiplier ``noise_multiplier`` on
        this sampler's batches (``"poisson"``, or ``"truncated_poisson"`` with ``max_batch_size``).

        >>> PoissonSampler(1000, 0.01, seed=0).event(1.1, 300).to_dict()
        {'sampling': 'poisson', 'noise_multiplier': 1.1, 'sample_rate': 0.01, 'steps': 300}
        """
        if self.sampling != "cyclic_poisson" and mechanism != "dpsgd":
            raise ValueError(f"{self.sampling} sampling is accounted for independent noise (mechanism 'dpsgd') "
                             f"only, got {mechanism!r}; correlated noise needs CyclicPoissonSampler")
        from jaxdp.accounting.event import Event  # imported here: jaxdp.accounting loads dp-accounting
        return Event.from_mechanism(noise_multiplier, self.sample_rate, steps, sampling=self.sampling,
                                    dataset_size=self.dataset_size, max_batch_size=self.max_batch_size,
                                    bands=getattr(self, "bands", None), mechanism=mechanism,
                                    l2_clip_norm=l2_clip_norm)

    def padded_size(self, batch_size: int) -> int:
        m = self.pad_to_multiple
        size = max(m, -(-batch_size // m) * m)
        if self.max_batch_size is not None:
            size = min(size, -(-self.max_batch_size // m) * m)
        return size

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of global step ``step`` as ``(indices [P] int32, mask [P] bool)``."""
        rng = _rng(self.seed, 0, step, secure=self.secure)
        chosen = np.flatnonzero(rng.random(self.dataset_size) < self.sample_rate)
        if self.max_batch_size is not None and chosen.size > self.max_batch_size:
            chosen = np.sort(rng.choice(chosen, self.max_batch_size, replace=False))
            self._truncated.add(int(step))
        size = self.padded_size(chosen.size)
        indices = np.zeros(size, np.int32)
        indices[:chosen.size] = chosen
        mask = np.zeros(size, bool)
        mask[:chosen.size] = True
        return indices, mask

    @property
    def truncated_steps(self) -> int:
        """Number of distinct steps whose batch was truncated to ``max_batch_size``."""
        return len(self._truncated)

    def state_dict(self) -> dict:
        return {"step": self.step, "truncated": sorted(self._truncated)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self._truncated = set(int(t) for t in state.get("truncated", ()))

    def __repr__(self) -> str:
        return (f"PoissonSampler(dataset_size={self.dataset_size}, sample_rate={self.sample_rate}, "
                f"pad_to_multiple={self.pad_to_multiple}, max_batch_size={self.max_batch_size}, "
                f"secure={self.secure})")


class CyclicPoissonSampler(PoissonSampler):
    """Cyclic Poisson sampling (Choquette-Choo et al. 2023): the data are split once into ``b`` groups; step ``t``
    Poisson-samples group ``t mod b``, each of its examples independently with probability ``p``.

    Every example therefore takes part only in steps ``b`` apart, at most ``ceil(T / b)`` times in ``T`` steps.
    With b-banded matrix-factorization noise (:func:`jaxdp.matrix_factorization.bandmf_noise`) -- or independent
    noise, ``b``'s special case -- the run is accounted as DP-SGD with sampling rate ``p`` and ``ceil(T / b)``
    steps (event ``{"sampling": "cyclic_poisson", ...}`` in :mod:`jaxdp.accounting`). This assumes the steps are
    taken in order, one batch per step, as iterating the sampler does.

    Args:
      dataset_size: ``N``.
      sample_rate: ``p``, the probability that an example of the step's group is in the batch.
      bands: ``b``, the number of groups (the cycle length; equal to BandMF's number of bands).
      seed: int seed of the partition and of the sampling (required unless ``secure``); keep it secret.
      pad_to_multiple, secure: as in :class:`PoissonSampler` (no truncation).

    The groups are a uniformly random partition into sizes ``floor(N/b)`` or ``ceil(N/b)``; the public normaliser
    is ``expected_batch_size = p * N / b``. An "epoch" (each example once in expectation) is ``ceil(b / p)`` steps.

    >>> sampler = CyclicPoissonSampler(dataset_size=100, sample_rate=0.5, bands=4, seed=0)
    >>> sampler.expected_batch_size, sampler.steps_per_epoch     # p N / b = 12.5; ceil(b / p) = 8
    (12.5, 8)
    >>> indices, mask = sampler.sample(5)
    >>> set(indices[mask].tolist()) <= set(sampler.group(5).tolist())   # step 5 samples group 5 mod 4 only
    True

    Raises:
      ValueError: as :class:`PoissonSampler`, or ``bands`` not a positive integer or larger than ``dataset_size``.
    """

    def __init__(self, dataset_size: int, sample_rate: float, bands: int, seed: int | None = None, *,
                 pad_to_multiple: int | None = None, secure: bool = False) -> None:
        n = _checks.positive_int("dataset_size", dataset_size)
        self.bands = _checks.positive_int("bands", bands)
        if self.bands > n:
            raise ValueError(f"bands={bands} is larger than dataset_size={dataset_size}: every group needs examples")
        p = _checks.sample_rate(sample_rate)
        if pad_to_multiple is None:
            pad_to_multiple = default_pad_multiple(-(-n // self.bands), p)
        super().__init__(n, p, seed, pad_to_multiple=pad_to_multiple, secure=secure)
        _check_seed(seed, secure, "CyclicPoissonSampler")
        # One fixed partition for the whole run (secure mode: drawn once from OS entropy, kept in memory).
        perm = _rng(self.seed, 2, secure=self.secure).permutation(n)
        self._groups = [np.sort(perm[g::self.bands]) for g in range(self.bands)]

    sampling = "cyclic_poisson"

    @property
    def expected_batch_size(self) -> float:
        """``p * N / b``: the public normaliser of the noisy sum."""
        return self.sample_rate * self.dataset_size / self.bands

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.bands / self.sample_rate - 1e-9))

    def steps_for_epochs(self, epochs: float) -> int:
        """``ceil(epochs * b / p)`` steps: each example ``epochs`` times in expectation (a step uses ``p / b`` of
        the data)."""
        return steps_for_epochs(epochs, self.sample_rate / self.bands)

    def group(self, step: int) -> np.ndarray:
        """The examples of the group that step ``step`` samples from (``step mod b``)."""
        return self._groups[int(step) % self.bands]

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of global step ``step``: a Poisson sample (rate ``p``) of group ``step mod b``, padded."""
        members = self.group(step)
        rng = _rng(self.seed, 3, step, secure=self.secure)
        chosen = members[rng.random(members.size) < self.sample_rate]
        size = self.padded_size(chosen.size)
        indices = np.zeros(size, np.int32)
        indices[:chosen.size] = chosen
        mask = np.zeros(size, bool)
        mask[:chosen.size] = True
        return indices, mask

    def load_state_dict(self, state: dict) -> None:
        if self.secure and int(state["step"]) > 0:
            raise ValueError("a secure-mode CyclicPoissonSampler cannot resume a run: its partition came from the "
                             "OS entropy source and is not stored, and a new partition would break the b-step "
                             "separation the accounting relies on; restart the run, or use a (secret) seed")
        super().load_state_dict(state)

    def __repr__(self) -> str:
        return (f"CyclicPoissonSampler(dataset_size={self.dataset_size}, sample_rate={self.sample_rate}, "
                f"bands={self.bands}, pad_to_multiple={self.pad_to_multiple}, secure={self.secure})")


class _FixedSizeSampler(_Sampler):
    """Shared state of the samplers whose every batch has exactly ``B = batch_size`` rows (``B <= N``): the
    validation of ``N`` and ``B``, the seed, and the public normalisers ``q = B / N`` and ``B``."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int | None, secure: bool) -> None:
        self.dataset_size = _checks.positive_int("dataset_size", dataset_size)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        if self.batch_size > self.dataset_size:
            raise ValueError(f"batch_size {batch_size} is larger than dataset_size {dataset_size}")
        _check_seed(seed, secure, type(self).__name__)
        self.seed = None if seed is None else int(seed)
        self.secure = bool(secure)
        self.step = 0

    @property
    def sample_rate(self) -> float:
        """``B / N``: the fraction of the data one batch holds (for information: a fixed-size batch is not
        Poisson-sampled, so there is no amplification by sampling at rate ``q``)."""
        return self.batch_size / self.dataset_size

    @property
    def expected_batch_size(self) -> float:
        """``B``: every batch has exactly ``B`` examples (public)."""
        return float(self.batch_size)


class FixedOrderSampler(_FixedSizeSampler):
    """One secret permutation split into ``b = floor(N / B)`` batches of ``B``, repeated in the same order every
    epoch. Labelled ``sampling = "fixed_order"``.

    Every example (but the ``N mod B`` left out of the permutation's batches, which never take part) is in
    exactly one batch, so it takes part once per epoch, exactly ``b`` steps apart: at most ``ceil(T / b)`` times
    in ``T`` steps, with min-separation ``b``. The schedule depends only on the seed, never on the data, which is
    what the fixed-participation-schema (zero-out) analysis of BLT noise (:mod:`jaxdp.blt`) needs. There is no
    amplification by sampling: the accounting event is ``{"sampling": "fixed_order", ...}``
    (:mod:`jaxdp.accounting`), never Poisson.

    Args:
      dataset_size: ``N``.
      batch_size: ``B`` (every batch has exactly ``B`` examples, no padding); ``B <= N``.
      seed: int seed of the permutation (required unless ``secure``); keep it secret.
      secure: draw the permutation once from the OS entropy source (kept in memory: such a run cannot resume).

    >>> sampler = FixedOrderSampler(dataset_size=10, batch_size=3, seed=0)   # b = 3 batches; one example left out
    >>> sampler.min_separation, sampler.steps_for_epochs(2), sampler.participations(7)
    (3, 6, 3)
    >>> bool((sampler.sample(1)[0] == sampler.sample(4)[0]).all())   # the same batch every b steps
    True

    Raises:
      ValueError: ``dataset_size`` or ``batch_size`` not a positive integer, ``batch_size > dataset_size``, or
        no (or a negative) ``seed`` without ``secure``.
    """

    sampling = "fixed_order"

    def __init__(self, dataset_size: int, batch_size: int, seed: int | None = None, *,
                 secure: bool = False) -> None:
        super().__init__(dataset_size, batch_size, seed, secure)
        b = self.dataset_size // self.batch_size
        perm = _rng(self.seed, 4, secure=self.secure).permutation(self.dataset_size)
        self._batches = perm[:b * self.batch_size].reshape(b, self.batch_size).astype(np.int32)

    @property
    def min_separation(self) -> int:
        """``b = floor(N / B)``: the number of batches, the epoch length and the gap between participations."""
        return int(self._batches.shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return self.min_separation

    def steps_for_epochs(self, epochs: float) -> int:
        """``ceil(epochs * b)`` (:func:`steps_for_epochs` with ``steps_per_epoch = b``)."""
        return steps_for_epochs(epochs, steps_per_epoch=self.min_separation)

    def event(self, noise_multiplier: float, steps: int, *, mechanism: str = "dpsgd",
              l2_clip_norm: float | None = None, horizon: int | None = None):
        """The :class:`jaxdp.accounting.Event` of ``steps`` steps of a run planned for ``horizon`` steps on this
        fixed batch order: ``"blt"`` noise is ONE Gaussian mechanism for ``steps <= horizon``, independent
        (``"dpsgd"``) noise ``ceil(steps / b)`` of them.

        >>> FixedOrderSampler(100, 10, seed=0).event(3.0, 20, mechanism="blt", horizon=30).to_dict()
        {'sampling': 'fixed_order', 'mechanism': 'blt', 'min_separation': 10, 'horizon': 30, \
'noise_multiplier': 3.0, 'steps': 20}
        """
        if horizon is None:
            raise ValueError("a fixed-order event needs horizon= (the planned number of steps its noise covers)")
        from jaxdp.accounting.event import Event
        return Event("fixed_order", mechanism=mechanism, min_separation=self.min_separation, horizon=horizon,
                     noise_multiplier=noise_multiplier, steps=steps, l2_clip_norm=l2_clip_norm)

    def participations(self, steps: int) -> int:
        """``ceil(steps / b)``: the most steps one example takes part in among the first ``steps``."""
        return -(-int(steps) // self.min_separation)

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of global step ``step``: batch ``step mod b`` of the permutation (all ``B`` rows real)."""
        return self._batches[int(step) % self.min_separation].copy(), np.ones(self.batch_size, bool)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if self.secure and int(state["step"]) > 0:
            raise ValueError("a secure-mode FixedOrderSampler cannot resume a run: its permutation came from the OS "
                             "entropy source and is not stored, and a new one would break the fixed participation "
                             "schema the accounting relies on; restart the run, or use a (secret) seed")
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return (f"FixedOrderSampler(dataset_size={self.dataset_size}, batch_size={self.batch_size}, "
                f"min_separation={self.min_separation}, secure={self.secure})")


class ShuffleSampler(_FixedSizeSampler):
    """Shuffled fixed-size batches (each epoch a fresh permutation). Labelled ``sampling = "shuffle"``.

    This is the sampling most non-private loaders use. Its privacy analysis differs from Poisson's: jaxdp
    accounts it as sampling without replacement of a fixed-size batch (replace-one neighbouring relation), and
    never reports a Poisson epsilon for it.

    Args:
      dataset_size: ``N``.
      batch_size: ``B <= N``, the number of examples of every batch.
      seed: int seed of the permutations (required unless ``secure``); keep it secret.
      drop_last: drop the last, smaller batch of an epoch (``N mod B`` examples; default). Otherwise it is padded
        to ``B`` rows, its padding masked out.
      secure: draw every epoch's permutation from the OS entropy source.

    >>> sampler = ShuffleSampler(dataset_size=10, batch_size=4, seed=0)
    >>> sampler.steps_per_epoch, sampler.sample_rate, sampler.expected_batch_size
    (2, 0.4, 4.0)
    >>> first, second = sampler.sample(0)[0], sampler.sample(1)[0]
    >>> len(set(first.tolist()) | set(second.tolist()))   # one epoch's batches are disjoint
    8

    Raises:
      ValueError: ``dataset_size`` or ``batch_size`` not a positive integer, ``batch_size > dataset_size``, or
        no (or a negative) ``seed`` without ``secure``.
    """

    sampling = "shuffle"

    def __init__(self, dataset_size: int, batch_size: int, seed: int | None = None, *,
                 drop_last: bool = True, secure: bool = False) -> None:
        super().__init__(dataset_size, batch_size, seed, secure)
        self.drop_last = bool(drop_last)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch

    @property
    def steps_per_epoch(self) -> int:
        n, b = self.dataset_size, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def steps_for_epochs(self, epochs: float) -> int:
        """``ceil(epochs * steps_per_epoch)``: ``epochs`` passes over the data."""
        return steps_for_epochs(epochs, steps_per_epoch=self.steps_per_epoch)

    def event(self, noise_multiplier: float, steps: int, *, mechanism: str = "dpsgd",
              l2_clip_norm: float | None = None):
        """The :class:`jaxdp.accounting.Event` of ``steps`` steps on these shuffled fixed-size batches."""
        if mechanism != "dpsgd":
            raise ValueError(f"shuffled batches are accounted for independent noise (mechanism 'dpsgd') only, got "
                             f"{mechanism!r}")
        from jaxdp.accounting.event import Event
        return Event("shuffle", noise_multiplier=noise_multiplier, batch_size=self.batch_size,
                     dataset_size=self.dataset_size, steps=steps, l2_clip_norm=l2_clip_norm)

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        # One permutation per epoch, cached: the batches of an epoch must partition the data. (In secure mode a
        # fresh permutation per call would let an example appear in several batches of one epoch, or none.)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _rng(self.seed, 1, epoch, secure=self.secure).permutation(self.dataset_size))
        perm = self._perm[1]
        chunk = perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        indices = np.zeros(self.batch_size, np.int32)
        indices[:chunk.size] = chunk
        mask = np.zeros(self.batch_size, bool)
        mask[:chunk.size] = True
        return indices, mask

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


__all__ = ["PoissonSampler", "CyclicPoissonSampler", "FixedOrderSampler", "ShuffleSampler", "default_pad_multiple",
           "steps_for_epochs"]
