"""Log-log ROC plots (PNG) of membership-inference attacks; needs matplotlib (``pip install jaxdp[plots]``).

:func:`plot_roc` is the one ROC plot of jaxdp: ``jaxdp audit`` draws its ``roc_<attack>.png`` with it and
``jaxdp report`` its ROC figure (``jaxdp.report.plots.plot_roc`` is this function).
"""
from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxdp.audit.metrics import AttackResult


def _curves(curves: Sequence[AttackResult] | Mapping[str, Mapping[str, Sequence[float]]],
            aucs: Mapping[str, float] | None) -> list[tuple[str, Any, Any]]:
    """``[(legend label, fpr, tpr)]`` of attack results, or of a ``{name: {"fpr": [...], "tpr": [...]}}`` mapping
    (an audit JSON's ROC points; ``aucs`` adds each curve's AUC to its label)."""
    if isinstance(curves, Mapping):
        out = []
        for name, r in curves.items():
            auc = (aucs or {}).get(name)
            out.append((name + (f" (AUC {auc:.3f})" if auc is not None else ""), r["fpr"], r["tpr"]))
        return out
    return [(f"{r.attack} (AUC {r.auc:.3f}, TPR@0.1% {r.tpr_at_fpr.get(0.001, float('nan')):.1%})", r.fpr, r.tpr)
            for r in curves]


def plot_roc(curves: Sequence[AttackResult] | Mapping[str, Mapping[str, Sequence[float]]],
             path: str | os.PathLike | None = None, *, aucs: Mapping[str, float] | None = None,
             title: str = "Membership inference ROC") -> bytes:
    """Log-log ROC curves (TPR against FPR, both from 1e-4 to 1); returns the PNG bytes, also written to ``path``
    (atomically) when given. The diagonal is a random guess.

    The log scale shows the low-FPR regime where an attack is confident (Carlini et al. 2022).

    Args:
      curves: :class:`~jaxdp.audit.AttackResult` s (labelled with their AUC and TPR at 0.1% FPR), or the ROC
        points of an audit JSON, ``{name: {"fpr": [...], "tpr": [...]}}`` (labelled with ``aucs[name]``).
      path: where to write the PNG (optional).
      aucs: AUC per curve name, for the mapping form.
      title: the figure title.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("plotting needs matplotlib: pip install 'jaxdp[plots]'") from e
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    lo = 1e-4
    for label, fpr, tpr in _curves(curves, aucs):
        ax.plot(np.clip(np.asarray(fpr, float), lo, 1), np.clip(np.asarray(tpr, float), lo, 1), label=label)
    style_roc_axes(ax, title, lo, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        from jaxdp._io import atomic_write
        atomic_write(path, data)
    return data


def style_roc_axes(ax, title: str, lo: float = 1e-4, fontsize: int = 9) -> None:
    """Log-log ROC axes from ``lo`` to 1 with the random-guess diagonal."""
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="random guess")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=fontsize)
    ax.legend(fontsize=6, loc="lower right")


__all__ = ["plot_roc", "style_roc_axes"]
