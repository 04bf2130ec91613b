"""One-run audit verdicts on honest and deliberately broken DP-SGD runs, over several seeds (docs/audit.md).

Recipe (as in tests/test_audit_slow.py): 300 digits training examples, MLP with 64 tanh units, Poisson rate
q = 0.2, 100 DP-SGD steps, SGD with momentum 0.9, clip norm C = 1, delta 1e-5, gradient canaries on data-free
coordinates (their number chosen from the claim), beta 0.05. Rows: honest runs claiming epsilon 1, 3 and 8
(noise calibrated by the PRV accountant), the noise switched off while claiming epsilon 1, the clipping switched off
(noise of epsilon 1 kept) while claiming epsilon 1, the latter also with canaries of norm C (the old default).

    PYTHONPATH=. python benchmarks/audit_verdicts.py --seeds 0 1 2 --out benchmarks/results/audit_verdicts.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax

from jaxdp import audit
from jaxdp.audit import _accounting
from jaxdp.data import load_digits

Q, STEPS, DELTA = 0.2, 100, 1e-5


def rows():
    s1 = _accounting.calibrate_noise_multiplier(1.0, DELTA, Q, STEPS)
    s3 = _accounting.calibrate_noise_multiplier(3.0, DELTA, Q, STEPS)
    s8 = _accounting.calibrate_noise_multiplier(8.0, DELTA, Q, STEPS)
    return [("honest, epsilon 1", 1.0, s1, True, 10.0), ("honest, epsilon 3", 3.0, s3, True, 10.0),
            ("honest, epsilon 8", 8.0, s8, True, 10.0),
            ("noise off, claims epsilon 1", 1.0, 0.0, True, 10.0),
            ("clipping off, claims epsilon 1", 1.0, s1, False, 10.0),
            ("clipping off, claims epsilon 1, canaries of norm C", 1.0, s1, False, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/audit_verdicts.json")
    args = ap.parse_args()
    d = load_digits()
    x, y = d.x_train.reshape(len(d.x_train), -1)[:300], d.y_train[:300]
    out = []
    for name, claim, sigma, clip, scale in rows():
        cfg = audit.ShadowConfig(hidden=(64,), steps=STEPS, learning_rate=0.1, momentum=0.9, sample_rate=Q,
                                 expected_dataset_size=300, dp=True, l2_clip_norm=1.0, noise_multiplier=sigma,
                                 clip=clip)
        for seed in args.seeds:
            t = time.time()
            r = audit.one_run_audit(cfg, x, y, claimed_epsilon=claim, delta=DELTA, key=jax.random.key(seed),
                                    seed=seed, canary_scale=scale)
            rec = dict(row=name, seed=seed, sigma=sigma, clipping=clip, canary_scale=scale, **{
                k: v for k, v in r.to_dict().items() if k in ("claimed_epsilon", "epsilon_lower_bound", "ceiling",
                                                              "verdict", "num_canaries", "num_guesses",
                                                              "num_correct")}, seconds=round(time.time() - t, 1))
            print(json.dumps(rec), flush=True)
            out.append(rec)
    print("\n| run | sigma | canaries (norm) | right / guesses, per seed | lower bound, per seed | ceiling "
          "| verdicts |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, _, sigma, _, scale in rows():
        rs = [r for r in out if r["row"] == name]
        print(f"| {name} | {sigma:.3f} | {rs[0]['num_canaries']} ({scale:g} C) | "
              + ", ".join(f"{r['num_correct']}/{r['num_guesses']}" for r in rs) + " | "
              + ", ".join(f"{r['epsilon_lower_bound']:.2f}" for r in rs) + f" | {rs[0]['ceiling']:.2f} | "
              + ", ".join(r["verdict"] for r in rs) + " |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(recipe=dict(pool=300, hidden=64, sample_rate=Q, steps=STEPS, delta=DELTA, beta=0.05,
                                       jax=jax.__version__, backend=jax.default_backend()), runs=out), f, indent=1)


if __name__ == "__main__":
    main()
