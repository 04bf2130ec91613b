"""Report plots (PNG, matplotlib with the Agg backend; ``pip install 'jaxdp[plots]'``).

Each ``plot_*`` function draws one figure from the JSON a run, an audit or a sweep wrote, returns the PNG
bytes, and also writes them to ``path`` when one is given.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any
from collections.abc import Mapping

import numpy as np

from jaxdp._io import atomic_write
from jaxdp.audit.plot import plot_roc  # noqa: F401  (the one ROC plot; re-exported for the report)
from jaxdp.train.summary import RunSummary


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("plots need matplotlib: pip install 'jaxdp[plots]'") from e
    return plt


def _finish(fig, path: str | os.PathLike | None) -> bytes:
    plt = _plt()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        atomic_write(path, data)
    return data


def _event(m: Mapping[str, Any], steps: int):
    """The :class:`jaxdp.accounting.Event` of ``steps`` steps of the run's mechanism, from the run's record."""
    from jaxdp.accounting import Event
    if m.get("sampling") not in ("poisson", "shuffle", "cyclic_poisson", "fixed_order"):
        raise ValueError(f"the run's record names sampling {m.get('sampling')!r}, which the report cannot "
                         "recompute; expected poisson, shuffle, cyclic_poisson or fixed_order")
    if m["sampling"] == "fixed_order" and (m.get("min_separation") is None or m.get("horizon") is None):
        raise ValueError("the run's record names sampling 'fixed_order' but not its min_separation and "
                         "horizon: its epsilon curve cannot be recomputed")
    batch = m.get("expected_batch_size")
    return Event.from_mechanism(m["noise_multiplier"], m.get("sample_rate"), steps, sampling=m["sampling"],
                                dataset_size=m.get("training_set_size"),
                                batch_size=None if batch is None else int(round(batch)), bands=m.get("bands"),
                                mechanism=m.get("mechanism") or "dpsgd", min_separation=m.get("min_separation"),
                                horizon=m.get("horizon"))


def _num(x: float | None) -> str:
    return "not recorded" if x is None else f"{x:.3g}"


def _how(s: RunSummary) -> str:
    """The sampling of the run's record, in a few words for a legend."""
    if s.sampling == "shuffle":
        b = "not recorded" if s.expected_batch_size is None else int(round(s.expected_batch_size))
        return f"batch {b} of {s.training_set_size}, shuffled"
    if s.sampling == "cyclic_poisson":
        return f"cyclic Poisson, {s.bands} bands, p={_num(s.sample_rate)}"
    if s.sampling == "fixed_order":
        return f"BLT, fixed batch order {s.min_separation} apart, one Gaussian to step {s.horizon}"
    return f"Poisson q={_num(s.sample_rate)}" if s.sampling == "poisson" else f"{s.sampling} q={_num(s.sample_rate)}"


def epsilon_curve(metrics: RunSummary | Mapping[str, Any], points: int = 20) -> tuple[list[int], list[float]]:
    """``(steps, epsilons)`` at ``points`` step counts from 1 to the run's steps, recomputed from the mechanism
    (noise multiplier, sampling, sample rate) with the run's accountant and neighbouring relation at the run's
    delta -- all read from the run's record, never defaulted. A record without its neighbouring relation
    (runs written before it was recorded; ``jaxdp report`` fills it from the run's config.yaml) gives no curve."""
    from jaxdp.accounting import events_epsilon
    s = RunSummary.coerce(metrics)
    total, relation = s.steps or 0, s.neighboring_relation
    if not s.private or total <= 0 or relation is None:
        return [], []
    if s.delta is None or s.accountant is None:
        missing = "delta" if s.delta is None else "accountant"
        raise ValueError(f"the run's record has no {missing} (not recorded): its epsilon curve cannot be computed")
    record = s.to_dict()
    grid = sorted({int(round(t)) for t in np.linspace(1, total, min(points, total))} | {total})
    from absl import logging as absl_logging  # dp-accounting's RDP logs one line per excluded order
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        eps = [float(events_epsilon([_event(record, t)], s.delta, accountant=s.accountant,
                                    neighboring_relation=relation)) for t in grid]
    finally:
        absl_logging.set_verbosity(level)
    return grid, eps


