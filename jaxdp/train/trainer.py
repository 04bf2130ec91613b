"""The config-driven trainer behind ``jaxdp train``: a private (or non-private baseline) run end to end.

A run directory holds ``config.yaml`` (the full config, defaults filled in), ``metrics.json`` (per epoch: loss,
accuracy, epsilon, clip fractions; plus the mechanism: noise multiplier, steps, sampling, accountant) and a
checkpoint from which an interrupted run resumes bit-identically.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdp._checks import JaxdpDeprecationWarning
from jaxdp._io import atomic_write
from jaxdp import data as data_lib
from jaxdp import distributed
from jaxdp import models
from jaxdp.engine import PrivacyBudgetExhausted, PrivacyEngine
from jaxdp.sampling import steps_for_epochs
from jaxdp.train import checkpoint, lifecycle
from jaxdp.train.config import config_hashes, load_config, model_label, validate_config
from jaxdp.train.summary import RunSummary

if TYPE_CHECKING:
    from jaxdp.telemetry import DPMetrics   # imported by train(): prometheus-client is optional

CLIP_HIGH, CLIP_LOW = 0.9, 0.01  # warn when more than 90% / fewer than 1% of examples are clipped


def _optimizer(cfg: dict, total_steps: int = 1) -> optax.GradientTransformation:
    """Deprecated alias: ``jaxdp.train.components.build_optimizer(cfg["optimizer"], total_steps)``."""
    warnings.warn("jaxdp.train.trainer._optimizer is deprecated: use "
                  "jaxdp.train.components.build_optimizer(cfg['optimizer'], total_steps)",
                  JaxdpDeprecationWarning, stacklevel=2)
    from jaxdp.train.components import build_optimizer
    return build_optimizer(cfg["optimizer"], total_steps)


def _heavy_ball(cfg: dict) -> float:
    """The optimiser's heavy-ball momentum (``sgd``/``momentum`` without Nesterov), for the BLT strategy; else 0."""
    o = cfg["optimizer"]
    opts = o.get("options") or {}
    if opts.get("nesterov"):
        return 0.0
    if o["name"] == "momentum":
        return float(opts.get("momentum", o.get("momentum", 0.9)) or 0.0)
    if o["name"] == "sgd":
        return float(opts.get("momentum") or 0.0)
    return 0.0


def _seed(cfg: dict, out_dir: str, resume: bool) -> tuple[int, str]:
    """``(seed, source)``: the config's ``training.seed`` ("config"), else the seed an interrupted run in
    ``out_dir`` drew ("os", read back from its checkpoint so that it resumes identically), else a fresh one from
    the OS entropy source ("os"). A drawn seed is kept only in the checkpoint, never in metrics or config."""
    if cfg["training"]["seed"] is not None:
        return int(cfg["training"]["seed"]), "config"
    ckdir = os.path.join(out_dir, "checkpoint")
    if resume and checkpoint.exists(ckdir):
        drawn = None
        try:
            found = checkpoint.list_checkpoints(ckdir)
            if found:
                drawn = checkpoint.read(found[0][1])[1].get("drawn_seed")
            else:   # a checkpoint of an earlier version
                with open(os.path.join(ckdir, checkpoint.META)) as f:
                    drawn = json.load(f).get("drawn_seed")
        except (OSError, ValueError, checkpoint.CheckpointError):
            drawn = None
        if drawn is not None:
            return int(drawn), "os"
    import secrets
    return secrets.randbits(63), "os"


def _remove_new_run_dir(out_dir: str) -> None:
    """Remove the directory a refused run created, if it holds nothing but the run.json written for it."""
    try:
        if set(os.listdir(out_dir)) <= {"run.json"}:
            for name in os.listdir(out_dir):
                os.remove(os.path.join(out_dir, name))
            os.rmdir(out_dir)
    except OSError:
        pass


