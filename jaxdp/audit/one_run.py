"""The one-run privacy audit of Steinke, Nasr & Jagielski (2023) with canaries that jaxdp makes and inserts.

Recipe (:func:`one_run_audit`):

1. make ``m`` canaries; flip a fair coin for each: heads, it joins the training set (``S_j = +1``), tails, it
   does not (``S_j = -1``). The coins are secret from the training algorithm; every real example is included.
2. train ONCE with the recipe under audit (DP-SGD with the claimed noise, or the broken variant).
3. score every canary (higher = "looks included"), guess IN for the ``k_pos`` highest scores, OUT for the
   ``k_neg`` lowest, abstain on the rest: ``r = k_pos + k_neg`` guesses, ``v`` of them right.
4. the epsilon lower bound (:func:`jaxdp.audit.bounds.one_run_epsilon_lower_bound`) is the largest epsilon that
   ``v`` right out of ``r`` rejects at significance ``beta``. If it exceeds the CLAIMED epsilon, the
   implementation broke its promise (with probability at most ``beta`` this is a false alarm). No number of
   right guesses can push the bound above the audit's *ceiling* (all guesses right); a claim at or above the
   ceiling is reported as inconclusive, not as a pass.

Canaries:

* ``"gradient"`` (white-box, strongest): canary ``j`` is an example whose gradient is a Dirac ``-c e_k`` on one
  flat parameter coordinate ``k_j``, of norm ``c = canary_scale * C`` (default 10 C: well above the clip norm,
  so that a run without clipping lets 10x the signal through and fails; see :mod:`jaxdp.audit.shadow`); the
  score is how far ``theta_k`` moved:
  ``theta_T[k_j] - theta_0[k_j]``. By default the coordinates are first-layer weights of input features that are
  zero in every real example ("data-free" coordinates): real data never move them, so without noise an IN
  canary is told apart perfectly. This is the adversary DP-SGD's guarantee covers -- any example with any
  gradient -- so an honest run must pass.
* ``"input"`` (black-box): canaries are out-of-distribution inputs (uniform noise images) with random labels;
  the score is minus the final model's loss on the canary. Weaker; useful on models you only query.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxdp.audit import bounds, shadow

__all__ = ["CANARIES", "COORDINATES", "DEFAULT_CANARY_SCALE", "OneRunResult", "make_gradient_canaries",
           "make_input_canaries", "one_run_audit"]


#: Canary kinds (:func:`one_run_audit`'s ``canary``) and gradient-canary coordinate rules (``coordinates``).
CANARIES = ("gradient", "input")
COORDINATES = ("data_free", "random")
#: Default gradient-canary norm, as a multiple of the clip norm C (see :func:`one_run_audit`).
DEFAULT_CANARY_SCALE = 10.0
#: Most input canaries chosen by default (each one is an extra training example of the audited run).
MAX_INPUT_CANARIES = 1000


@dataclasses.dataclass
class OneRunResult:
    """Outcome of a one-run audit.

    ``verdict`` is ``"FAIL"`` when the lower bound exceeds the claimed epsilon (the run leaks more than it
    claims), ``"INCONCLUSIVE"`` when the claim is at or above ``ceiling`` -- the largest epsilon this audit can
    certify at all, so even a run without any noise could not fail it -- and ``"PASS"`` otherwise.
    ``passed`` is True for ``"PASS"`` only.
    """

    claimed_epsilon: float
    epsilon_lower_bound: float
    delta: float
    beta: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    canary_type: str
    accountant_epsilon: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    ceiling: float | None = None
    canary_scale: float | None = None

    @property
    def failed(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon

    @property
    def verdict(self) -> str:
        if self.failed:
            return "FAIL"
        if self.ceiling is not None and not self.claimed_epsilon < self.ceiling:
            return "INCONCLUSIVE"
        return "PASS"

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict:
        return dict(attack="one_run", claimed_epsilon=self.claimed_epsilon,
                    epsilon_lower_bound=self.epsilon_lower_bound, ceiling=self.ceiling, verdict=self.verdict,
                    passed=self.passed, delta=self.delta,
                    beta=self.beta, num_canaries=self.num_canaries, num_guesses=self.num_guesses,
                    num_correct=self.num_correct, canary_type=self.canary_type, canary_scale=self.canary_scale,
                    accountant_epsilon=self.accountant_epsilon, **self.extra)

    def summary(self) -> str:
        verdict = {"PASS": "PASS",
                   "FAIL": "FAIL: the lower bound exceeds the claimed epsilon",
                   "INCONCLUSIVE": "INCONCLUSIVE: the claim is at or above the largest epsilon this audit can "
                                   "detect (more canaries raise the ceiling)"}[self.verdict]
        ceiling = "" if self.ceiling is None else f", audit ceiling {self.ceiling:.4f}"
        return (f"one-run audit ({self.canary_type} canaries): {self.num_correct}/{self.num_guesses} guesses right "
                f"on {self.num_canaries} canaries -> epsilon lower bound {self.epsilon_lower_bound:.4f} "
                f"(beta {self.beta}, delta {self.delta:g}{ceiling}) vs claimed epsilon "
                f"{self.claimed_epsilon:.4f}: {verdict}")


def _flat_index_tree(params):
    flat, unravel = ravel_pytree(params)
    return unravel(jnp.arange(flat.size, dtype=jnp.float32)), flat.size


def make_gradient_canaries(params0, x: np.ndarray, num_canaries: int | None, rng: np.random.Generator,
                           coordinates: str = "data_free") -> np.ndarray:
    """Distinct flat parameter coordinates for Dirac gradient canaries.

    ``"data_free"``: first-layer weights ``w[f, :]`` of features ``f`` that are 0 in every row of ``x`` (their
    gradient from real data is exactly 0); ``num_canaries=None`` takes all of them. ``"random"``: any
    coordinates (real data add their own movement: a weaker audit).
    """
    pool = _coordinate_pool(params0, x, coordinates)
    m = pool.size if num_canaries is None else int(num_canaries)
    if m > pool.size:
        raise ValueError(f"asked for {m} gradient canaries but only {pool.size} {coordinates} coordinates exist; "
                         f"ask for at most {pool.size} (`jaxdp audit --num-canaries {pool.size}`, num_canaries=...), "
                         "widen the first layer, or use random coordinates (`--coordinates random`, "
                         "coordinates='random')")
    return rng.choice(pool, size=m, replace=False)


def _coordinate_pool(params0, x: np.ndarray, coordinates: str) -> np.ndarray:
    index_tree, size = _flat_index_tree(params0)
    if coordinates == "data_free":
        zero_features = np.flatnonzero(np.max(np.abs(x), axis=0) == 0)
        pool = np.asarray(index_tree[0]["w"])[zero_features].astype(np.int64).ravel()
        if pool.size == 0:
            raise ValueError("no data-free coordinates: no input feature is 0 in every example; use random "
                             "coordinates (`jaxdp audit --coordinates random`, audit.coordinates: random, "
                             "coordinates='random' in Python) or input canaries (`--canary input`, canary='input')")
    elif coordinates == "random":
        pool = np.arange(size)
    else:
        raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
    return pool


def make_input_canaries(num_canaries: int, input_dim: int, num_classes: int, rng: np.random.Generator):
    """Out-of-distribution canaries: uniform [0, 1] inputs with uniformly random labels."""
    return (rng.random((num_canaries, input_dim)).astype(np.float32),
            rng.integers(0, num_classes, num_canaries).astype(np.int32))


def one_run_audit(config: shadow.ShadowConfig, x: np.ndarray, y: np.ndarray, *, claimed_epsilon: float,
                  delta: float = bounds.DEFAULT_DELTA, key: jax.Array, seed: int = 0, canary: str = "gradient",
                  num_canaries: int | None = None, coordinates: str = "data_free", k_pos: int | None = None,
                  k_neg: int | None = None, beta: float = 0.05, accountant_epsilon: float | None = None,
                  canary_scale: float = DEFAULT_CANARY_SCALE) -> OneRunResult:
    """Run the one-run audit on the recipe ``config`` with real data ``(x, y)`` (see the module docstring).

    Args:
      config: training recipe under audit (its ``dp``, ``noise_multiplier``, ``l2_clip_norm`` and ``clip``
        are what is run).
      claimed_epsilon: the epsilon the run claims (e.g. from the accountant or a run's metrics.json).
      delta: the claimed delta (enters the bound through Steinke et al.'s delta term).
      key: PRNG key of the training run; ``seed`` draws the canaries and their coins.
      canary: ``"gradient"`` or ``"input"``.
      num_canaries: ``m``. Default: chosen from the claim before training
        (:func:`jaxdp.audit.bounds.one_run_num_canaries`: the fewest canaries, at least 200, whose ceiling is
        twice the claim, else the highest ceiling available), capped by the data-free coordinates (gradient)
        or :data:`MAX_INPUT_CANARIES` (input).
      k_pos, k_neg: guesses IN / OUT, fixed in advance (default ``m // 4`` each).
      beta: significance of the bound.
      canary_scale: norm of a gradient canary's gradient as a multiple of the clip norm ``C`` (default 10).
        An honest run clips every canary to exactly ``C``, so the scale changes nothing there; a run whose
        clipping is missing lets the whole ``canary_scale * C`` through, which the audit then sees. A canary of
        norm <= ``C`` is never clipped and cannot tell a clipping run from one without clipping.

    The result carries the audit's ``ceiling`` (the largest epsilon it can certify); a claim at or above it is
    ``"INCONCLUSIVE"``, never ``"PASS"``.
    """
    if not canary_scale > 0:
        raise ValueError(f"canary_scale must be > 0 (a multiple of the clip norm), got {canary_scale!r}")
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    y = np.asarray(y, np.int32)
    n, d = x.shape
    # Gradient canaries push with norm canary_scale * C before clipping (C = 1 for a non-DP recipe).
    scale_abs = float(canary_scale) * (float(config.l2_clip_norm) if config.dp else 1.0)
    config = dataclasses.replace(config, canary_scale=scale_abs)
    claim = float(claimed_epsilon)
    if canary == "gradient":
        params0 = shadow.init_params(jax.random.key(0), d, config)
        if num_canaries is None:
            available = _coordinate_pool(params0, x, coordinates).size
            num_canaries = bounds.one_run_num_canaries(claim, available, delta, beta,
                                                       min_canaries=min(200, available))
        coords = make_gradient_canaries(params0, x, num_canaries, rng, coordinates)
        m = coords.size
        cx, cy = np.zeros((m, d), np.float32), np.zeros(m, np.int32)
        canary_coord = np.r_[np.full(n, -1), coords].astype(np.int32)
    elif canary == "input":
        m = (bounds.one_run_num_canaries(claim, MAX_INPUT_CANARIES, delta, beta) if num_canaries is None
             else int(num_canaries))
        cx, cy = make_input_canaries(m, d, config.num_classes, rng)
        canary_coord = None
    else:
        raise ValueError(f"canary must be one of {CANARIES}, got {canary!r}")
    k_pos = m // 4 if k_pos is None else int(k_pos)
    k_neg = m // 4 if k_neg is None else int(k_neg)
    included = rng.random(m) < 0.5
    mask = np.r_[np.ones(n, bool), included][None]
    pool_x, pool_y = np.concatenate([x, cx]), np.concatenate([y, cy])
    p0, p = shadow.train_models(config, pool_x, pool_y, mask, key, canary_coord)
    p0 = jax.tree_util.tree_map(lambda a: a[0], p0)
    p = jax.tree_util.tree_map(lambda a: a[0], p)
    if canary == "gradient":
        scores = np.asarray(ravel_pytree(p)[0] - ravel_pytree(p0)[0])[coords]
    else:
        scores = -np.asarray(shadow.per_example_losses(p, jnp.asarray(cx), jnp.asarray(cy)))
    r, v = bounds.one_run_guesses(scores, included, k_pos, k_neg)
    lb = bounds.one_run_epsilon_lower_bound(m, r, v, delta, beta)
    ceiling = bounds.one_run_ceiling(m, r, delta, beta)
    return OneRunResult(claimed_epsilon=claim, epsilon_lower_bound=float(lb), delta=float(delta),
                        beta=float(beta), num_canaries=int(m), num_guesses=r, num_correct=v, canary_type=canary,
                        accountant_epsilon=None if accountant_epsilon is None or not math.isfinite(
                            accountant_epsilon) else float(accountant_epsilon),
                        extra=dict(num_included=int(included.sum()), noise_multiplier=config.noise_multiplier,
                                   dp=config.dp, clipping=config.clip, steps=config.steps,
                                   sample_rate=config.sample_rate),
                        ceiling=float(ceiling), canary_scale=float(canary_scale) if canary == "gradient" else None)
