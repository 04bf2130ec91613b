"""``jaxdp epsilon`` and ``jaxdp calibrate``.

Both describe DP-SGD over ``N`` examples with (expected) batch size ``B``: sample rate ``q = B / N`` and, unless
``--steps`` is given, the steps ``jaxdp train`` takes for ``--epochs`` (:func:`jaxdp.sampling.steps_for_epochs`):
``ceil(epochs / q)`` for Poisson sampling (each example seen ``epochs`` times in expectation), ``epochs * (N // B)``
for shuffled batches (the last partial batch of an epoch is dropped).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from jaxdp import _cli
from jaxdp.accounting import core
from jaxdp.accounting.event import ACCOUNTANTS, RELATIONS

# Of core.SAMPLINGS, those a dataset size and a batch size describe (the others need more: --events in the ledger).
SAMPLINGS = ("poisson", "shuffle")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-size", "-N", type=int, required=True, help="number of training examples N")
    p.add_argument("--batch-size", "-B", type=int, required=True,
                   help="(expected) batch size B; the sample rate is q = B / N")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--epochs", type=float, help="epochs E; steps = ceil(E / q) (shuffle: E * (N // B))")
    g.add_argument("--steps", type=int, help="number of steps (instead of --epochs)")
    p.add_argument("--delta", type=float, required=True, help="target delta (must be < 1/N)")
    p.add_argument("--allow-large-delta", action="store_true",
                   help="experts only: accept delta >= 1/N (refused by default: such a delta is met by publishing "
                        "one example in the clear)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="prv",
                   help="rdp (Renyi DP), pld (privacy loss distribution) or prv (Opacus's PRV upper bound; "
                        "default)")
    p.add_argument("--sampling", choices=SAMPLINGS, default="poisson",
                   help="batch selection: poisson (default) or shuffle (fixed-size batches without replacement; "
                        "needs --accountant rdp --neighboring-relation replace_one)")
    p.add_argument("--neighboring-relation", choices=RELATIONS, default="add_remove",
                   help="datasets the guarantee compares: add_remove (default) or replace_one")
    _cli.add_json_flag(p, "the result (instead of a table)")


def _setting(args: argparse.Namespace) -> tuple[float, int]:
    n, b = args.dataset_size, args.batch_size
    if n is None or n <= 0:
        raise ValueError(f"--dataset-size must be a positive integer, got {n}")
    if b is None or b <= 0 or b > n:
        raise ValueError(f"--batch-size must be an integer in [1, N={n}], got {b}")
    from jaxdp import _checks
    _checks.delta_for_dataset(args.delta, n, allow_large_delta=args.allow_large_delta,
                              override="--allow-large-delta", warn=False)  # compute_epsilon warns
    q = b / n
    from jaxdp.sampling import steps_for_epochs
    if args.steps is not None:
        steps = args.steps
    elif args.sampling == "shuffle":
        steps = steps_for_epochs(args.epochs, steps_per_epoch=n // b)
    else:
        steps = steps_for_epochs(args.epochs, q)
    if steps < 0:
        raise ValueError(f"--steps must be >= 0, got {steps}")
    return q, steps


def _setting_rows(args: argparse.Namespace, q: float, steps: int) -> list[tuple[str, object]]:
    return [("accountant", args.accountant), ("sampling", args.sampling),
            ("neighboring relation", args.neighboring_relation), ("dataset size N", args.dataset_size),
            ("batch size B", args.batch_size), ("sample rate q", q), ("steps", steps)]


def _table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    out = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.6g}"
        out.append(f"{k:<{width}}  {v}")
    return "\n".join(out)


def _quiet_absl() -> None:
    # dp-accounting logs one absl WARNING per RDP order it drops (large q); the result already accounts for it.
    logging.getLogger("absl").setLevel(logging.ERROR)


def _epsilon(args: argparse.Namespace) -> int:
    _quiet_absl()
    q, steps = _setting(args)
    t0 = time.perf_counter()
    eps = core.compute_epsilon(args.noise_multiplier, q, steps, args.delta, args.accountant,
                               neighboring_relation=args.neighboring_relation, sampling=args.sampling,
                               dataset_size=args.dataset_size, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    result = {"epsilon": eps, "delta": args.delta, "steps": steps, "sample_rate": q, "epochs": args.epochs,
              "noise_multiplier": args.noise_multiplier, "dataset_size": args.dataset_size,
              "batch_size": args.batch_size, "accountant": args.accountant, "sampling": args.sampling,
              "neighboring_relation": args.neighboring_relation, "seconds": seconds,
              "allow_large_delta": args.allow_large_delta}
    statement = _statement(args) if args.statement else None
    if statement is not None:
        result["statement"] = statement
    _cli.emit(args, result, _table(_setting_rows(args, q, steps) + [
        ("noise multiplier", args.noise_multiplier), ("delta", args.delta), ("epsilon", eps)]))
    if statement is not None and not args.json:
        print()
        print(statement)
    return 0


def _statement(args: argparse.Namespace) -> str:
    """TF Privacy's ``compute_dp_sgd_privacy`` statement (RDP accountant, Poisson sampling, add/remove-one) for
    the same N, B, sigma, epochs and delta (:func:`jaxdp.accounting.compute_dp_sgd_privacy`)."""
    if args.epochs is None:
        raise ValueError("--statement needs --epochs (TF Privacy's statement is stated in epochs), not --steps")
    text = core.compute_dp_sgd_privacy(args.dataset_size, args.batch_size, args.noise_multiplier, args.epochs,
                                       args.delta).statement
    if (args.accountant, args.sampling, args.neighboring_relation) != ("rdp", "poisson", "add_remove"):
        text += (f"\n(The statement uses TF Privacy's conventions -- RDP accountant, Poisson sampling, add/remove-one; "
                 f"the table above uses --accountant {args.accountant}, --sampling {args.sampling}, "
                 f"--neighboring-relation {args.neighboring_relation}.)")
    return text


def _calibrate(args: argparse.Namespace) -> int:
    _quiet_absl()
    q, steps = _setting(args)
    t0 = time.perf_counter()
    sigma = core.calibrate_noise_multiplier(args.target_epsilon, args.delta, q, steps=steps,
                                            accountant=args.accountant,
                                            neighboring_relation=args.neighboring_relation,
                                            sampling=args.sampling, dataset_size=args.dataset_size)
    eps = core.compute_epsilon(sigma, q, steps, args.delta, args.accountant,
                               neighboring_relation=args.neighboring_relation, sampling=args.sampling,
                               dataset_size=args.dataset_size, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    result = {"noise_multiplier": sigma, "epsilon": eps, "target_epsilon": args.target_epsilon,
              "delta": args.delta, "steps": steps, "sample_rate": q, "epochs": args.epochs,
              "dataset_size": args.dataset_size, "batch_size": args.batch_size, "accountant": args.accountant,
              "sampling": args.sampling, "neighboring_relation": args.neighboring_relation, "seconds": seconds}
    _cli.emit(args, result, _table(_setting_rows(args, q, steps) + [
        ("delta", args.delta), ("target epsilon", args.target_epsilon), ("noise multiplier", sigma),
        ("epsilon reached", eps)]))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "epsilon", help="epsilon of DP-SGD for a dataset size, batch size, noise multiplier and epochs",
        description="Epsilon at --delta of DP-SGD: q = B/N, steps = ceil(epochs / q) (or --steps).")
    _add_common(p)
    p.add_argument("--noise-multiplier", "-s", type=float, required=True,
                   help="noise std / clipping norm (sigma)")
    p.add_argument("--statement", action="store_true",
                   help="also print TF Privacy's compute_dp_sgd_privacy statement (RDP, Poisson sampling, "
                        "add/remove-one; what holds for shuffled batches; needs --epochs)")
    p.set_defaults(func=_epsilon)

    p = subparsers.add_parser(
        "calibrate", help="smallest noise multiplier that meets a target epsilon",
        description="Smallest noise multiplier with epsilon <= --target-epsilon at --delta "
                    "(Brent's method via dp_accounting.calibrate_dp_mechanism).")
    _add_common(p)
    p.add_argument("--target-epsilon", "-e", type=float, required=True, help="target epsilon (> 0)")
    p.set_defaults(func=_calibrate)


def main(argv: list[str] | None = None) -> int:   # `python -m jaxdp.accounting.cli ...`
    from jaxdp.cli import main as jaxdp_main
    return jaxdp_main(argv)


if __name__ == "__main__":
    sys.exit(main())
