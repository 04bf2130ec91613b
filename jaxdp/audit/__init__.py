"""Privacy audits: does the code keep the epsilon it promises?

* Membership inference: :func:`loss_threshold_attack` (Yeom et al. 2018) and LiRA (Carlini et al. 2022,
  :func:`lira_attack`) with shadow models trained in parallel by ``jax.vmap`` (:func:`train_models`,
  :func:`shadow_membership_experiment`). Metrics: AUC with a confidence interval (bootstrap over examples for
  pooled shadow-model scores, DeLong for independent scores), advantage, TPR at 0.1% / 1% FPR,
  ROC data and a log-log ROC plot (:func:`plot_roc`).
* Empirical epsilon lower bounds: Clopper-Pearson from an attack's TPR/FPR
  (:func:`epsilon_lower_bound_from_counts`, :func:`epsilon_lower_bound_from_scores` with a correction for the
  threshold search) and the one-run audit of Steinke, Nasr & Jagielski 2023 (:func:`one_run_audit`) with
  canaries that jaxdp generates and inserts. A lower bound above the claimed epsilon is a failed audit.

The core is a functional API independent of ``jaxdp train``; ``jaxdp audit`` (:mod:`jaxdp.audit.cli`) drives it
from a config file.
"""
from __future__ import annotations

from jaxdp.audit.bounds import (DEFAULT_DELTA, clopper_pearson_interval, epsilon_lower_bound_from_counts,
                                epsilon_lower_bound_from_scores, one_run_ceiling, one_run_epsilon_lower_bound,
                                one_run_guesses, one_run_num_canaries, one_run_p_value)
from jaxdp.audit.lira import lira_attack, lira_from_train_fn, lira_scores, shadow_membership_experiment
from jaxdp.audit.metrics import (AttackResult, auc, auc_bootstrap_interval, auc_confidence_interval, evaluate_attack,
                                 loss_threshold_attack, roc_curve, tpr_at_fpr)
from jaxdp.audit.one_run import OneRunResult, make_gradient_canaries, make_input_canaries, one_run_audit
from jaxdp.audit.plot import plot_roc
from jaxdp.audit.shadow import (ShadowConfig, balanced_masks, logit_confidence, make_train_fn,
                                per_example_losses, train_models)

__all__ = [
    "DEFAULT_DELTA", "AttackResult", "OneRunResult", "ShadowConfig",
    "auc", "auc_bootstrap_interval", "auc_confidence_interval", "balanced_masks", "clopper_pearson_interval",
    "epsilon_lower_bound_from_counts", "epsilon_lower_bound_from_scores", "evaluate_attack",
    "lira_attack", "lira_from_train_fn", "lira_scores", "logit_confidence", "loss_threshold_attack",
    "make_gradient_canaries",
    "make_input_canaries", "make_train_fn", "one_run_audit", "one_run_ceiling", "one_run_epsilon_lower_bound",
    "one_run_guesses", "one_run_num_canaries", "one_run_p_value", "per_example_losses", "plot_roc", "roc_curve",
    "shadow_membership_experiment", "tpr_at_fpr", "train_models",
]