def plot_epsilon_vs_steps(metrics: RunSummary | Mapping[str, Any], path: str | os.PathLike | None = None,
                          points: int = 20) -> bytes:
    """Epsilon spent against training steps: the accountant's curve for the mechanism, the per-epoch epsilons
    the trainer recorded (markers) and the target epsilon (dashed) when there was one."""
    from jaxdp.accounting import RELATION_LABELS
    plt = _plt()
    s = RunSummary.coerce(metrics)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    steps, eps = epsilon_curve(s, points)
    if steps:
        ax.plot(steps, eps, "-", color="C0", label=f"{str(s.accountant).upper()} accountant "
                                                     f"(σ={_num(s.noise_multiplier)}, {_how(s)}, "
                                                     f"{RELATION_LABELS.get(s.neighboring_relation or '')})")
        rows = [r for r in s.epochs or () if r.epsilon is not None and r.step is not None]
        if rows:
            ax.plot([r.step for r in rows], [r.epsilon for r in rows], "o", color="C1",
                    label="recorded at epoch ends")
        if s.target_epsilon:
            ax.axhline(s.target_epsilon, ls="--", color="0.4", lw=0.9, label=f"target ε={s.target_epsilon:g}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "non-private run: ε = ∞ (no guarantee)" if not s.private else
                "the run's record lacks its neighbouring relation: no curve", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("training step")
    ax.set_ylabel(f"ε (δ={s.delta:g})" if s.delta else "ε")
    ax.set_title("Privacy spent during training", fontsize=10)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def plot_accuracy_vs_epsilon(sweep: Mapping[str, Any], path: str | os.PathLike | None = None) -> bytes:
    """Final test accuracy against the epsilon actually spent, one point per private run of a sweep, with the
    non-private baseline as a horizontal line (``sweep.json`` of :func:`jaxdp.report.sweep.run_sweep`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    runs = [r for r in sweep.get("runs", []) if r.get("epsilon") is not None]
    runs.sort(key=lambda r: r["epsilon"])
    if runs:
        ax.plot([r["epsilon"] for r in runs], [r["final_test_accuracy"] for r in runs], "o-", color="C0",
                label="DP-SGD")
        for r in runs:
            ax.annotate(f"σ={r['noise_multiplier']:.2f}", (r["epsilon"], r["final_test_accuracy"]),
                        textcoords="offset points", xytext=(0, 7), ha="center", fontsize=6, color="0.3")
        from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([r["epsilon"] for r in runs]))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo, hi = runs[0]["epsilon"], runs[-1]["epsilon"]
        ax.set_xlim(lo / 1.3, hi * 1.3)
    base = sweep.get("non_private")
    if base and base.get("final_test_accuracy") is not None:
        ax.axhline(base["final_test_accuracy"], ls="--", color="C3",
                   label=f"non-private ({base['final_test_accuracy']:.3f})")
    ax.set_xlabel("ε spent (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Accuracy against privacy (δ={sweep.get('delta', 0):g})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return _finish(fig, path)


def plot_clipping(metrics: RunSummary | Mapping[str, Any], path: str | os.PathLike | None = None) -> bytes:
    """Clipping over training, per epoch: left, the fraction of examples clipped (overall and per clipping
    group; with flat clipping there is one group, ``all``); right, the mean per-example gradient norm of each
    layer (log scale) against the clip norm C."""
    plt = _plt()
    s = RunSummary.coerce(metrics)
    rows = [r for r in s.epochs or () if r.clip_fraction is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    if not rows:
        for a in (a1, a2):
            a.text(0.5, 0.5, "no clipping statistics\n(non-private run)", ha="center", va="center",
                   transform=a.transAxes)
        return _finish(fig, path)
    ep = [r.epoch for r in rows]
    a1.plot(ep, [r.clip_fraction for r in rows], "o-", color="k", lw=2, label="overall")
    groups = sorted({g for r in rows for g in (r.group_clip_fraction or {})} - {"all"})
    for g in groups:
        a1.plot(ep, [(r.group_clip_fraction or {}).get(g, math.nan) for r in rows], ".-", label=g)
    a1.set_ylim(-0.02, 1.02)
    a1.set_xlabel("epoch")
    a1.set_ylabel("fraction of examples clipped")
    a1.set_title("Clip fraction" + (" per clipping group" if groups else " (flat clipping)"), fontsize=10)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=6)
    layers = sorted({k for r in rows for k in (r.layer_grad_norm_mean or {})})
    for k in layers:
        a2.plot(ep, [(r.layer_grad_norm_mean or {}).get(k, math.nan) for r in rows], ".-", label=k)
    if s.max_grad_norm:
        a2.axhline(s.max_grad_norm, ls="--", color="0.3", lw=0.9, label=f"C={s.max_grad_norm:g}")
    a2.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter
    a2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    lo, hi = a2.get_ylim()
    if hi / max(lo, 1e-30) < 10:  # label minor ticks only when the axis spans less than a decade
        a2.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        a2.tick_params(axis="y", which="minor", labelsize=7)
    else:
        from matplotlib.ticker import LogLocator, NullFormatter
        a2.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a2.yaxis.set_minor_formatter(NullFormatter())
    a2.set_xlabel("epoch")
    a2.set_ylabel("mean per-example gradient norm")
    a2.set_title("Per-layer gradient norms (before clipping)", fontsize=10)
    a2.grid(alpha=0.3, which="both")
    a2.legend(fontsize=6)
    for a in (a1, a2):
        a.xaxis.get_major_locator().set_params(integer=True)
    return _finish(fig, path)


def plot_training(metrics: RunSummary | Mapping[str, Any], path: str | os.PathLike | None = None) -> bytes:
    """Training loss and test accuracy per epoch."""
    plt = _plt()
    rows = RunSummary.coerce(metrics).epochs or ()
    fig, a1 = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    ep = [r.epoch for r in rows]
    a1.plot(ep, [math.nan if r.train_loss is None else r.train_loss for r in rows], "o-", color="C0",
            label="train loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss", color="C0")
    a2 = a1.twinx()
    a2.plot(ep, [math.nan if r.test_accuracy is None else r.test_accuracy for r in rows], "s-", color="C2",
            label="test accuracy")
    a2.set_ylabel("test accuracy", color="C2")
    a1.xaxis.get_major_locator().set_params(integer=True)
    a1.set_title("Training curve", fontsize=10)
    a1.grid(alpha=0.3)
    return _finish(fig, path)


__all__ = ["epsilon_curve", "plot_epsilon_vs_steps", "plot_accuracy_vs_epsilon", "plot_roc", "plot_clipping",
           "plot_training"]
