"""Membership-inference metrics: ROC, AUC with a confidence interval, advantage, TPR at low FPR.

The AUC interval: when the scores come from several models trained on overlapping data (shadow models, LiRA),
the scores of one example are dependent, and DeLong's interval -- which treats every score as an independent
trial -- is too narrow (on a non-private model it covered the replication mean in 4-5 of 6 runs). Pass each
score's example id as ``member_groups`` / ``nonmember_groups`` and the interval is a percentile bootstrap that
resamples EXAMPLES (:func:`auc_bootstrap_interval`), which keeps the dependence (tested for coverage in
``tests/test_audit.py``). Without groups the scores are taken as independent and DeLong's interval is used.

Convention: an attack gives every candidate example a score, higher = "more likely a member". The ROC sweeps a
threshold over the scores. Following Carlini et al. (2022), the numbers that matter for privacy are the TPR at
LOW false-positive rates (0.1%, 1%), read off a log-log ROC, more than the AUC (an average-case number).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["AttackResult", "roc_curve", "auc", "auc_confidence_interval", "auc_bootstrap_interval", "tpr_at_fpr",
           "evaluate_attack", "loss_threshold_attack"]

DEFAULT_FPRS = (0.001, 0.01)


def _scores(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member_scores, np.float64).ravel()
    n = np.asarray(nonmember_scores, np.float64).ravel()
    if m.size == 0 or n.size == 0:
        raise ValueError("need at least one member score and one non-member score")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        raise ValueError("attack scores must be finite (a NaN/inf loss? check the model's outputs)")
    return m, n


def roc_curve(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: rule "member iff score >= threshold", thresholds in decreasing order.

    Starts at (0, 0) with threshold +inf; tied scores move together (no interpolation inside a tie).
    """
    m, n = _scores(member_scores, nonmember_scores)
    s = np.concatenate([m, n])
    y = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]     # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return (np.r_[0.0, fp / n.size], np.r_[0.0, tp / m.size], np.r_[np.inf, s[last]])


def auc(member_scores, nonmember_scores) -> float:
    """Area under the ROC = P[member score > non-member score] + P[tie] / 2 (Mann-Whitney)."""
    m, n = _scores(member_scores, nonmember_scores)
    ranks = stats.rankdata(np.concatenate([m, n]))
    return float((ranks[: m.size].sum() - m.size * (m.size + 1) / 2) / (m.size * n.size))


def auc_confidence_interval(member_scores, nonmember_scores, level: float = 0.95) -> tuple[float, float]:
    """DeLong et al. (1988) normal-approximation interval for the AUC (assumes independent scores)."""
    m, n = _scores(member_scores, nonmember_scores)
    a = auc(m, n)
    if m.size < 2 or n.size < 2:
        return 0.0, 1.0
    all_r = stats.rankdata(np.concatenate([m, n]))
    rm, rn = stats.rankdata(m), stats.rankdata(n)
    v10 = (all_r[: m.size] - rm) / n.size          # per member: fraction of non-members below it
    v01 = 1.0 - (all_r[m.size:] - rn) / m.size      # per non-member: fraction of members above it
    se = np.sqrt(np.var(v10, ddof=1) / m.size + np.var(v01, ddof=1) / n.size)
    z = stats.norm.ppf(0.5 + level / 2)
    return max(0.0, a - z * se), min(1.0, a + z * se)


