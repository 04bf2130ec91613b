"""Empirical lower bounds on epsilon from the outcome of a membership test.

If a training algorithm ``M`` is (epsilon, delta)-DP, every membership test on one example -- any rule that looks
at the output and says "member" -- has true- and false-positive rates that satisfy (Kairouz et al. 2015)

    TPR <= e^eps * FPR + delta          and          1 - FPR <= e^eps * (1 - TPR) + delta.

An attack whose rates are measured on finitely many trials therefore certifies, with confidence ``1 - alpha``,

    eps >= max( log((TPR_lo - delta) / FPR_hi),  log((1 - FPR_hi - delta) / (1 - TPR_lo)) )

where ``TPR_lo`` and ``FPR_hi`` are one-sided Clopper-Pearson bounds at level ``alpha / 2`` each (the error
``alpha`` is split over the two estimates; Jagielski et al. 2020, Nasr et al. 2021). A lower bound is a check of
the *implementation*: if it exceeds the epsilon the accountant claimed, the code does not keep its promise.

:func:`one_run_epsilon_lower_bound` is the audit of Steinke, Nasr & Jagielski (2023), "Privacy auditing with one
(1) training run": ``m`` canaries are each included independently with probability 1/2 in ONE training run; the
auditor guesses membership for ``r`` of them and gets ``v`` right. For an eps-DP algorithm the number of right
guesses is stochastically dominated by ``Binomial(r, e^eps / (1 + e^eps))`` (their Theorem 3.1); with delta > 0
the tail picks up an extra term ``2 m delta alpha`` (their Theorem 5.2 / Algorithm 2 in the appendix), computed
here from the binomial probabilities. The bound is the largest eps whose p-value is below ``beta``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "DEFAULT_DELTA", "clopper_pearson_interval", "epsilon_lower_bound_from_counts",
    "epsilon_lower_bound_from_scores", "one_run_p_value", "one_run_epsilon_lower_bound", "one_run_guesses",
    "one_run_ceiling", "one_run_num_canaries",
]

#: The delta every bound in this module assumes when none is given: the usual claimed delta of a DP-SGD run
#: (and of ``jaxdp train``). Pass the delta your run actually claims; a larger delta can only lower a bound.
DEFAULT_DELTA = 1e-5


def _check_prob(name: str, value: float, *, open_low: bool = True) -> float:
    v = float(value)
    if not (0.0 < v < 1.0) if open_low else not (0.0 <= v < 1.0):
        raise ValueError(f"{name} must lie in {'(0, 1)' if open_low else '[0, 1)'}, got {value!r}")
    return v


def clopper_pearson_interval(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided ``1 - alpha`` binomial interval: each end is a one-sided bound at level ``alpha / 2``."""
    k, n = int(successes), int(trials)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    _check_prob("alpha", alpha)
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound_from_counts(true_positives: int, num_members: int, false_positives: int,
                                    num_nonmembers: int, delta: float = DEFAULT_DELTA, alpha: float = 0.05) -> float:
    """Epsilon lower bound (confidence ``1 - alpha``) from an attack's counts at ONE pre-chosen threshold.

    Args:
      true_positives: members the attack called members, out of ``num_members``.
      false_positives: non-members the attack called members, out of ``num_nonmembers``.
      delta: the delta of the (eps, delta) guarantee under test.
      alpha: total error probability, split evenly between the TPR and the FPR bound.

    Returns the bound (0 if the attack certifies nothing). Reference: TP 500/1000, FP 10/1000, delta 1e-5,
    alpha 0.05 -> 3.2420 (docs/privacy.md).
    """
    tpr_lo, _ = clopper_pearson_interval(true_positives, num_members, alpha)
    _, fpr_hi = clopper_pearson_interval(false_positives, num_nonmembers, alpha)
    delta = float(delta)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}")
    cands = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        cands.append(math.log((tpr_lo - delta) / fpr_hi))
    if 1 - fpr_hi - delta > 0 and 1 - tpr_lo > 0:
        cands.append(math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return max(cands)


def epsilon_lower_bound_from_scores(member_scores: Sequence[float], nonmember_scores: Sequence[float],
                                    delta: float = DEFAULT_DELTA, alpha: float = 0.05, *, correction: str = "split",
                                    num_thresholds: int = 100, seed: int = 0) -> dict:
    """Epsilon lower bound from attack scores (higher = "member"), correcting for the search over thresholds.

    Picking the best threshold on the same trials that measure it overstates the bound. Two valid corrections:

    * ``"split"`` (default): a seeded random half of members and of non-members picks the threshold that maximises
      the bound; the other half measures it (one test, level ``alpha``).
    * ``"bonferroni"``: ``num_thresholds`` candidate thresholds (quantiles of the pooled scores, which do not
      use the labels) are all tried on all trials, each at level ``alpha / num_thresholds``; the max is valid.

    Returns a dict with ``epsilon_lower_bound``, the ``threshold`` used, its counts and the method.
    """
    mem = np.asarray(member_scores, np.float64).ravel()
    non = np.asarray(nonmember_scores, np.float64).ravel()
    if mem.size < 2 or non.size < 2:
        raise ValueError("need at least two member and two non-member scores")
    if correction not in ("split", "bonferroni"):
        raise ValueError(f"correction must be 'split' or 'bonferroni', got {correction!r}")

    def best(m, n, level, thresholds):
        out = (0.0, float("inf"), 0, 0)
        for t in thresholds:
            tp, fp = int(np.sum(m >= t)), int(np.sum(n >= t))
            e = epsilon_lower_bound_from_counts(tp, m.size, fp, n.size, delta, level)
            if e > out[0]:
                out = (e, float(t), tp, fp)
        return out

    if correction == "bonferroni":
        k = int(num_thresholds)
        thresholds = np.unique(np.quantile(np.concatenate([mem, non]), np.linspace(0, 1, k + 2)[1:-1]))
        eps, thr, tp, fp = best(mem, non, alpha / k, thresholds)
        return dict(epsilon_lower_bound=eps, threshold=thr, true_positives=tp, false_positives=fp,
                    num_members=int(mem.size), num_nonmembers=int(non.size), alpha=alpha, delta=delta,
                    correction=f"bonferroni over {k} thresholds")
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(mem.size), rng.permutation(non.size)
    m1, m2 = mem[pm[: mem.size // 2]], mem[pm[mem.size // 2:]]
    n1, n2 = non[pn[: non.size // 2]], non[pn[non.size // 2:]]
    _, thr, _, _ = best(m1, n1, alpha, np.unique(np.concatenate([m1, n1])))
    if not math.isfinite(thr):
        eps, tp, fp = 0.0, 0, 0
    else:
        tp, fp = int(np.sum(m2 >= thr)), int(np.sum(n2 >= thr))
        eps = epsilon_lower_bound_from_counts(tp, m2.size, fp, n2.size, delta, alpha)
    return dict(epsilon_lower_bound=eps, threshold=thr, true_positives=tp, false_positives=fp,
                num_members=int(m2.size), num_nonmembers=int(n2.size), alpha=alpha, delta=delta,
                correction="split (threshold chosen on one half, measured on the other)")


# ------------------------------------------------------------------------------------------------------------
# One-run audit (Steinke, Nasr & Jagielski 2023)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = DEFAULT_DELTA) -> float:
    """Upper bound on ``P[at least v of r guesses right]`` for an (epsilon, delta)-DP algorithm, m canaries.

    With ``p = e^eps / (1 + e^eps)`` and ``B ~ Binomial(r, p)``:
    ``P <= P[B >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= B < v] / i``  (delta = 0 leaves the binomial tail).
    """
    m, r, v = int(m), int(r), int(v)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (right guesses <= guesses <= canaries), got v={v} r={r} m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)      # P[B = v-1], P[B = v-2], ..., P[B = 0]
    ratio = np.cumsum(pmf) / np.arange(1, v + 1)                 # P[v-i <= B < v] / i for i = 1..v
    return min(tail + 2.0 * m * delta * float(np.max(ratio)), 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float = DEFAULT_DELTA, beta: float = 0.05,
                                tol: float = 1e-7) -> float:
    """Largest epsilon rejected at significance ``beta`` by ``v`` right out of ``r`` guesses on ``m`` canaries.

    Reference: m = 1000, r = v = 100, delta 0, beta 0.05 -> logit(0.05^(1/100)) = 3.4930 (docs/privacy.md).
    """
    _check_prob("beta", beta)
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return float("inf")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_ceiling(m: int, r: int, delta: float = DEFAULT_DELTA, beta: float = 0.05, tol: float = 1e-7) -> float:
    """The largest epsilon a one-run audit with ``m`` canaries and ``r`` guesses can ever certify: the bound when
    all ``r`` guesses are right.

    A claim at or above the ceiling cannot be contradicted by this audit however badly the run leaks (a run
    with no noise at all scores at most the ceiling), so such an audit is *inconclusive*, never a pass.
    Example: m = 640, r = 320, delta 1e-5, beta 0.05 -> 4.649.
    """
    return one_run_epsilon_lower_bound(m, r, r, delta, beta, tol)


def one_run_num_canaries(claimed_epsilon: float, max_canaries: int, delta: float = DEFAULT_DELTA,
                         beta: float = 0.05, guess_fraction: float = 0.5, min_canaries: int = 200) -> int:
    """Number of canaries for a one-run audit of ``claimed_epsilon``, chosen before any training.

    Rule: the smallest ``m`` (at least ``min_canaries``, at most ``max_canaries``) whose ceiling
    (:func:`one_run_ceiling` with ``r = guess_fraction * m`` guesses) is at least ``2 * claimed_epsilon``, so a
    run that leaks clearly more than it claims can be caught without perfect separation; when no ``m`` up to
    ``max_canaries`` gets there, the ``m`` with the highest ceiling (more canaries raise the ceiling until the
    ``2 m delta`` term of the bound takes over). The choice uses only public quantities (claim, delta, beta),
    never the coins or the scores, so it costs the bound nothing.
    """
    max_canaries = int(max_canaries)
    if max_canaries < 2:
        raise ValueError(f"need at least 2 canaries, got max_canaries={max_canaries}")
    if not 0 < guess_fraction <= 1:
        raise ValueError(f"guess_fraction must lie in (0, 1], got {guess_fraction}")
    lo = min(int(min_canaries), max_canaries)
    grid = sorted({lo, max_canaries} | {int(x) for x in np.geomspace(lo, max_canaries, 24)})
    target = 2.0 * float(claimed_epsilon)
    best_m, best_c = grid[0], -1.0
    for m in grid:
        r = max(2, 2 * int(m * guess_fraction / 2))
        c = one_run_ceiling(m, min(r, m), delta, beta, tol=1e-4)
        if c >= target:
            return m
        if c < best_c - 1e-3:   # past the peak: the delta term now dominates
            break
        if c > best_c:
            best_m, best_c = m, c
    return best_m


def one_run_guesses(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, k_pos: int, k_neg: int
                    ) -> tuple[int, int]:
    """Guess "in" for the ``k_pos`` highest scores, "out" for the ``k_neg`` lowest, abstain on the rest.

    Returns ``(r, v)``: guesses made and guesses right. ``k_pos`` and ``k_neg`` must be fixed before looking at
    the scores (choosing them after is a search that the bound does not pay for).
    """
    s = np.asarray(scores, np.float64).ravel()
    inc = np.asarray(included, bool).ravel()
    if s.shape != inc.shape:
        raise ValueError(f"scores and included must have the same length, got {s.shape} and {inc.shape}")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"need 0 <= k_pos, k_neg and k_pos + k_neg <= {s.size} canaries")
    order = np.argsort(s, kind="stable")
    right = int(np.sum(~inc[order[:k_neg]])) + (int(np.sum(inc[order[s.size - k_pos:]])) if k_pos else 0)
    return k_pos + k_neg, right
