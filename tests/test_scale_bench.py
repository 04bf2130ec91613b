"""The scale benchmark's bookkeeping (no model is built): which non-private row each ratio divides by, and the
table's ratio / extrapolation columns."""
from __future__ import annotations

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "scale_bench", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py")
assert _spec is not None and _spec.loader is not None
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def test_every_row_has_a_nonprivate_baseline_in_rows():
    for row in scale.ROWS:
        assert scale._base(row) in scale.ROWS, row
    assert scale._base("jaxdp_auto_scan") == "jax_nonprivate_scan"
    assert scale._base("jaxprivacy_loop") == "jax_nonprivate_loop"
    assert scale._base("jaxdp_auto_lora") == "jax_nonprivate_lora"
    assert scale._base("opacus_ghost") == "torch_nonprivate"
    assert scale._base("vit_jaxdp_auto") == "vit_nonprivate"


def test_table_ratios():
    rows = {"jax_nonprivate_loop": dict(median_s=2.0), "jaxdp_auto_loop": dict(median_s=3.0, fit_16gb_batch=123),
            "jaxprivacy_loop": dict(median_s=6.0), "torch_nonprivate": dict(median_s=1.0),
            "opacus_ghost": dict(median_s=4.0), "opacus_hooks": dict(median_s=5.0),
            "wrn_nonprivate": dict(error="RuntimeError: x")}
    lines = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in scale.table({"rows": rows}).splitlines()[2:]}
    dp = lines["jaxdp_auto_loop"]
    assert dp[2] == "1.50" and dp[3] == "0.75" and dp[4] == "0.50" and dp[8] == "123"
    assert lines["opacus_ghost"][2] == "4.00" and lines["opacus_hooks"][3] == "1.25"
    assert "failed: RuntimeError" in lines["wrn_nonprivate"][1]
