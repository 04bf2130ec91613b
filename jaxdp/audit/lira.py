"""The likelihood-ratio attack (LiRA) of Carlini et al. (2022), "Membership inference attacks from first
principles", with shadow models trained in parallel by ``jax.vmap``.

For a target model and a candidate example ``(x, y)`` the statistic is the logit-scaled confidence
``phi = log(p_y / (1 - p_y))``, which is close to Gaussian over the randomness of training. Shadow models
trained WITH the example (IN) and WITHOUT it (OUT) give per-example Gaussian fits ``N(mu_in, s_in^2)`` and
``N(mu_out, s_out^2)``:

* online:  score = log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)   (a likelihood ratio);
* offline: score = Phi((phi - mu_out) / s_out)  -- a one-sided test against OUT models only, so the shadow
  models never need the target's candidate examples (reported as its log, a monotone transform);
* fixed variance: ``s_in`` and ``s_out`` are pooled over all examples (better with few shadow models).

Evaluation is leave-one-out: each of the ``M`` models is in turn the target, the other ``M - 1`` its shadows;
the scores of all targets are pooled into one ROC (members = examples in that target's training set).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from scipy import stats

from jaxdp.audit import metrics, shadow

__all__ = ["lira_scores", "lira_attack", "shadow_membership_experiment", "lira_from_train_fn"]

_VAR_FLOOR = 1e-8


def _normal_logpdf(x, mu, var):
    return -0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)


def lira_scores(target_stat: np.ndarray, mu_in: np.ndarray, var_in: np.ndarray, mu_out: np.ndarray,
                var_out: np.ndarray, mode: str = "online") -> np.ndarray:
    """LiRA scores (higher = member) from the target statistic and the IN/OUT Gaussian fits (same shapes)."""
    if mode == "online":
        return _normal_logpdf(target_stat, mu_in, var_in) - _normal_logpdf(target_stat, mu_out, var_out)
    if mode == "offline":
        return stats.norm.logcdf((target_stat - mu_out) / np.sqrt(var_out))
    raise ValueError(f"mode must be 'online' or 'offline', got {mode!r}")


def _loo_fits(stat: np.ndarray, inside: np.ndarray, fixed_variance: bool):
    """Leave-one-out Gaussian fits: for every target t (row) and example j (column), mean/var of ``stat[s, j]``
    over shadows s != t with ``inside[s, j]`` (IN) and with ``~inside[s, j]`` (OUT)."""
    out = {}
    for name, sel in (("in", inside), ("out", ~inside)):
        w = sel.astype(np.float64)
        n = w.sum(0, keepdims=True) - w                       # [M, N]: count excluding the target itself
        s1 = (w * stat).sum(0, keepdims=True) - w * stat
        s2 = (w * stat ** 2).sum(0, keepdims=True) - w * stat ** 2
        if np.any(n < 2):
            raise ValueError(f"LiRA needs at least 2 {name.upper()} shadow models for every example and target; "
                             "use more models (>= 6) and balanced masks (shadow.balanced_masks)")
        mu = s1 / n
        var = np.maximum(s2 / n - mu ** 2, 0.0) * n / (n - 1)   # unbiased per-example variance
        if fixed_variance:
            var = np.broadcast_to(var.mean(axis=1, keepdims=True), var.shape)
        out[name] = (mu, np.maximum(var, _VAR_FLOOR))
    return out["in"], out["out"]


def lira_attack(stat: np.ndarray, inside: np.ndarray, mode: str = "online", fixed_variance: bool = False,
                fprs: Sequence[float] = metrics.DEFAULT_FPRS) -> metrics.AttackResult:
    """Leave-one-out LiRA over ``M`` models: ``stat[M, N]`` logit-scaled confidences, ``inside[M, N]`` membership.

    Works on any models (yours too): compute ``stat`` with :func:`jaxdp.audit.shadow.logit_confidence` or your
    own ``log(p_y / (1 - p_y))``, and pass which examples each model was trained on.
    """
    stat = np.asarray(stat, np.float64)
    inside = np.asarray(inside, bool)
    if stat.shape != inside.shape or stat.ndim != 2:
        raise ValueError(f"stat and inside must both be [M, N], got {stat.shape} and {inside.shape}")
    (mu_in, var_in), (mu_out, var_out) = _loo_fits(stat, inside, fixed_variance)
    scores = lira_scores(stat, mu_in, var_in, mu_out, var_out, mode)
    name = f"lira_{mode}" + ("_fixed_variance" if fixed_variance else "")
    cols = np.broadcast_to(np.arange(stat.shape[1]), stat.shape)    # example id of every score
    return metrics.evaluate_attack(scores[inside], scores[~inside], attack=name, fprs=fprs,
                                   member_groups=cols[inside], nonmember_groups=cols[~inside],
                                   num_models=int(stat.shape[0]))


def shadow_membership_experiment(config: shadow.ShadowConfig, x: np.ndarray, y: np.ndarray, num_models: int,
                                 key: jax.Array, seed: int = 0, attacks: Sequence[str] = (
                                     "loss_threshold", "lira_online", "lira_offline",
                                     "lira_online_fixed_variance", "lira_offline_fixed_variance"),
                                 ) -> dict:
    """Train ``num_models`` models of ``config`` on random halves of the pool ``(x, y)`` (one vmapped program),
    then run the attacks leave-one-out. Returns ``{attack name: AttackResult}`` plus ``"_stat"``,
    ``"_losses"`` and ``"_masks"`` arrays for further analysis.

    Every example is IN for exactly ``num_models // 2`` models (:func:`shadow.balanced_masks`).
    """
    if num_models < 6 and any(a.startswith("lira") for a in attacks):
        raise ValueError("need num_models >= 6 (each example needs >= 2 IN and >= 2 OUT shadows per target)")
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    masks = shadow.balanced_masks(num_models, x.shape[0], seed)
    _, params = shadow.train_models(config, x, y, masks, key)
    stat = np.asarray(shadow.logit_confidence(params, x, np.asarray(y, np.int32)), np.float64)
    losses = np.asarray(shadow.per_example_losses(params, x, np.asarray(y, np.int32)), np.float64)
    out: dict = {}
    for name in attacks:
        if name == "loss_threshold":
            cols = np.broadcast_to(np.arange(losses.shape[1]), losses.shape)   # example id of every score
            out[name] = metrics.loss_threshold_attack(losses[masks], losses[~masks], member_groups=cols[masks],
                                                      nonmember_groups=cols[~masks])
        elif name.startswith("lira_"):
            mode = name.split("_")[1]
            out[name] = lira_attack(stat, masks, mode=mode, fixed_variance=name.endswith("fixed_variance"))
        else:
            raise ValueError(f"unknown attack {name!r}")
    out["_stat"], out["_losses"], out["_masks"], out["_params"] = stat, losses, masks, params
    return out


def lira_from_train_fn(train_fn, stat_fn, x, y, num_models: int, key: jax.Array, seed: int = 0,
                       vectorize: bool = True, fixed_variance: bool = False) -> dict:
    """LiRA for YOUR model: ``train_fn(include_mask [N] bool, key) -> params`` trains on the included rows of
    your pool; ``stat_fn(params, x, y) -> [N]`` returns the logit-scaled confidence ``log(p_y / (1 - p_y))``
    (e.g. ``z_y - logsumexp_{j != y} z_j``). With ``vectorize=True`` both must be pure JAX (they are
    ``jax.vmap``-ed over models); otherwise they are called once per model.

    Returns ``{"lira_online": AttackResult, "lira_offline": AttackResult, "_stat": [M, N], "_masks": [M, N]}``.
    """
    n = len(y)
    masks = shadow.balanced_masks(num_models, n, seed)
    keys = jax.random.split(key, num_models)
    if vectorize:
        params = jax.jit(jax.vmap(train_fn))(masks, keys)
        stat = jax.vmap(stat_fn, in_axes=(0, None, None))(params, x, y)
    else:
        stat = np.stack([np.asarray(stat_fn(train_fn(masks[i], keys[i]), x, y)) for i in range(num_models)])
    stat = np.asarray(stat, np.float64)
    return {"lira_online": lira_attack(stat, masks, "online", fixed_variance),
            "lira_offline": lira_attack(stat, masks, "offline", fixed_variance), "_stat": stat, "_masks": masks}
