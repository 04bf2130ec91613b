"""Model cards and privacy reports of training runs (``jaxdp report``, ``jaxdp sweep``); see ``docs/report.md``.

``build_model_privacy(run_dir)`` makes the ``model_privacy`` section of a model card from a ``jaxdp train`` run
directory (mechanism, (epsilon, delta), accountant, audit AUC, ledger total, a guarantee sentence, caveats);
``write_model_card(path, section)`` sets it in a model-card YAML without touching other keys.
``render_html`` / ``render_markdown`` produce a self-contained report with plots (needs the ``plots`` extra);
``run_sweep`` trains a config at several epsilons plus the non-private baseline.
"""
from jaxdp.report.modelcard import (  # noqa: F401
    build_model_privacy, find_audit, guarantee_sentence, ledger_total, load_metrics, load_run, read_audit,
    write_model_card,
)
from jaxdp.report.sweep import load_sweep, run_sweep  # noqa: F401

__all__ = ["build_model_privacy", "find_audit", "guarantee_sentence", "ledger_total", "load_metrics", "load_run",
           "read_audit", "write_model_card", "run_sweep", "load_sweep"]
