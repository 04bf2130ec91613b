"""Privacy report of a run: self-contained HTML with the plots embedded as base64 PNGs, or Markdown that links
the plots as PNG files written next to it (``jaxdp report --markdown``).

The HTML loads nothing from outside the file (no scripts, stylesheets, fonts or image links), so it can be
mailed, archived or attached to a model card as is.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import os
from typing import Any
from collections.abc import Mapping

from jaxdp._io import atomic_write
from jaxdp.report import plots
from jaxdp.train.summary import RunSummary

_EPOCH_COLUMNS = ("epoch", "step", "train_loss", "test_accuracy", "epsilon", "clip_fraction")

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em} .sub{color:#666;font-size:.9em}
.guarantee{background:#eef6ee;border-left:4px solid #2a7a2a;padding:.7em 1em;margin:1em 0}
.nodp{background:#fbeeee;border-left:4px solid #b22;padding:.7em 1em;margin:1em 0}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left} th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _roc_aucs(audit: Mapping[str, Any]) -> dict:
    """AUC of every attack whose ROC the audit holds, keyed as the ROC curves are (the legend labels each curve)."""
    aucs = {name.split(" (")[0]: auc for name, auc in (audit.get("aucs") or {}).items()}
    aucs.setdefault(str(audit.get("attack")).split(" (")[0], audit.get("auc"))
    return {n: aucs[n] for n in audit.get("roc", {}) if aucs.get(n) is not None}


def _one_run_text(o: Mapping[str, Any] | None) -> str | None:
    if not o:
        return None
    verdicts: dict[Any, str] = {True: "PASS", False: "FAIL"}
    verdict = verdicts.get(o.get("passed"), "?")
    return (f"epsilon lower bound {_fmt(o.get('epsilon_lower_bound'))} vs claimed {_fmt(o.get('claimed_epsilon'))}: "
            f"{verdict} ({o.get('num_correct')}/{o.get('num_guesses')} guesses right, {o.get('num_canaries')} "
            f"{o.get('canary_type')} canaries, beta {_fmt(o.get('beta'))})")


def _row_value(card: Mapping[str, Any], k: str) -> str:
    if k == "one_run_audit":
        return _fmt(_one_run_text(card.get(k)))
    return _fmt(card.get(k))


def collect_figures(metrics: RunSummary | Mapping[str, Any], audit: Mapping[str, Any] | None = None,
                    sweep: Mapping[str, Any] | None = None) -> list[tuple[str, str, bytes]]:
    """``[(title, caption, png_bytes)]`` for the report, in order (``metrics``: the run's record)."""
    metrics = RunSummary.coerce(metrics)
    figs = [("Epsilon against steps",
             "The accountant's ε after t steps of this run's mechanism (recomputed at 20 step counts); dots: the "
             "ε the trainer recorded at the end of each epoch.", plots.plot_epsilon_vs_steps(metrics)),
            ("Training curve", "Training loss and test accuracy per epoch.", plots.plot_training(metrics)),
            ("Clipping over training",
             "Left: fraction of examples whose gradient was clipped, per epoch (overall and per clipping group). "
             "Right: mean per-example gradient norm of each layer before clipping; the dashed line is the clip "
             "norm C. Mostly-clipped training keeps gradient directions but loses their sizes; rarely-clipped "
             "training pays noise for a C larger than needed.", plots.plot_clipping(metrics))]
    if audit and audit.get("roc"):
        figs.append(("Membership-inference ROC",
                     f"Audit {os.path.basename(audit['file'])}: ROC of each attack on log-log axes (the low-FPR "
                     "region is where an attack is confident). The diagonal is a random guess.",
                     plots.plot_roc(audit["roc"], aucs=_roc_aucs(audit))))
    if sweep:
        figs.append(("Accuracy against epsilon",
                     "Final test accuracy of the same config trained at several target ε (noise calibrated to "
                     "each), with the non-private baseline.", plots.plot_accuracy_vs_epsilon(sweep)))
    return figs


_CARD_ROWS = ("epsilon", "delta", "accountant", "neighboring_relation", "noise_multiplier", "max_grad_norm",
              "clipping_method", "sampling", "sample_rate", "expected_batch_size", "steps", "epochs",
              "training_set_size", "final_test_accuracy", "membership_inference_auc", "membership_inference_attack",
              "one_run_audit", "ledger_dataset_epsilon",
              "library_version", "config_hash")


def render_html(card: Mapping[str, Any], metrics: RunSummary | Mapping[str, Any],
                audit: Mapping[str, Any] | None = None, sweep: Mapping[str, Any] | None = None) -> str:
    """The report as one self-contained HTML string (``card`` is the ``model_privacy`` section)."""
    import yaml
    e = _html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>jaxdp privacy report — {e(str(card.get('run_id')))}</title><style>{_CSS}</style></head><body>",
           f"<h1>Privacy report: {e(str(card.get('model')))} on {e(str(card.get('dataset')))}</h1>",
           f"<div class='sub'>run {e(str(card.get('run_id')))} · status {e(str(card.get('run_status')))} · "
           f"jaxdp {e(str(card.get('library_version')))} · generated "
           f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</div>",
           f"<div class='{'guarantee' if card.get('private') else 'nodp'}'>{e(card['guarantee'])}</div>",
           "<h2>Model privacy</h2><table>"]
    for k in _CARD_ROWS:
        out.append(f"<tr><th>{e(k)}</th><td class='num'>{e(_row_value(card, k))}</td></tr>")
    out.append("</table><h2>Caveats</h2><ul>")
    out += [f"<li>{e(c)}</li>" for c in card.get("caveats", [])]
    out.append("</ul>")
    for title, caption, png in collect_figures(metrics, audit, sweep):
        out.append(f"<h2>{e(title)}</h2><figure><img alt='{e(title)}' src='{_png_uri(png)}'>"
                   f"<figcaption>{e(caption)}</figcaption></figure>")
    if sweep:
        out.append("<table><tr><th>target ε</th><th>ε spent</th><th>σ</th><th>test accuracy</th></tr>")
        for r in sorted(sweep.get("runs", []), key=lambda r: r.get("target_epsilon") or 0):
            out.append(f"<tr><td class='num'>{_fmt(r.get('target_epsilon'))}</td><td class='num'>"
                       f"{_fmt(r.get('epsilon'))}</td><td class='num'>{_fmt(r.get('noise_multiplier'))}</td>"
                       f"<td class='num'>{_fmt(r.get('final_test_accuracy'))}</td></tr>")
        b = sweep.get("non_private")
        if b:
            out.append(f"<tr><td>non-private</td><td class='num'>∞</td><td class='num'>0</td><td class='num'>"
                       f"{_fmt(b.get('final_test_accuracy'))}</td></tr>")
        out.append("</table>")
    out.append("<h2>Per-epoch metrics</h2><table><tr><th>epoch</th><th>step</th><th>train loss</th>"
               "<th>test accuracy</th><th>ε</th><th>clip fraction</th></tr>")
    for r in RunSummary.coerce(metrics).epochs or ():
        out.append("<tr>" + "".join(f"<td class='num'>{e(_fmt(getattr(r, k)))}</td>" for k in _EPOCH_COLUMNS)
                   + "</tr>")
    out.append("</table><h2>Model card section (YAML)</h2>")
    dumped = yaml.safe_dump({'model_privacy': dict(card)}, sort_keys=False, allow_unicode=True, width=100)
    out.append(f"<pre>{e(dumped)}"
               "</pre></body></html>")
    return "\n".join(out)


