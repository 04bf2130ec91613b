"""Prometheus telemetry for private training (opt-in; needs the ``telemetry`` extra: prometheus-client).

Metrics (gauges; labels in braces):

* ``dp_training_epsilon_consumed{model,dataset,run_id}``  -- epsilon spent so far by the run (at its delta).
* ``dp_training_budget_remaining{dataset}``               -- epsilon left in the dataset's ledger budget.
* ``dp_gradient_clip_fraction{model,layer}``              -- fraction of examples clipped (layer "all" = flat).
* ``dp_noise_multiplier{model}``                           -- sigma of the run.
* ``dp_membership_inference_auc{model}``                   -- AUC of the latest membership-inference audit.
* ``dp_training_accuracy_delta{model}``                    -- non-private minus private accuracy.
* ``dp_training_ledger_reserved{model,dataset,run_id}``   -- 1 if the run holds a ledger reservation, else 0.
* ``dp_dataset_protected{dataset}``                        -- 1 if the dataset is registered in the ledger.
* ``dp_telemetry_push_failures{run_id}``                  -- pushes to the Pushgateway that failed so far.

Telemetry never stops training: a push that fails (Pushgateway down, DNS, timeout) is logged (logger
``jaxdp.telemetry``) and counted in :attr:`DPMetrics.push_failures`; the trainer also goes on without telemetry
when its port is taken (a one-line warning). Constructing :class:`DPMetrics` directly with a taken port raises
:class:`TelemetryError` (an ``OSError``) naming the port.

Expose them on an HTTP endpoint (``port``) for Prometheus to scrape and/or push them to a Pushgateway
(``pushgateway`` URL). The alert rules shipped in ``jaxdp/telemetry/alerts.yml`` (tested with
``promtool test rules``) fire on: budget nearly spent, audit AUC above 0.60, clip fraction above 0.90, and a
training run on a protected dataset without a ledger reservation.
"""
from __future__ import annotations

import logging
from importlib import resources

_log = logging.getLogger("jaxdp.telemetry")


class TelemetryError(OSError):
    """The metrics endpoint cannot be started (e.g. the port is taken)."""

ALERT_RULES = "alerts.yml"


def alert_rules_path() -> str:
    """Path of the shipped Prometheus alert rules file."""
    return str(resources.files("jaxdp.telemetry").joinpath(ALERT_RULES))


class DPMetrics:
    """The jaxdp gauges in their own registry, optionally served over HTTP and/or pushed to a Pushgateway.

    Args:
      model, dataset, run_id: label values for this run.
      port: serve ``/metrics`` on this port (``0`` picks a free one; see :attr:`port`); None = no server.
      addr: address to bind (default loopback).
      pushgateway: Pushgateway URL (``host:port`` or ``http://host:port``); :meth:`push` sends the gauges.
      job: the Pushgateway job name.
    """

    def __init__(self, model: str, dataset: str, run_id: str, *, port: int | None = None,
                 addr: str = "127.0.0.1", pushgateway: str | None = None, job: str = "jaxdp") -> None:
        try:
            import prometheus_client as pc
        except ImportError:
            raise ImportError("telemetry needs prometheus-client: pip install 'jaxdp[telemetry]'") from None
        self._pc = pc
        self.registry = pc.CollectorRegistry()
        self.model, self.dataset, self.run_id = model, dataset, run_id
        self.pushgateway, self.job = pushgateway, job

        def gauge(name, doc, labels):
            return pc.Gauge(name, doc, labels, registry=self.registry)

        self.epsilon = gauge("dp_training_epsilon_consumed", "Epsilon spent by the run so far",
                             ["model", "dataset", "run_id"])
        self.budget_remaining = gauge("dp_training_budget_remaining",
                                      "Epsilon left in the dataset's ledger budget", ["dataset"])
        self.clip_fraction = gauge("dp_gradient_clip_fraction", "Fraction of examples whose gradient was clipped",
                                   ["model", "layer"])
        self.noise_multiplier = gauge("dp_noise_multiplier", "Noise multiplier sigma", ["model"])
        self.mia_auc = gauge("dp_membership_inference_auc", "Membership-inference audit AUC", ["model"])
        self.accuracy_delta = gauge("dp_training_accuracy_delta", "Non-private minus private accuracy", ["model"])
        self.ledger_reserved = gauge("dp_training_ledger_reserved", "1 if the run holds a ledger reservation",
                                     ["model", "dataset", "run_id"])
        self.dataset_protected = gauge("dp_dataset_protected", "1 if the dataset is registered in the ledger",
                                       ["dataset"])
        self.push_failed = gauge("dp_telemetry_push_failures", "Pushes to the Pushgateway that failed", ["run_id"])
        self.push_failures = 0
        self.push_timeout = 5.0
        self._server = None
        self.port = None
        if port is not None:
            try:
                self._server, _thread = pc.start_http_server(port, addr=addr, registry=self.registry)
            except OSError as e:
                raise TelemetryError(f"cannot serve metrics on {addr}:{port} ({e.strerror or e}); choose another "
                                     "telemetry port (0 picks a free one)") from None
            self.port = self._server.server_port

    # -- updates ---------------------------------------------------------------------------------------------
    def record_epoch(self, *, epsilon: float | None, clip_fraction: float | None = None,
                     group_clip_fraction: dict | None = None, noise_multiplier: float | None = None) -> None:
        if epsilon is not None:
            self.epsilon.labels(self.model, self.dataset, self.run_id).set(epsilon)
        if clip_fraction is not None:
            self.clip_fraction.labels(self.model, "all").set(clip_fraction)
        for layer, frac in (group_clip_fraction or {}).items():
            if layer != "all":
                self.clip_fraction.labels(self.model, layer).set(frac)
        if noise_multiplier is not None:
            self.noise_multiplier.labels(self.model).set(noise_multiplier)
        self.push()

    def record_ledger(self, *, protected: bool, reserved: bool, budget_remaining: float | None = None) -> None:
        self.dataset_protected.labels(self.dataset).set(1.0 if protected else 0.0)
        self.ledger_reserved.labels(self.model, self.dataset, self.run_id).set(1.0 if reserved else 0.0)
        if budget_remaining is not None:
            self.budget_remaining.labels(self.dataset).set(budget_remaining)
        self.push()

    def record_audit(self, auc: float) -> None:
        self.mia_auc.labels(self.model).set(auc)
        self.push()

    def record_accuracy_delta(self, delta: float) -> None:
        self.accuracy_delta.labels(self.model).set(delta)
        self.push()

    # -- export ----------------------------------------------------------------------------------------------
    def exposition(self) -> str:
        """The metrics in Prometheus text format."""
        return self._pc.generate_latest(self.registry).decode()

    def push(self) -> bool:
        """Push the gauges to the Pushgateway (if one is set). Never raises: a failure is logged and counted
        (:attr:`push_failures`, gauge ``dp_telemetry_push_failures``). Returns whether the push succeeded."""
        if not self.pushgateway:
            return True
        try:
            self._pc.push_to_gateway(self.pushgateway, job=self.job, registry=self.registry,
                                     grouping_key={"run_id": self.run_id}, timeout=self.push_timeout)
            return True
        except Exception as e:  # noqa: BLE001 - telemetry must never fail the run (URLError, OSError, HTTP errors)
            self.push_failures += 1
            self.push_failed.labels(self.run_id).set(self.push_failures)
            _log.warning("telemetry push to %s failed (%d so far): %s", self.pushgateway, self.push_failures, e)
            return False

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["DPMetrics", "TelemetryError", "alert_rules_path"]
