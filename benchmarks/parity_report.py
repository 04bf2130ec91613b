"""Parity with Opacus: one table (and JSON) of everything tests/parity checks, plus training parity.

Rows:
  grad/<model>/<clipping>/<reduction>  noise 0, one step, same weights and batch (B = 16): max over all
        elements of |jaxdp - opacus| / (atol + rtol |opacus|) with atol 1e-5, rtol 1e-4 (<= 1 passes) for the
        per-example norms, the clipped sum (summed_grad) and the update (after division by E).
  noise/<clipping>/sigma=..,E=..       sample std of the noise in each library's update / (sigma ||C|| / E).
  compat/N=..,B=..                     Opacus make_private's expected batch size vs jaxdp.compat (compat mode).
  rdp/..  prv/..  calibrate/..         accounting: jaxdp vs Opacus (relative difference / Opacus interval).
  train/<library>                      mean test accuracy over 3 seeds and epsilon (PRV, RDP) of each library.

    PYTHONPATH=. python benchmarks/parity_report.py [--json parity.json] [--epochs 10] [--no-train]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "parity"))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import opacus  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import jax  # noqa: E402
import jaxdp  # noqa: E402
from jaxdp import accounting, compat  # noqa: E402
import parity_harness as h  # noqa: E402


def gradient_rows():
    rows = []
    for m in h.MODELS:
        for c, r in (("flat", "mean"), ("per_layer", "mean"), ("flat", "sum")):
            out = h.compare_step(m, c, r)
            worst = max(out["viol_norms"], out["viol_summed"], out["viol_update"])
            rows.append({"check": f"grad/{m}/{c}/{r}", "jaxdp": f"norms {out['viol_norms']:.3f}",
                         "opacus": f"sum {out['viol_summed']:.3f} upd {out['viol_update']:.3f}",
                         "metric": worst, "bound": "<= 1 (atol 1e-5, rtol 1e-4)", "ok": worst <= 1.0,
                         "params": out["num_params"]})
    return rows


def noise_rows():
    rows = []
    seed = 10
    for clip, label in ((1.0, "flat"), ([0.5, 0.2, 1.0, 0.3], "per_layer")):
        for sigma, e in ((1.1, 16.0), (0.5, 63.0)):
            seed += 1
            j, o, pred = h.noise_samples(sigma, clip, e, seed=seed)
            se = 1 / np.sqrt(2 * (j.size - 1))
            rj, ro = float(j.std() / pred), float(o.std() / pred)
            rows.append({"check": f"noise/{label}/sigma={sigma},E={e:g}", "jaxdp": f"{rj:.4f}", "opacus": f"{ro:.4f}",
                         "metric": abs(rj / ro - 1), "bound": f"< {5 * np.sqrt(2) * se:.3f} (5 s.e.)",
                         "ok": abs(rj - 1) < 5 * se and abs(ro - 1) < 5 * se
                               and abs(rj / ro - 1) < 5 * np.sqrt(2) * se})
    return rows


def compat_rows():
    rows = []
    for n, b in ((60_000, 64), (60_000, 256), (1_437, 64)):
        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
        mod = torch.nn.Linear(1, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, opt, _ = PrivacyEngine().make_private(module=mod, optimizer=torch.optim.SGD(mod.parameters(), lr=1.0),
                                                     data_loader=DataLoader(data, batch_size=b), noise_multiplier=0.0,
                                                     max_grad_norm=1.0, poisson_sampling=True)
        q = compat.sample_rate(n, b, opacus_compat=True)
        ours = compat.expected_batch_size(n, q, opacus_compat=True)
        default = compat.expected_batch_size(n, b / n)
        rows.append({"check": f"compat/N={n},B={b}", "jaxdp": f"E={ours:g} (default {default:g})",
                     "opacus": f"E={opt.expected_batch_size}", "metric": abs(ours - opt.expected_batch_size),
                     "bound": "== 0", "ok": ours == opt.expected_batch_size})
    return rows


def accounting_rows():
    rows = []
    for s, q, t, d in ((1.5, 0.04, 2250, 1e-5), (1.1, 256 / 60000, 14063, 1e-5), (0.8, 0.004, 3000, 1e-6),
                       (1.5, 0.05, 3000, 1e-6), (0.8, 0.05, 3000, 1e-5)):
        ours = accounting.compute_epsilon(s, q, t, d, accountant="rdp")
        theirs = h.opacus_rdp_eps(s, q, t, d)
        rel = ours / theirs - 1
        rows.append({"check": f"rdp/s={s},q={q:.4g},T={t},d={d:g}", "jaxdp": f"{ours:.6f}", "opacus": f"{theirs:.6f}",
                     "metric": rel, "bound": "|rel| <= 1e-6", "ok": abs(rel) <= 1e-6})
    for s, q, t, d in ((1.5, 0.04, 2250, 1e-5), (1.1, 256 / 60000, 14063, 1e-5), (0.8, 0.05, 100, 1e-5)):
        lo, est, up = h.opacus_prv_interval(s, q, t, d)
        ours = accounting.compute_epsilon(s, q, t, d, accountant="prv")
        rows.append({"check": f"prv/s={s},q={q:.4g},T={t},d={d:g}", "jaxdp": f"{ours:.4f}",
                     "opacus": f"{up:.4f} [{lo:.4f},{up:.4f}]", "metric": ours - up,
                     "bound": "|diff| <= 0.01, estimate in interval",
                     "ok": abs(ours - up) <= 0.01 and lo <= ours - 0.01 <= up})
    for target, q, t, acct in ((8.0, 0.04, 2250, "rdp"), (3.0, 0.01, 2000, "rdp"), (2.0, 0.02, 200, "prv")):
        ours = accounting.calibrate_noise_multiplier(target, 1e-5, q, steps=t, accountant=acct)
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=t, accountant=acct)
        eps = accounting.compute_epsilon(ours, q, t, 1e-5, accountant=acct)
        rows.append({"check": f"calibrate/{acct}/eps={target},q={q},T={t}", "jaxdp": f"{ours:.4f} (eps {eps:.4f})",
                     "opacus": f"{theirs:.4f}", "metric": ours - theirs, "bound": "sigma <= opacus, eps <= target",
                     "ok": ours <= theirs and eps <= target})
    return rows


def training_rows(epochs):
    import training_parity as tp
    out = tp.run((0, 1, 2), epochs)
    rows = []
    for lib, s in out["summary"].items():
        rows.append({"check": f"train/{lib}", "jaxdp" if lib == "jaxdp" else "opacus":
                     f"acc {s['accuracy_mean']:.4f}+-{s['accuracy_std']:.4f}",
                     "metric": s["accuracy_mean"],
                     "bound": f"eps PRV {s['epsilon_prv']:.4f} RDP {s['epsilon_rdp']:.4f}",
                     "ok": True})
    t = out["same_batch_trajectory"]
    rows.append({"check": f"train/same-batches,noise0,{t['steps']} steps", "jaxdp": f"acc {t['accuracy_jaxdp']:.4f}",
                 "opacus": f"acc {t['accuracy_opacus']:.4f}", "metric": t["max_abs_param_diff"],
                 "bound": "max |param diff| < 1e-4", "ok": t["max_abs_param_diff"] < 1e-4})
    return rows, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Parity with Opacus: gradients, noise, accounting, training.")
    ap.add_argument("--json", default=None, help="write the rows and metadata here")
    ap.add_argument("--epochs", type=int, default=10, help="training parity epochs (default 10)")
    ap.add_argument("--no-train", action="store_true", help="skip the (slowest) training parity section")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    rows = gradient_rows() + noise_rows() + compat_rows() + accounting_rows()
    training = None
    if not args.no_train:
        trows, training = training_rows(args.epochs)
        rows += trows
    widths = (44, 26, 30, 11, 36)
    print(f"{'check':{widths[0]}} {'jaxdp':{widths[1]}} {'opacus':{widths[2]}} {'metric':>{widths[3]}} "
          f"{'bound':{widths[4]}} ok")
    for r in rows:
        print(f"{r['check']:{widths[0]}} {r.get('jaxdp', ''):{widths[1]}} {r.get('opacus', ''):{widths[2]}} "
              f"{r['metric']:>{widths[3]}.3g} {r['bound']:{widths[4]}} {'yes' if r['ok'] else 'NO'}")
    meta = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "device": str(jax.devices()[0].device_kind)},
            "versions": {"jaxdp": jaxdp.__version__, "jax": jax.__version__, "torch": torch.__version__,
                         "opacus": opacus.__version__},
            "seconds": time.time() - t0}
    print(f"# {sum(r['ok'] for r in rows)}/{len(rows)} rows within bounds; {meta['seconds']:.0f} s; "
          f"torch {torch.__version__}, opacus {opacus.__version__}, jax {jax.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "training": training, **meta}, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
