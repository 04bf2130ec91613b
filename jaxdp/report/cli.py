"""``jaxdp report`` (model card section and HTML/Markdown report of a run) and ``jaxdp sweep``.

    jaxdp report --run DIR [--model-card card.yaml] [--audit audit.json] [--ledger PATH --dataset-id ID]
                 [--html OUT.html | --markdown OUT.md] [--sweep SWEEP_DIR/sweep.json] [--json]
    jaxdp sweep --config FILE --epsilons 1 2 4 8 [--out DIR] [--no-baseline] [--json]
"""
from __future__ import annotations

import argparse
import os
import sys

from jaxdp import _cli


def _report(args: argparse.Namespace) -> int:
    from jaxdp.report import modelcard
    record = modelcard.with_run_config(args.run, modelcard.load_run(args.run))   # the one read of metrics.json
    card = modelcard.build_model_privacy(args.run, audit=args.audit, ledger=args.ledger,
                                         dataset_id=args.dataset_id, metrics=record)
    written = []
    if args.model_card:
        modelcard.write_model_card(args.model_card, card)
        written.append(args.model_card)
    if args.html or args.markdown:
        from jaxdp.report import html
        # The plots recompute epsilon from the run's own mechanism: the same record the card was built from.
        from jaxdp.report.sweep import load_sweep
        audit = modelcard.read_audit(modelcard.find_audit(args.run, args.audit))
        sweep = load_sweep(args.sweep) if args.sweep else None
        if args.html:
            html.write_text(args.html, html.render_html(card, record, audit, sweep))
            written.append(args.html)
        if args.markdown:
            stem = os.path.splitext(os.path.basename(args.markdown))[0]
            html.write_text(args.markdown, html.render_markdown(
                card, record, audit, sweep, image_dir=f"{stem}_files",
                base_dir=os.path.dirname(os.path.abspath(args.markdown))))
            written.append(args.markdown)
    elif args.sweep:
        raise ValueError("--sweep is used by the report: add --html OUT.html or --markdown OUT.md")
    if args.json:
        _cli.emit(args, {"model_privacy": card, "written": written})
    else:
        import yaml
        sys.stdout.write(yaml.safe_dump({"model_privacy": card}, sort_keys=False, allow_unicode=True, width=100))
        for w in written:
            print(f"wrote {w}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from jaxdp.report.sweep import run_sweep
    s = run_sweep(args.config, args.epsilons, args.out, baseline=not args.no_baseline,
                  progress=not (args.no_progress or args.json), log=not args.json)
    if args.json:
        _cli.emit(args, s)
        return 0
    print()
    print(f"{'run':<14}{'target eps':>11}{'eps spent':>11}{'sigma':>9}{'test acc':>10}")
    for r in s["runs"]:
        print(f"{'DP':<14}{r['target_epsilon']:>11g}{r['epsilon']:>11.4f}{r['noise_multiplier']:>9.3f}"
              f"{r['final_test_accuracy']:>10.4f}")
    if s["non_private"]:
        print(f"{'non-private':<14}{'-':>11}{'inf':>11}{0:>9.3f}{s['non_private']['final_test_accuracy']:>10.4f}")
    print(f"wrote {s['json_path']}" + (f" and {s['plot']}" if s.get("plot") else ""))
    return 0


_REPORT_DESCRIPTION = """\
The model_privacy section of a model card for a `jaxdp train` run (mechanism, epsilon/delta, audit results,
ledger total, guarantee sentence, caveats), printed as YAML (or JSON), written into a model card (YAML file or
the front matter of a Hugging Face README.md) and/or rendered as an HTML or Markdown report with plots.

    jaxdp report --run DIR [--model-card card.yaml|README.md] [--audit audit.json]
                 [--ledger PATH --dataset-id ID] [--html OUT.html | --markdown OUT.md]
                 [--sweep SWEEP_DIR/sweep.json] [--json]"""

_SWEEP_DESCRIPTION = """\
Train one `jaxdp train` config at several target epsilons (the noise multiplier calibrated to each) plus the
non-private baseline, and write OUT/sweep.json (and an accuracy-against-epsilon plot) for `jaxdp report --sweep`.
Every run is a full private training run on the data: with a privacy ledger each one is charged.

    jaxdp sweep --config FILE --epsilons 1 2 4 8 [--out DIR] [--no-baseline] [--json]"""


def register(sub) -> None:
    p = sub.add_parser("report", help="model-card privacy section and a self-contained HTML/Markdown report",
                       description=_REPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by `jaxdp train` (metrics.json)")
    p.add_argument("--model-card", help="model card to create or update: a YAML file, or a Hugging Face README.md "
                                        "(the section goes into its YAML front matter); only model_privacy changes")
    p.add_argument("--audit", help="audit_<attack>.json of `jaxdp audit` (default: found in DIR or DIR/audit)")
    p.add_argument("--ledger", help="privacy ledger (path or URL) for the dataset's total epsilon")
    p.add_argument("--dataset-id", help="the dataset's id in the ledger (default: the run's dataset name)")
    p.add_argument("--html", help="write the HTML report here")
    p.add_argument("--markdown", help="write the Markdown report here (plots as PNGs in <name>_files/ next to it)")
    p.add_argument("--sweep", help="sweep.json of `jaxdp sweep` to include (accuracy against epsilon)")
    _cli.add_json_flag(p, "the model_privacy section")
    p.set_defaults(func=_report)
    p = sub.add_parser("sweep", help="train a config at several target epsilons plus the non-private baseline",
                       description=_SWEEP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config of `jaxdp train`")
    p.add_argument("--epsilons", type=float, nargs="+", required=True, help="target epsilons, e.g. 1 2 4 8")
    p.add_argument("--out", help="output directory (default: <output.dir>/sweep)")
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private baseline")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _cli.add_json_flag(p)
    p.set_defaults(func=_sweep)
