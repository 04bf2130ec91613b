"""How DP cost grows with the work: DP / non-private step time and XLA memory over batch and sequence length.

Runs ``benchmarks/scale.py`` once per (batch, seq_len) point with the given rows (default: the scanned + remat'd
GPT-2, non-private and jaxdp ``auto``), then writes one JSON with every point, a table and a two-panel plot
(ratio of step times and of XLA peak memory, against batch at a fixed sequence length and against sequence
length at a fixed batch).

    PYTHONPATH=. python benchmarks/scale_sweep.py --layers 4 --d-model 256 --heads 4 --vocab 8192 \\
        --batches 2,4,8,16 --seq-lens 64,128,256 --json benchmarks/results/scale_cpu_sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batches", default="2,4,8,16", help="swept at the middle sequence length")
    p.add_argument("--seq-lens", default="64,128,256", help="swept at the middle batch")
    p.add_argument("--rows", default="jax_nonprivate_scan,jaxdp_auto_scan")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    seqs = [int(x) for x in a.seq_lens.split(",")]
    b_mid, t_mid = batches[len(batches) // 2], seqs[len(seqs) // 2]
    points = sorted({(b, t_mid) for b in batches} | {(b_mid, t) for t in seqs})
    dp_row, np_row = [r for r in a.rows.split(",") if "nonprivate" not in r][0], a.rows.split(",")[0]
    out: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "loadavg_start": os.getloadavg(),
                           "rows": a.rows, "points": []}
    for b, t in points:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "p.json")
            subprocess.run([sys.executable, os.path.join(HERE, "scale.py"), "--layers", str(a.layers),
                            "--d-model", str(a.d_model), "--heads", str(a.heads), "--vocab", str(a.vocab),
                            "--batch", str(b), "--seq-len", str(t), "--steps", str(a.steps), "--rows", a.rows,
                            "--timeout", str(a.timeout), "--json", path], check=False)
            res = json.load(open(path)) if os.path.exists(path) else {"rows": {}}
        out["points"].append(dict(batch=b, seq_len=t, rows=res["rows"], versions=res.get("versions")))
        print(b, t, {r: v.get("median_s", v.get("error")) for r, v in res["rows"].items()}, flush=True)
    out["loadavg_end"] = os.getloadavg()
    lines = ["| batch | seq | non-private s | DP s | DP / non-private time | non-private MB | DP MB | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for pt in out["points"]:
        n, d = pt["rows"].get(np_row, {}), pt["rows"].get(dp_row, {})
        ok = "median_s" in n and "median_s" in d
        pt["time_ratio"] = d["median_s"] / n["median_s"] if ok else None
        pt["mem_ratio"] = (d["xla_peak_mb"] / n["xla_peak_mb"]) if n.get("xla_peak_mb") and d.get("xla_peak_mb") \
            else None
        lines.append(f"| {pt['batch']} | {pt['seq_len']} | {n.get('median_s', 0):.3f} | {d.get('median_s', 0):.3f} | "
                     f"{pt['time_ratio'] and round(pt['time_ratio'], 2)} | {round(n.get('xla_peak_mb') or 0)} | "
                     f"{round(d.get('xla_peak_mb') or 0)} | {pt['mem_ratio'] and round(pt['mem_ratio'], 2)} |")
    print("\n".join(lines))
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.splitext(a.json)[0] + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (key, fixed, val) in enumerate((("batch", "seq_len", t_mid), ("seq_len", "batch", b_mid))):
        pts = sorted((pt for pt in out["points"] if pt[fixed] == val), key=lambda q: q[key])
        ax[i].plot([q[key] for q in pts], [q["time_ratio"] for q in pts], "o-", label="step time")
        ax[i].plot([q[key] for q in pts], [q["mem_ratio"] for q in pts], "s--", label="XLA peak memory")
        ax[i].set_xlabel(f"{key} ({fixed} = {val})")
        ax[i].set_ylabel(f"{dp_row} / {np_row}")
        ax[i].legend()
    fig.suptitle(f"GPT-2 {a.layers}x{a.d_model}, vocab {a.vocab}: DP / non-private")
    fig.tight_layout()
    fig.savefig(os.path.splitext(a.json)[0] + ".png", dpi=90)


if __name__ == "__main__":
    main()