class _Progress:
    """A one-line live progress bar on stderr: epoch, step, epsilon spent, accuracy."""

    def __init__(self, enabled: bool, total_steps: int) -> None:
        self.enabled = enabled and total_steps > 0 and sys.stderr.isatty()  # no \r-spam in log files
        self.total = total_steps
        self.t0 = time.time()

    def update(self, step: int, epoch: int, epochs: int, eps: float | None, target: float | None,
               acc: float | None) -> None:
        if not self.enabled:
            return
        frac = min(1.0, step / self.total)
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        eps_s = "" if eps is None else f" eps {eps:.3f}" + (f"/{target:g}" if target else "")
        acc_s = "" if acc is None else f" acc {acc:.3f}"
        sys.stderr.write(f"\r  epoch {epoch}/{epochs} [{bar}] step {step}/{self.total}{eps_s}{acc_s} "
                         f"{time.time() - self.t0:5.1f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class DPTrainer:
    """Train the model a config describes, privately (``training.dp.enabled``) or as a baseline.

    Args:
      config: a validated config dict, a raw dict, or a path to a YAML file (see :mod:`jaxdp.train.config`).
      out_dir: overrides ``output.dir``.
      resume: continue from the checkpoint in the output directory when there is one.
      progress: overrides ``output.progress``.
      log: print progress lines to stdout: at most about a dozen epoch lines per run (see
        :func:`epochs_to_log`; every epoch's row is in ``metrics.json``).
    """

    def __init__(self, config: dict | str, *, out_dir: str | None = None, resume: bool = True,
                 progress: bool | None = None, log: bool = True) -> None:
        cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else validate_config(config)
        if out_dir is not None:
            cfg["output"]["dir"] = str(out_dir)
        if progress is not None:
            cfg["output"]["progress"] = bool(progress)
        self.cfg = cfg
        self.out_dir = cfg["output"]["dir"]
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"output directory {self.out_dir} is a file; give --out (or output.dir) a directory")
        self.main = distributed.is_main_process()  # several processes: only process 0 logs and writes
        self.log = log and self.main
        self.resume = resume
        t, dp = cfg["training"], cfg["training"]["dp"]
        self.dp = bool(dp["enabled"])
        self.delta = float(dp["delta"]) if self.dp else None
        self.dataset = data_lib.load_dataset(cfg["data"]["name"], **cfg["data"]["options"])
        self.n = len(self.dataset.y_train)
        if t["batch_size"] > self.n:
            raise ValueError(f"config key 'training.batch_size' ({t['batch_size']:g}) is larger than the training "
                             f"set ({self.n} examples in {cfg['data']['name']}); choose a batch_size below {self.n}")
        self.seed, self.seed_source = _seed(cfg, self.out_dir, resume)
        # several processes: all use process 0's seed (a seed drawn from the OS differs per process)
        self.seed, self.seed_source = distributed.broadcast_from_main([self.seed, self.seed_source])
        self.epochs = t["epochs"]
        self.model_name = model_label(cfg)
        if cfg["model"]["module"] is not None:
            from jaxdp.train.components import build_user_model
            base = os.path.dirname(os.path.abspath(config)) if isinstance(config, (str, os.PathLike)) else None
            self.model = build_user_model(cfg["model"]["module"], cfg["model"]["kwargs"], self.dataset.input_shape,
                                          self.dataset.num_classes, self.seed, base_dir=base)
        else:
            self.model = models.create(cfg["model"]["name"], self.dataset.input_shape, self.dataset.num_classes,
                                       seed=self.seed, **cfg["model"]["options"])
        models.check_model_input(self.model, self.dataset.input_shape, self.dataset.num_classes,
                                 name=f"model {self.model_name!r}")
        from jaxdp.validation import check_model_fits_data   # shapes and classes, before anything is traced
        check_model_fits_data(self.model, self.dataset.x_train[:1], self.dataset.y_train,
                              source=f"{cfg['data']['name']} (x_train)", model_name=repr(self.model_name))
        self.graphdef, self.params0, self.rest = models.split_params(self.model)
        self.metrics: list[dict] = []
        self.status = "not started"
        # the config hash (jaxdp.train.config.config_hash) and the legacy one of the same config: a checkpoint,
        # run.json or reservation recorded with either is this config, and the run keeps the one it recorded
        self.config_hashes = config_hashes(cfg)
        self.config_hash = self.config_hashes[0]
        # the run id is settled by train() (lifecycle.resolve_identity: run.json, ledger.run_id or derived)
        self.run_id = cfg["ledger"]["run_id"] or lifecycle.derived_run_id(self.out_dir, self.config_hash)
        self.telemetry: DPMetrics | None = None  # started by train(), stopped when it returns
        self._x_train = jnp.asarray(self.dataset.x_train)
        self._y_train = jnp.asarray(self.dataset.y_train)
        self._setup()

    # -- set-up --------------------------------------------------------------------------------------------
    def _loss(self, model, batch):
        return models.cross_entropy(model(batch["x"]), batch["y"])

    def _setup(self) -> None:
        """Build the run's training object: :meth:`PrivacyEngine.make_private` (``training.dp.enabled``) or its
        non-private twin :meth:`~PrivacyEngine.make_nonprivate`. Both open the ledger later, in train()."""
        t, dp = self.cfg["training"], self.cfg["training"]["dp"]
        # the steps the sampler will take (jaxdp.sampling.steps_for_epochs, the one rule); shuffled batches and
        # BLT's fixed batch order (FixedOrderSampler) both take N // B batches per epoch
        fixed_size = t["sampling"] != "poisson" or (self.dp and t["mechanism"] == "blt")
        planned = (steps_for_epochs(self.epochs, steps_per_epoch=self.n // int(round(t["batch_size"]))) if fixed_size
                   else steps_for_epochs(self.epochs, t["batch_size"] / self.n))
        from jaxdp.train.components import build_optimizer
        optimizer = build_optimizer(self.cfg["optimizer"], planned)  # a schedule's "total_steps": the planned steps
        self.engine = PrivacyEngine(accountant=t["accountant"], neighboring_relation=dp["neighboring_relation"])
        common = dict(loss_fn=self._loss, model=self.model, optimizer=optimizer, dataset_size=self.n,
                      batch_size=t["batch_size"], seed=self.seed, poisson_sampling=t["sampling"] == "poisson",
                      defer_ledger=True)  # train() reconciles with the ledger before step 1
        if self.dp:
            self.private = self._make_private(common)
        else:
            self.private = self.engine.make_nonprivate(epochs=self.epochs, **common)
        self.sampler = self.private.sampler
        self.noise_multiplier = self.private.noise_multiplier
        self.state = self.private.init()
        self.total_steps = self.sampler.steps_for_epochs(self.epochs)
        self._train_data = {"x": self._x_train, "y": self._y_train}
        graphdef, rest = self.graphdef, self.rest

        @jax.jit
        def correct(params, x, y):
            return jnp.sum(jnp.argmax(nnx.merge(graphdef, params, rest)(x), -1) == y)

        self._correct = correct

    def _make_private(self, common: dict):
        t, dp = self.cfg["training"], self.cfg["training"]["dp"]
        from jaxdp.per_example import backend_names   # built-ins, and any the model module registered
        if t["method"] not in backend_names():
            from jaxdp.train.config import ConfigError
            raise ConfigError(f"config key 'training.method' must be one of {', '.join(backend_names())} (the "
                              "registered per-example backends), got {!r}".format(t["method"]))
        from jaxdp import _checks   # refuse delta >= 1/N in the config's own terms (the engine re-checks)
        delta = _checks.present(self.delta)   # set whenever training.dp.enabled
        _checks.delta_for_dataset(delta, self.n, allow_large_delta=dp["allow_large_delta"],
                                  override="training.dp.allow_large_delta: true", warn=False)
        common = dict(common, **self._clipping(), method=t["method"], microbatch_size=t["microbatch_size"],
                      allow_large_delta=dp["allow_large_delta"])
        if t["bands"] is not None:   # BandMF's b (1 with another mechanism: independent noise), recorded as given
            common.update(bands=int(t["bands"]))
        if t["mechanism"] == "bandmf":   # banded MF noise + cyclic Poisson sampling (jaxdp.matrix_factorization)
            common.update(mechanism="bandmf")
        if t["mechanism"] == "blt":   # BLT noise over a fixed batch order, stops at the horizon (jaxdp.blt)
            common.update(mechanism="blt", buffers=int(t["buffers"]), momentum=_heavy_ball(self.cfg))
        if dp["noise_multiplier"] is None:
            return self.engine.make_private_with_epsilon(
                target_epsilon=dp["epsilon"], target_delta=delta, epochs=self.epochs, **common)
        with warnings.catch_warnings():   # a plan that cannot finish is refused below, not warned about
            warnings.filterwarnings("ignore", message="the plan cannot finish")
            private = self.engine.make_private(
                noise_multiplier=dp["noise_multiplier"], epochs=self.epochs, target_epsilon=dp["epsilon"],
                target_delta=delta, **common)
        shortfall = private.plan_shortfall()
        if shortfall is not None:
            raise ValueError(shortfall.replace("epochs <=", "training.epochs <=")
                             .replace("noise_multiplier >=", "training.dp.noise_multiplier >=")
                             .replace("a target epsilon >=", "training.dp.epsilon >="))
        return private

    def _clipping(self) -> dict:
        """``l2_clip_norm`` (``training.dp.max_grad_norm``: a number, or the per-layer tree of
        ``training.dp.per_layer``) and ``adaptive_clipping`` for the engine; bad group names are config errors that
        list the model's groups."""
        dp = self.cfg["training"]["dp"]
        out = {"l2_clip_norm": dp["max_grad_norm"], "adaptive_clipping": dp["adaptive"] or None}
        if dp["per_layer"] is not None:
            from jaxdp.clip_groups import clip_norm_tree
            from jaxdp.train.config import ConfigError
            try:
                out["l2_clip_norm"] = clip_norm_tree(self.params0, dp["per_layer"], dp["max_grad_norm"])
            except ValueError as e:
                raise ConfigError(f"config key 'training.dp.per_layer': {e}") from None
        return out

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, params=None, split: str = "test") -> float:
        params = distributed.host_local(self.state.params if params is None else params)  # local copy
        x = self.dataset.x_test if split == "test" else self.dataset.x_train
        y = self.dataset.y_test if split == "test" else self.dataset.y_train
        chunk, right = 512, 0
        for i in range(0, len(y), chunk):
            right += int(self._correct(params, jnp.asarray(x[i:i + chunk]), jnp.asarray(y[i:i + chunk])))
        return right / len(y)

    def per_example_losses(self, split: str = "train", params=None) -> np.ndarray:
        """Cross-entropy of every example of a split under the current (or given) parameters."""
        params = self.state.params if params is None else params
        x = self.dataset.x_test if split == "test" else self.dataset.x_train
        y = self.dataset.y_test if split == "test" else self.dataset.y_train
        if not hasattr(self, "_loss_jit"):
            graphdef, rest = self.graphdef, self.rest
            self._loss_jit = jax.jit(lambda p, xx, yy: models.cross_entropy(nnx.merge(graphdef, p, rest)(xx), yy))
        out = [np.asarray(self._loss_jit(params, jnp.asarray(x[i:i + 512]), jnp.asarray(y[i:i + 512])))
               for i in range(0, len(y), 512)]
        return np.concatenate(out)

    @classmethod
    def load(cls, run_dir: str) -> DPTrainer:
        """The trainer of a finished (or interrupted) run directory, with its checkpointed state restored."""
        cfg_path = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{run_dir}: no config.yaml (not a `jaxdp train` run directory)")
        trainer = cls(cfg_path, out_dir=run_dir, progress=False, log=False)
        if not trainer._restore():
            raise FileNotFoundError(f"{run_dir}: no checkpoint to load")
        return trainer

    # -- privacy -------------------------------------------------------------------------------------------
    def get_privacy_spent(self) -> tuple[float, float | None]:
        """``(epsilon, delta)`` spent so far; ``(inf, None)`` for a non-private run."""
        return self.private.get_epsilon(self.delta), self.delta

    # -- checkpointing -------------------------------------------------------------------------------------
    def _save(self) -> None:
        step = int(self.state.step)
        engine_state = self.private.state_dict(self.state)   # train state, sampler and accountant
        meta = {"step": step, "sampler": engine_state["sampler"], "metrics": self.metrics, "run_id": self.run_id,
                "config_hash": self.config_hash, "status": self.status, "accountant": engine_state["accountant"]}
        if self.seed_source == "os":
            meta["drawn_seed"] = self.seed  # needed to resume identically; private like the checkpoint itself
        if self.main:  # the state is replicated: process 0's copy is everyone's
            checkpoint.save(os.path.join(self.out_dir, "checkpoint"), self.state, meta, step=step)
            lifecycle.fault_point("after_checkpoint")
            lifecycle.note_checkpoint(self, step)

    def _restore(self) -> bool:
        """Load the newest checkpoint (integrity-checked, then cross-checked: train state, sampler and
        accountant must agree on the step). ``self._ckpt_meta`` keeps its metadata."""
        self._ckpt_meta = None
        ckpt = os.path.join(self.out_dir, "checkpoint")
        loaded = checkpoint.load(ckpt, self.state) if self.resume and checkpoint.exists(ckpt) else None
        if distributed.process_count() > 1:  # all resume from the same checkpoint (output.dir must be shared)
            distributed.check_same_on_all_processes(
                loaded and [loaded[1]["sampler"], loaded[1]["metrics"]],
                f"the checkpoint in {ckpt} (is output.dir on a filesystem every process sees?)")
        if loaded is None:
            return False
        state, meta = loaded
        if meta.get("config_hash") not in self.config_hashes:
            raise ValueError(f"{self.out_dir} holds a checkpoint of a different config; use another output.dir, "
                             "or --fresh to move the old files aside")
        self.config_hash = meta["config_hash"]   # a run written before the hash changed keeps its own
        lifecycle.check_restored(self, state, meta)   # before anything is restored into the engine
        self.state = self.private.load_state_dict({"train_state": state, "sampler": meta["sampler"],
                                                   "accountant": meta["accountant"]})
        self.metrics = meta["metrics"]
        self.run_id = meta["run_id"]
        self.status = "running"  # never trusted from the file: derived from the step counts (_complete)
        self._ckpt_meta = meta
        return True

    def _complete(self) -> bool:
        """Nothing left to train: the planned steps are done. (A run stopped by its target epsilon goes through
        the loop again: its next step is refused before touching data, which ends and commits it.)"""
        if int(self.state.step) >= self.total_steps:
            self.status = "finished"
            return True
        return False

    # -- ledger --------------------------------------------------------------------------------------------
    def _ledger_open(self, complete: bool = False) -> None:
        """Reconcile the run with the privacy ledger before anything else (the engine's gate,
        :class:`jaxdp.ledger.gate.LedgerGate`): adopt its open reservation, reserve the planned steps, or commit
        a complete run's steps. A collective with several processes (process 0 talks to the ledger)."""
        lcfg = self.cfg["ledger"]
        self.dataset_id = lcfg["dataset_id"] or self.dataset.name
        gate = self.private.open_ledger(
            lcfg["path"] or None, dataset_id=self.dataset_id, run_id=self.run_id, parent_run_id=lcfg["parent_run_id"],
            reserve=lcfg["reserve"], planned_steps=self.total_steps, model=self.model_name,
            config_hash=self.config_hash, accept_config_hashes=self.config_hashes, complete=complete,
            where=self.out_dir, log=print if self.log else None)
        self.ledger = None if gate is None else gate.ledger
        if self.telemetry is not None and gate is not None:
            self.telemetry.record_ledger(protected=gate.protected, reserved=gate.reserved,
                                         budget_remaining=gate.remaining())

    def _ledger_commit(self) -> None:
        run = self.private.commit_ledger(int(self.state.step))   # None: nothing was reserved
        if run is not None and self.telemetry is not None:
            self.telemetry.record_ledger(protected=bool(run.charged), reserved=False)

    # -- the loop ------------------------------------------------------------------------------------------
    def _write_outputs(self) -> dict:
        import yaml
        os.makedirs(self.out_dir, exist_ok=True)
        if self.main:
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(self.cfg, f, sort_keys=False)
        eps, delta = self.get_privacy_spent()
        t = self.cfg["training"]
        summary = RunSummary.from_dict({
            "run_id": self.run_id, "status": self.status, "dp": self.dp,
            "dataset": self.dataset.name, "training_set_size": self.n, "model": self.model_name,
            "seed_source": self.seed_source,  # "config" (pinned by the user) or "os" (drawn, kept secret)
            "epsilon": eps if math.isfinite(eps) else None, "delta": delta,
            "delta_at_least_one_over_n": bool(delta is not None and delta >= 1.0 / self.n),  # delta: None if not DP
            "noise_multiplier": self.noise_multiplier,
            # target epsilon, clipping, accountant, relation, mechanism (BLT: buffers, min_separation, horizon)
            **self.private.privacy_record(),
            "sample_rate": self.sampler.sample_rate, "expected_batch_size": self.sampler.expected_batch_size,
            "steps": int(self.state.step), "planned_steps": self.total_steps,
            "sampling": self.sampler.sampling,
            "clipping_method": t["method"], "config_hash": self.config_hash,
            "jaxdp_version": __import__("jaxdp").__version__,
            "final_test_accuracy": self.metrics[-1]["test_accuracy"] if self.metrics else None,
            "epochs": self.metrics,
        }, source=f"the record of run {self.run_id!r}")
        if self.main:
            summary.write(self.out_dir)   # the one writer of metrics.json (atomic)
        return summary.to_dict()

    def _clip_warnings(self) -> None:
        """Warn when the clip norm looks mis-set, judged on the epochs after the first (early gradients are
        always large, so epoch 1 alone says little)."""
        fracs = [r["clip_fraction"] for r in self.metrics if "clip_fraction" in r]
        fracs = fracs[1:] if len(fracs) > 1 else fracs
        if not fracs or self.private.adaptive is not None:  # adaptive: set by target_quantile
            return
        mean = float(np.mean(fracs))
        if mean > CLIP_HIGH:
            warnings.warn(f"{100 * mean:.0f}% of examples were clipped on average: max_grad_norm is probably too "
                          "low (every update is scaled down and the signal-to-noise ratio suffers); try a larger "
                          "max_grad_norm.", stacklevel=3)
        elif mean < CLIP_LOW:
            warnings.warn(f"only {100 * mean:.1f}% of examples were clipped on average: max_grad_norm is probably "
                          "too high, so the noise (scaled by it) is larger than needed; try a smaller "
                          "max_grad_norm.", stacklevel=3)

    def train(self, max_epochs: int | None = None) -> dict:
        """Run (or resume) training; returns the metrics summary also written to ``metrics.json``.

        ``max_epochs`` stops after that many epochs in this call (checkpointed), e.g. to resume later.
        """
        # Several processes: process 0 alone moves files, writes run.json and talks to the ledger; each of
        # these steps is a collective, so the others wait for it (and stop with it if it fails).
        if not self.resume:
            moved = distributed.on_main_process(lambda: lifecycle.move_aside(self.out_dir),
                                                "moving the previous run's files aside")
            if moved and self.log:
                print(f"--fresh: the previous run's files were moved to {moved}")
        out_existed = os.path.isdir(self.out_dir)
        resumed = self._restore()
        distributed.on_main_process(
            lambda: lifecycle.resolve_identity(self, resumed, self._ckpt_meta, fresh=not self.resume),
            "the run directory check")
        # process 0's run id and config hash (run.json) everywhere
        self.run_id, self.config_hash = distributed.broadcast_from_main([self.run_id, self.config_hash])
        self.resume = True  # from here on (e.g. a second train() call) this directory's checkpoint is ours
        complete = self._complete()
        self.trained_steps = 0  # steps taken by this call (0: a finished run was only re-reported)
        self._telemetry_start()
        try:
            try:
                self._ledger_open(complete)  # reconcile with the ledger before anything else
            except Exception:
                if not out_existed and self.main:  # a refused new run leaves no run directory (only its run.json)
                    _remove_new_run_dir(self.out_dir)
                raise
            if complete:
                if self.log:
                    print(f"nothing was trained: {self.out_dir} already holds run {self.run_id!r}, "
                          f"{self.status.replace('_', ' ')} at step {int(self.state.step)}; use --fresh "
                          "(resume=False) or another output directory to train again", file=sys.stderr)
                return self._write_outputs()
            return self._train_loop(resumed, max_epochs)
        finally:
            self._telemetry_stop()

    def _telemetry_start(self) -> None:
        """Start the run's telemetry (if configured). Telemetry never stops a run: a port in use or a missing
        prometheus-client is reported in one warning line and training goes on without it."""
        out = self.cfg["output"]
        if not self.main or self.telemetry is not None or (out["telemetry_port"] is None and not out["pushgateway"]):
            return  # several processes: process 0 alone exports
        try:
            from jaxdp.telemetry import DPMetrics
            self.telemetry = DPMetrics(self.model_name, self.dataset.name, self.run_id,
                                       port=out["telemetry_port"], pushgateway=out["pushgateway"])
        except (OSError, ImportError) as e:
            warnings.warn(f"telemetry is off for this run: {e}", stacklevel=3)

    def _telemetry_stop(self) -> None:
        if self.telemetry is not None:
            if self.telemetry.push_failures and self.log:
                print(f"telemetry: {self.telemetry.push_failures} push(es) to {self.cfg['output']['pushgateway']} "
                      "failed (training was not affected)", file=sys.stderr)
            self.telemetry.close()
            self.telemetry = None

    def _train_loop(self, resumed: bool, max_epochs: int | None) -> dict:
        self.status = "running"
        os.makedirs(self.out_dir, exist_ok=True)
        step_at_start = int(self.state.step)
        # Epoch k ends at step ceil(k / q) (Poisson) or k * steps_per_epoch (shuffle), so fractional steps
        # per epoch add up exactly to the planned total.
        n_epochs = math.ceil(self.epochs)
        ends = [min(self.sampler.steps_for_epochs(k), self.total_steps) for k in range(1, n_epochs + 1)]
        ends[-1] = self.total_steps
        progress = _Progress(self.cfg["output"]["progress"] and self.main, self.total_steps)
        target = self.private.target_epsilon
        epochs_run = 0
        logged, unlogged = epochs_to_log(n_epochs), None   # the epochs printed; the last row not printed yet
        if self.log and resumed:
            print(f"resuming {self.out_dir} at step {int(self.state.step)}")
        while int(self.state.step) < self.total_steps:
            epoch = next(k for k, end in enumerate(ends, 1) if int(self.state.step) < end)
            t0 = time.time()
            sums = self._epoch_steps(ends[epoch - 1] - int(self.state.step), epoch, n_epochs, progress, target)
            if sums is None:  # a step was refused (target epsilon or ledger reservation): the run ends here
                break
            row = self._epoch_row(epoch, sums, t0)
            if self.telemetry is not None:
                self.telemetry.record_epoch(epsilon=row["epsilon"], clip_fraction=row.get("clip_fraction"),
                                            group_clip_fraction=row.get("group_clip_fraction"),
                                            noise_multiplier=self.noise_multiplier)
            progress.update(int(self.state.step), epoch, n_epochs, row["epsilon"], target, row["test_accuracy"])
            unlogged = row
            if self.log and (epochs_run == 0 or epoch in logged):   # this call's first epoch, and the plan's
                progress.close()
                print(_epoch_line(row), flush=True)
                unlogged = None
            epochs_run += 1
            if epoch % self.cfg["output"]["checkpoint_every"] == 0 or int(self.state.step) >= self.total_steps:
                if int(self.state.step) >= self.total_steps:
                    self.status = "finished"
                self._save()
            if max_epochs is not None and epochs_run >= max_epochs:
                break
        progress.close()
        if self.log and unlogged is not None:   # the run stopped early (max_epochs, budget): where it stopped
            print(_epoch_line(unlogged), flush=True)
        self._clip_warnings()
        if int(self.state.step) >= self.total_steps:
            self.status = "finished"
        self._save()
        self.trained_steps = int(self.state.step) - step_at_start
        if self.status in ("finished", "budget_exhausted"):
            lifecycle.fault_point("before_commit")
            self._ledger_commit()
        return self._write_outputs()

    def _epoch_steps(self, steps: int, epoch: int, n_epochs: int, progress: _Progress,
                     target: float | None) -> dict | None:
        """Take an epoch's steps; returns what its metrics row sums, or None when a step was refused (the run
        is then ``budget_exhausted``: the target epsilon or the ledger reservation is reached)."""
        loss_sum = n_real = 0.0
        clip_fracs: list[float] = []
        layer_norms: dict[str, list[float]] = {}
        group_fracs: dict[str, list[float]] = {}
        for batch, mask in self.private.batches(self._train_data, steps):
            try:
                self.state, stats = self.private.step(self.state, batch, jnp.asarray(mask))
            except PrivacyBudgetExhausted as e:
                self.status = "budget_exhausted"
                progress.close()
                if self.main:
                    print(f"jaxdp: {e}", file=sys.stderr)
                return None
            loss_sum += float(jnp.sum(jnp.where(mask, stats.per_example_losses, 0.0)))
            n_real += float(mask.sum())
            if hasattr(stats, "clip_fraction"):  # private steps report clipping
                clip_fracs.append(float(stats.clip_fraction))
                for k, v in stats.layer_norm_mean.items():
                    layer_norms.setdefault(k, []).append(float(v))
                for k, v in stats.group_clip_fraction.items():
                    group_fracs.setdefault(k, []).append(float(v))
            progress.update(int(self.state.step), epoch, n_epochs, None, target, None)
        return {"loss_sum": loss_sum, "n_real": n_real, "clip_fracs": clip_fracs, "layer_norms": layer_norms,
                "group_fracs": group_fracs}

    def _epoch_row(self, epoch: int, sums: dict, t0: float) -> dict:
        """The epoch's metrics row (appended to ``self.metrics``): loss, test accuracy, epsilon, clipping."""
        loss_sum, n_real = distributed.process_sum(sums["loss_sum"], sums["n_real"])  # over all processes' rows
        acc = self.evaluate()
        eps, _ = self.get_privacy_spent()
        row: dict[str, Any] = {"epoch": epoch, "step": int(self.state.step), "train_loss": loss_sum / max(n_real, 1.0),
               "test_accuracy": acc, "epsilon": eps if math.isfinite(eps) else None, "seconds": time.time() - t0}
        if self.private.adaptive is not None:
            row["clip_norm"] = self.private.clip_norm(self.state)  # C_t: post-processing of releases
        if sums["clip_fracs"]:
            row["clip_fraction"] = float(np.mean(sums["clip_fracs"]))
            row["group_clip_fraction"] = {k: float(np.mean(v)) for k, v in sums["group_fracs"].items()}
            row["layer_grad_norm_mean"] = {k: float(np.mean(v)) for k, v in sums["layer_norms"].items()}
        self.metrics.append(row)
        return row


