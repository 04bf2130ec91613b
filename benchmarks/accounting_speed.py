"""Speed of jaxdp.accounting: epsilon after 100k DP-SGD steps with each accountant, and noise calibration.

Setting: Poisson sampling q = 256/60000, sigma = 1.1, delta = 1e-5, 100,000 steps (about 427 MNIST epochs);
calibration to epsilon = 8 for the same q and steps. Targets (issue 3): RDP under 1 s, PLD and PRV under 5 s
on 2 cores. With the reference packages installed, the same epsilon is also timed with Opacus's PRVAccountant
and Microsoft's prv-accountant (the library jaxdp's "prv" deliberately does not use; see docs/accounting.md).

Each epsilon row is the median of --repeats fresh computations (no caching between them); a calibration is timed
once. Prints a table and writes JSON (machine, library versions, config, rows).

    PYTHONPATH=. python benchmarks/accounting_speed.py [--steps 100000] [--repeats 3] [--no-references]
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxdp import accounting as acct  # noqa: E402

TARGETS = {"rdp": 1.0, "pld": 5.0, "prv": 5.0}


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"cpu_count": os.cpu_count(), "cpus_usable": affinity, "platform": platform.platform(),
            "processor": _cpu_model(), "python": platform.python_version(),
            "device_kind": "cpu"}


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--sample-rate", type=float, default=256 / 60000)
    p.add_argument("--noise-multiplier", type=float, default=1.1)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-references", action="store_true", help="skip Opacus / prv-accountant rows")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "accounting_speed.json"))
    args = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    q, s, T, d = args.sample_rate, args.noise_multiplier, args.steps, args.delta

    rows = []
    for a in acct.ACCOUNTANTS:
        med, times, eps = timed(lambda: acct.compute_epsilon(s, q, T, d, a), args.repeats)  # noqa: B023 (called at once, in this iteration)
        rows.append({"task": "epsilon", "accountant": a, "library": "jaxdp (dp-accounting)", "epsilon": eps,
                     "median_s": med, "times_s": times, "target_s": TARGETS[a], "meets_target": med < TARGETS[a]})
    for a in acct.ACCOUNTANTS:
        t0 = time.perf_counter()
        sigma = acct.calibrate_noise_multiplier(args.target_epsilon, d, q, steps=T, accountant=a)
        sec = time.perf_counter() - t0
        rows.append({"task": f"calibrate to eps {args.target_epsilon:g}", "accountant": a,
                     "library": "jaxdp (dp-accounting)", "noise_multiplier": sigma,
                     "epsilon": acct.compute_epsilon(sigma, q, T, d, a), "median_s": sec, "times_s": [sec]})
    if not args.no_references:
        try:
            from opacus.accountants import PRVAccountant as OpacusPRV

            def opacus_prv():
                o = OpacusPRV()
                o.history = [(s, q, T)]
                return o.get_epsilon(d)
            med, times, eps = timed(opacus_prv, 1)
            rows.append({"task": "epsilon", "accountant": "prv", "library": f"opacus {_version('opacus')}",
                         "epsilon": eps, "median_s": med, "times_s": times})
        except ImportError:
            pass
        try:
            import warnings

            from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

            def ms_prv():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    a = PRVAccountant([PoissonSubsampledGaussianMechanism(sampling_probability=q,
                                                                          noise_multiplier=s)],
                                      eps_error=0.01, delta_error=d / 1000, max_self_compositions=[T])
                    return a.compute_epsilon(d, [T])[2]
            med, times, eps = timed(ms_prv, 1)
            rows.append({"task": "epsilon", "accountant": "prv",
                         "library": f"prv-accountant {_version('prv-accountant')}", "epsilon": eps,
                         "median_s": med, "times_s": times})
        except ImportError:
            pass

    result = {
        "benchmark": "accounting_speed",
        "machine": machine(),
        "versions": {"jaxdp": __import__("jaxdp").__version__,
                     **{k: _version(k) for k in ("dp-accounting", "numpy", "scipy", "opacus", "prv-accountant")}},
        "config": {"sample_rate": q, "noise_multiplier": s, "steps": T, "delta": d,
                   "target_epsilon": args.target_epsilon, "repeats": args.repeats,
                   "timing": "wall clock, time.perf_counter; epsilon rows: median of repeats, fresh accountant "
                             "each time; calibration: one run"},
        "rows": rows,
    }
    print(f"q = {q:.6g}, sigma = {s:g}, steps = {T}, delta = {d:g}; {result['machine']['cpus_usable']} usable "
          f"cores ({result['machine']['processor']})")
    print(f"{'task':<22} {'accountant':<10} {'library':<26} {'epsilon':>10} {'sigma':>9} {'seconds':>8} target")
    for r in rows:
        sig = f"{r['noise_multiplier']:.5f}" if "noise_multiplier" in r else ""
        tgt = (f"< {r['target_s']:g} s {'ok' if r['meets_target'] else 'MISSED'}" if "target_s" in r else "")
        print(f"{r['task']:<22} {r['accountant']:<10} {r['library']:<26} {r['epsilon']:>10.5f} {sig:>9} "
              f"{r['median_s']:>8.3f} {tgt}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {out}")
    return 0 if all(r.get("meets_target", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
