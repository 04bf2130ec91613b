"""Log-log ROC plots (PNG) of membership-inference attacks; needs matplotlib (``pip install jaxdp[plots]``)."""
from __future__ import annotations

import os
from typing import Sequence

from jaxdp.audit.metrics import AttackResult


def plot_roc(results: Sequence[AttackResult], path: str | os.PathLike, title: str = "Membership inference") -> str:
    """Write a log-log ROC (TPR vs FPR, both from 1e-4 to 1) of ``results`` to ``path``; returns the path.

    The log scale shows the low-FPR regime where an attack is confident (Carlini et al. 2022); the diagonal is
    a random guess.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("plotting needs matplotlib: pip install 'jaxdp[plots]'") from e
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    lo = 1e-4
    for r in results:
        ax.plot(r.fpr.clip(lo), r.tpr.clip(lo), label=f"{r.attack} (AUC {r.auc:.3f}, "
                f"TPR@0.1% {r.tpr_at_fpr.get(0.001, float('nan')):.1%})")
    style_roc_axes(ax, title, lo, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def style_roc_axes(ax, title: str, lo: float = 1e-4, fontsize: int = 9) -> None:
    """Log-log ROC axes from ``lo`` to 1 with the random-guess diagonal (shared by audit and report plots)."""
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="random guess")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=fontsize)
    ax.legend(fontsize=6, loc="lower right")
