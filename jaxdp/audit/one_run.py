"""The one-run privacy audit of Steinke, Nasr & Jagielski (2023) with canaries that jaxdp makes and inserts.

Recipe (:func:`one_run_audit`):

1. make ``m`` canaries; flip a fair coin for each: heads, it joins the training set (``S_j = +1``), tails, it
   does not (``S_j = -1``). The coins are secret from the training algorithm; every real example is included.
2. train ONCE with the recipe under audit (DP-SGD with the claimed noise, or the broken variant).
3. score every canary (higher = "looks included"), guess IN for the ``k_pos`` highest scores, OUT for the
   ``k_neg`` lowest, abstain on the rest: ``r = k_pos + k_neg`` guesses, ``v`` of them right.
4. the epsilon lower bound (:func:`jaxdp.audit.bounds.one_run_epsilon_lower_bound`) is the largest epsilon that
   ``v`` right out of ``r`` rejects at significance ``beta``. If it exceeds the CLAIMED epsilon, the
   implementation broke its promise (with probability at most ``beta`` this is a false alarm).

Canaries:

* ``"gradient"`` (white-box, strongest): canary ``j`` is an example whose gradient is a Dirac ``-c e_k`` on one
  flat parameter coordinate ``k_j`` (see :mod:`jaxdp.audit.shadow`); the score is how far ``theta_k`` moved:
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

__all__ = ["OneRunResult", "make_gradient_canaries", "make_input_canaries", "one_run_audit"]


@dataclasses.dataclass
class OneRunResult:
    """Outcome of a one-run audit. ``passed`` is False when the lower bound exceeds the claimed epsilon."""

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

    @property
    def passed(self) -> bool:
        return not self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict:
        return dict(attack="one_run", claimed_epsilon=self.claimed_epsilon,
                    epsilon_lower_bound=self.epsilon_lower_bound, passed=self.passed, delta=self.delta,
                    beta=self.beta, num_canaries=self.num_canaries, num_guesses=self.num_guesses,
                    num_correct=self.num_correct, canary_type=self.canary_type,
                    accountant_epsilon=self.accountant_epsilon, **self.extra)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL: the lower bound exceeds the claimed epsilon"
        return (f"one-run audit ({self.canary_type} canaries): {self.num_correct}/{self.num_guesses} guesses right "
                f"on {self.num_canaries} canaries -> epsilon lower bound {self.epsilon_lower_bound:.4f} "
                f"(beta {self.beta}, delta {self.delta:g}) vs claimed epsilon {self.claimed_epsilon:.4f}: {verdict}")


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
        raise ValueError(f"coordinates must be 'data_free' or 'random', got {coordinates!r}")
    m = pool.size if num_canaries is None else int(num_canaries)
    if m > pool.size:
        raise ValueError(f"asked for {m} gradient canaries but only {pool.size} {coordinates} coordinates exist; "
                         f"ask for at most {pool.size} (`jaxdp audit --num-canaries {pool.size}`, num_canaries=...), "
                         "widen the first layer, or use random coordinates (`--coordinates random`, "
                         "coordinates='random')")
    return rng.choice(pool, size=m, replace=False)


def make_input_canaries(num_canaries: int, input_dim: int, num_classes: int, rng: np.random.Generator):
    """Out-of-distribution canaries: uniform [0, 1] inputs with uniformly random labels."""
    return (rng.random((num_canaries, input_dim)).astype(np.float32),
            rng.integers(0, num_classes, num_canaries).astype(np.int32))


def one_run_audit(config: shadow.ShadowConfig, x: np.ndarray, y: np.ndarray, *, claimed_epsilon: float,
                  delta: float, key: jax.Array, seed: int = 0, canary: str = "gradient",
                  num_canaries: int | None = None, coordinates: str = "data_free", k_pos: int | None = None,
                  k_neg: int | None = None, beta: float = 0.05, accountant_epsilon: float | None = None
                  ) -> OneRunResult:
    """Run the one-run audit on the recipe ``config`` with real data ``(x, y)`` (see the module docstring).

    Args:
      config: training recipe under audit (its ``dp``, ``noise_multiplier``, ``l2_clip_norm`` are what is run).
      claimed_epsilon: the epsilon the run claims (e.g. from the accountant or a run's metrics.json).
      delta: the claimed delta (enters the bound through Steinke et al.'s delta term).
      key: PRNG key of the training run; ``seed`` draws the canaries and their coins.
      canary: ``"gradient"`` or ``"input"``; ``num_canaries``: ``m`` (gradient default: all data-free
        coordinates; input default: 200).
      k_pos, k_neg: guesses IN / OUT, fixed in advance (default ``m // 4`` each).
      beta: significance of the bound.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    y = np.asarray(y, np.int32)
    n, d = x.shape
    if canary == "gradient":
        params0 = shadow.init_params(jax.random.key(0), d, config)
        coords = make_gradient_canaries(params0, x, num_canaries, rng, coordinates)
        m = coords.size
        cx, cy = np.zeros((m, d), np.float32), np.zeros(m, np.int32)
        canary_coord = np.r_[np.full(n, -1), coords].astype(np.int32)
    elif canary == "input":
        m = 200 if num_canaries is None else int(num_canaries)
        cx, cy = make_input_canaries(m, d, config.num_classes, rng)
        canary_coord = None
    else:
        raise ValueError(f"canary must be 'gradient' or 'input', got {canary!r}")
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
    return OneRunResult(claimed_epsilon=float(claimed_epsilon), epsilon_lower_bound=float(lb), delta=float(delta),
                        beta=float(beta), num_canaries=int(m), num_guesses=r, num_correct=v, canary_type=canary,
                        accountant_epsilon=None if accountant_epsilon is None or not math.isfinite(
                            accountant_epsilon) else float(accountant_epsilon),
                        extra=dict(num_included=int(included.sum()), noise_multiplier=config.noise_multiplier,
                                   dp=config.dp, steps=config.steps, sample_rate=config.sample_rate))