def render_markdown(card: Mapping[str, Any], metrics: RunSummary | Mapping[str, Any],
                    audit: Mapping[str, Any] | None = None,
                    sweep: Mapping[str, Any] | None = None, *, image_dir: str | None = None,
                    base_dir: str | os.PathLike = ".") -> str:
    """The report as Markdown.

    With ``image_dir`` (a folder name relative to the Markdown file's folder ``base_dir``) each plot is written
    there as a PNG and linked (``![title](image_dir/01-....png)``): the Markdown stays small and renders on
    GitHub. Without it the plots are inlined as ``data:`` URIs (one self-contained file, but large and not shown
    by every viewer)."""
    lines = [f"# Privacy report: {card.get('model')} on {card.get('dataset')}", "",
             f"run `{card.get('run_id')}` · status {card.get('run_status')} · jaxdp {card.get('library_version')}",
             "", f"> {card['guarantee']}", "", "## Model privacy", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_row_value(card, k)} |" for k in _CARD_ROWS]
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in card.get("caveats", [])]
    for i, (title, caption, png) in enumerate(collect_figures(metrics, audit, sweep), 1):
        if image_dir is None:
            link = _png_uri(png)
        else:
            slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
            name = f"{i:02d}-{slug}.png"
            atomic_write(os.path.join(base_dir, image_dir, name), png)
            link = f"{image_dir}/{name}"
        lines += ["", f"## {title}", "", f"![{title}]({link})", "", f"*{caption}*"]
    lines += ["", "## Per-epoch metrics", "", "| epoch | step | train loss | test accuracy | ε | clip fraction |",
              "|---|---|---|---|---|---|"]
    for r in RunSummary.coerce(metrics).epochs or ():
        lines.append("| " + " | ".join(_fmt(getattr(r, k)) for k in _EPOCH_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (temporary file in the same directory, then rename)."""
    atomic_write(path, text)


__all__ = ["collect_figures", "render_html", "render_markdown", "write_text"]