def epochs_to_log(epochs: int, lines: int = 10) -> frozenset[int]:
    """The epochs whose line the trainer prints: the first, the last and every ``ceil(epochs / lines)``-th, so
    a run prints at most ``lines + 2`` epoch lines however long it is (a resumed or early-stopped run also
    prints the first and the last epoch it trains).

    >>> sorted(epochs_to_log(150))
    [1, 15, 30, 45, 60, 75, 90, 105, 120, 135, 150]
    >>> sorted(epochs_to_log(3)), sorted(epochs_to_log(25))
    ([1, 2, 3], [1, 3, 6, 9, 12, 15, 18, 21, 24, 25])
    """
    every = max(1, math.ceil(epochs / lines))
    return frozenset({1, epochs} | set(range(every, epochs + 1, every)))


def _epoch_line(row: dict) -> str:
    """The printed line of an epoch's metrics row."""
    eps_s = f"epsilon {row['epsilon']:.3f}" if row["epsilon"] is not None else "epsilon inf (non-private)"
    clip_s = f"  clipped {100 * row['clip_fraction']:.0f}%" if "clip_fraction" in row else ""
    clip_s += f"  C {row['clip_norm']:.3g}" if "clip_norm" in row else ""
    return (f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  test acc {row['test_accuracy']:.4f}  "
            f"{eps_s}{clip_s}  ({row['seconds']:.1f}s)")


