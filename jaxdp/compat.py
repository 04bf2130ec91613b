"""Compatibility with Opacus's conventions for the sample rate and the expected batch size.

jaxdp's own convention (docs/privacy.md rule 3) normalises the noisy clipped sum by the public expected batch size

    E = q * N            (a real number; q = B / N for a nominal batch size B, so E = B)

Opacus's ``PrivacyEngine.make_private`` derives both numbers from its ``DataLoader`` instead:

    q_opacus = 1 / len(data_loader) = 1 / ceil(N / B)
    E_opacus = int(N * q_opacus)                       (truncated towards zero)

so MNIST (N = 60,000) with batch size 64 gets ``q = 1/938`` and ``E = int(63.97) = 63``, not 64; with batch
size 256 it gets ``q = 1/235`` and ``E = 255``. The truncation makes Opacus's update ``(S + noise) / E`` about
1.6% larger than ``(S + noise) / 64`` in the first case; it is not a privacy problem (E is still a public
constant) but it does change the numbers. These helpers reproduce Opacus exactly when ``opacus_compat=True``
so that a jaxdp run can be compared step for step with an Opacus run (see docs/parity.md); leave it False for
new work. Privacy meaning: both values are public constants that do not depend on the data, so either
choice is private; the accountant must be given the SAME ``q`` that the sampler uses.
"""
from __future__ import annotations

import math

from jaxdp import _checks


def sample_rate(dataset_size: int, batch_size: int, opacus_compat: bool = False) -> float:
    """Poisson sampling rate ``q`` for a nominal batch size.

    Args:
      dataset_size: ``N``, the number of training examples (public).
      batch_size: ``B``, the nominal (expected) batch size.
      opacus_compat: ``False`` -> ``q = B / N``; ``True`` -> Opacus's ``q = 1 / ceil(N / B)``
        (``1 / len(data_loader)``), which is slightly different whenever ``B`` does not divide ``N``.
    """
    n = _checks.positive_int("dataset_size", dataset_size)
    b = _checks.positive_int("batch_size", batch_size)
    if b > n:
        raise ValueError(f"batch_size ({b}) must not exceed dataset_size ({n})")
    if opacus_compat:
        return 1.0 / math.ceil(n / b)
    return b / n


def expected_batch_size(dataset_size: int, sample_rate: float, opacus_compat: bool = False) -> float:
    """The public constant ``E`` that the noisy clipped sum is divided by.

    Args:
      dataset_size: ``N``, the number of training examples (public).
      sample_rate: ``q``, the Poisson sampling rate actually used by the sampler and the accountant.
      opacus_compat: ``False`` -> ``E = q * N`` (a float, jaxdp's default); ``True`` -> ``int(N * q)`` exactly
        as Opacus's ``make_private`` computes it (truncation, e.g. 63 for N = 60,000 and q = 1/938).

    Returns:
      ``E`` as a float (``float(int(N * q))`` in compat mode). Pass it as ``expected_batch_size`` to
      :func:`jaxdp.add_noise` / :func:`jaxdp.dpsgd`.
    """
    n = _checks.positive_int("dataset_size", dataset_size)
    q = _checks.sample_rate(sample_rate)
    if opacus_compat:
        e = int(n * q)
        if e < 1:
            raise ValueError(
                f"Opacus-compatible expected batch size int(N * q) = int({n} * {q}) is 0; Opacus would divide "
                "by zero here. Use a larger sample_rate or opacus_compat=False.")
        return float(e)
    return n * q


__all__ = ["expected_batch_size", "sample_rate"]
