"""The scale benchmark's bookkeeping (no model is built): which non-private row each ratio divides by, and the
table's ratio / extrapolation columns; and a tiny end-to-end run of benchmarks/ghost_tolerance.py."""
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


def test_ghost_tolerance_benchmark_runs_and_reports_the_tolerance(tmp_path):
    """benchmarks/ghost_tolerance.py on a tiny GPT-2 (T = 32): every row runs, the built-in 2^-17 ghost path equals
    vmap (its examples fall back), the 2^-8 path reports certified upper bounds (above vmap, within 2^-8)."""
    import json
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "ghost_tolerance_bench", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ghost_tolerance.py")
    assert spec is not None and spec.loader is not None
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)
    out = tmp_path / "gt.json"
    gt.main(["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "32", "--batch", "4",
             "--steps", "1", "--layouts", "loop", "--json", str(out)])
    rows = json.loads(out.read_text())["layouts"]["loop"]
    assert set(rows) == {"non-private", "vmap", "ghost tau=2^-17", "ghost tau=2^-8", "auto"}
    assert all(r["median_s"] > 0 for r in rows.values())
    tight, loose = rows["ghost tau=2^-17"], rows["ghost tau=2^-8"]
    assert abs(tight["max_norm_ratio_vs_vmap"] - 1) < 1e-5 and abs(tight["min_norm_ratio_vs_vmap"] - 1) < 1e-5
    assert 1 < loose["max_norm_ratio_vs_vmap"] <= 1 + 2.0 ** -8 and loose["min_norm_ratio_vs_vmap"] >= 1 - 1e-6
    assert (tmp_path / "gt.txt").exists()