def compare(config: dict | str, out_dir: str | None = None, progress: bool | None = None,
            log: bool = True) -> dict:
    """Train the config privately and as a non-private baseline (``dp.enabled: false``); report both."""
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else validate_config(config)
    base = out_dir or cfg["output"]["dir"]
    dp_cfg = json.loads(json.dumps(cfg))
    dp_cfg["training"]["dp"]["enabled"] = True
    nodp_cfg = json.loads(json.dumps(cfg))
    nodp_cfg["training"]["dp"]["enabled"] = False
    trainers = {name: DPTrainer(c, out_dir=os.path.join(base, name), progress=progress, log=log)
                for name, c in (("dp", dp_cfg), ("non_private", nodp_cfg))}
    lifecycle.refuse_unprivate_on_protected(trainers["non_private"])  # before anything is trained or charged
    results = {}
    for name, trainer in trainers.items():
        if log:
            print(f"== {name.replace('_', '-')} run -> {trainer.out_dir}")
        results[name] = trainer.train()
    dp_acc = results["dp"]["final_test_accuracy"]
    base_acc = results["non_private"]["final_test_accuracy"]
    summary = {"dp_accuracy": dp_acc, "non_private_accuracy": base_acc,
               "accuracy_difference": base_acc - dp_acc, "epsilon": results["dp"]["epsilon"],
               "delta": results["dp"]["delta"], "noise_multiplier": results["dp"]["noise_multiplier"],
               "dp_dir": os.path.join(base, "dp"), "non_private_dir": os.path.join(base, "non_private")}
    if distributed.is_main_process():   # one file per output, as for the runs' own records
        atomic_write(os.path.join(base, "comparison.json"), json.dumps(summary, indent=1))
    return summary


__all__ = ["DPTrainer", "compare", "epochs_to_log"]