def auc_bootstrap_interval(member_scores, nonmember_scores, member_groups, nonmember_groups,
                           level: float = 0.95, num_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval for the AUC that resamples GROUPS (examples), not scores.

    ``member_groups[i]`` / ``nonmember_groups[j]`` name the example each score belongs to (e.g. its column in an
    ``[M, N]`` score matrix). Each replicate draws the ``G`` groups with replacement and recomputes the pooled
    AUC with every score of a drawn group (weighted by how often it was drawn), so scores of one example stay
    together: the interval holds when examples are independent, whatever the dependence within an example.
    Seeded (``seed``): the same inputs give the same interval.
    """
    m, n = _scores(member_scores, nonmember_scores)
    gm = np.asarray(member_groups).ravel()
    gn = np.asarray(nonmember_groups).ravel()
    if gm.shape != m.shape or gn.shape != n.shape:
        raise ValueError(f"need one group id per score: {gm.size} member groups for {m.size} scores, "
                         f"{gn.size} non-member groups for {n.size} scores")
    if not 0 < level < 1 or int(num_bootstrap) < 10:
        raise ValueError("need 0 < level < 1 and num_bootstrap >= 10")
    groups, inv = np.unique(np.concatenate([gm, gn]), return_inverse=True)
    im, in_ = inv[: m.size], inv[m.size:]
    uniq, sinv = np.unique(np.concatenate([m, n]), return_inverse=True)
    sm, sn = sinv[: m.size], sinv[m.size:]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(groups.size, np.full(groups.size, 1.0 / groups.size), size=int(num_bootstrap))
    reps: list[np.ndarray] = []
    for c in range(0, counts.shape[0], 64):          # 64 replicates at a time: [64, distinct scores] arrays
        w = counts[c:c + 64].astype(np.float64)
        b = w.shape[0]
        wm, wn = w[:, im], w[:, in_]                  # weight of every score in each replicate
        per_value = np.bincount((np.arange(b)[:, None] * uniq.size + sn[None]).ravel(), weights=wn.ravel(),
                                minlength=b * uniq.size).reshape(b, uniq.size)
        below = np.cumsum(per_value, axis=1) - per_value                 # non-member weight strictly below
        num = np.sum(wm * (np.take_along_axis(below, np.broadcast_to(sm, wm.shape), 1)
                           + 0.5 * np.take_along_axis(per_value, np.broadcast_to(sm, wm.shape), 1)), axis=1)
        den = wm.sum(1) * wn.sum(1)
        reps.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
    out = np.concatenate(reps)
    out = out[np.isfinite(out)]
    a = (1 - level) / 2
    return float(np.quantile(out, a)), float(np.quantile(out, 1 - a))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target_fpr: float) -> float:
    """Largest TPR on the ROC whose FPR is at most ``target_fpr`` (no interpolation: achievable points only)."""
    ok = fpr <= target_fpr + 1e-12
    return float(np.max(tpr[ok])) if np.any(ok) else 0.0


@dataclasses.dataclass
class AttackResult:
    """Outcome of a membership-inference attack.

    ``advantage`` is ``max_t (TPR - FPR)`` (Yeom et al. 2018); ``tpr_at_fpr`` maps each target FPR to the TPR
    achieved there; ``roc`` holds the full curve (fpr, tpr arrays).
    """

    attack: str
    auc: float
    auc_ci: tuple[float, float]
    advantage: float
    tpr_at_fpr: dict
    num_members: int
    num_nonmembers: int
    fpr: np.ndarray
    tpr: np.ndarray
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self, include_roc: bool = False, max_roc_points: int = 2000) -> dict:
        d = dict(attack=self.attack, auc=self.auc, auc_ci95=list(self.auc_ci), advantage=self.advantage,
                 tpr_at_fpr={f"{k:g}": v for k, v in self.tpr_at_fpr.items()},
                 num_members=self.num_members, num_nonmembers=self.num_nonmembers, **self.extra)
        if include_roc:
            idx = np.unique(np.r_[np.round(np.geomspace(1, self.fpr.size, max_roc_points)).astype(int) - 1])
            d["roc"] = dict(fpr=self.fpr[idx].tolist(), tpr=self.tpr[idx].tolist())
        return d

    def summary(self) -> str:
        low = ", ".join(f"TPR@{k:.1%} FPR = {v:.2%}" for k, v in self.tpr_at_fpr.items())
        return (f"{self.attack}: AUC {self.auc:.3f} (95% CI {self.auc_ci[0]:.3f}-{self.auc_ci[1]:.3f}), "
                f"advantage {self.advantage:.3f}, {low} [{self.num_members} members, "
                f"{self.num_nonmembers} non-members]")


def evaluate_attack(member_scores, nonmember_scores, attack: str = "attack",
                    fprs: Sequence[float] = DEFAULT_FPRS, *, member_groups=None, nonmember_groups=None,
                    **extra) -> AttackResult:
    """All metrics of an attack from its scores on known members and non-members (higher = member).

    ``member_groups`` / ``nonmember_groups``: the example id of every score when several scores come from one
    example (pooled shadow models); the AUC interval is then a bootstrap over examples
    (:func:`auc_bootstrap_interval`), else DeLong's (independent scores).
    """
    m, n = _scores(member_scores, nonmember_scores)
    fpr, tpr, _ = roc_curve(m, n)
    if (member_groups is None) != (nonmember_groups is None):
        raise ValueError("give both member_groups and nonmember_groups, or neither")
    if member_groups is None:
        ci, extra = auc_confidence_interval(m, n), {"auc_ci_method": "DeLong (independent scores)", **extra}
    else:
        ci = auc_bootstrap_interval(m, n, member_groups, nonmember_groups)
        extra = {"auc_ci_method": "bootstrap over examples (1000 replicates)", **extra}
    return AttackResult(attack=attack, auc=auc(m, n), auc_ci=ci,
                        advantage=float(np.max(tpr - fpr)), tpr_at_fpr={f: tpr_at_fpr(fpr, tpr, f) for f in fprs},
                        num_members=int(m.size), num_nonmembers=int(n.size), fpr=fpr, tpr=tpr, extra=dict(extra))


def loss_threshold_attack(member_losses: Sequence[float], nonmember_losses: Sequence[float],
                          fprs: Sequence[float] = DEFAULT_FPRS, *, member_groups=None,
                          nonmember_groups=None) -> AttackResult:
    """Loss-threshold membership inference (Yeom et al. 2018): "member iff loss <= t", swept over t.

    Works for any model: pass the per-example losses of the trained model on examples known to be in its
    training set (``member_losses``) and on examples from the same distribution that were not
    (``nonmember_losses``). An AUC near 0.5 means the losses do not reveal membership.
    """
    m, n = _scores(member_losses, nonmember_losses)
    return evaluate_attack(-m, -n, attack="loss_threshold", fprs=fprs, member_groups=member_groups,
                           nonmember_groups=nonmember_groups)
