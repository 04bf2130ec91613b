"""Telemetry: gauges scraped over real HTTP; alert rules checked and unit-tested with the real promtool."""
import os
import shutil
import subprocess
import urllib.request

import pytest

from jaxdp.telemetry import DPMetrics, alert_rules_path

RULES_DIR = os.path.dirname(alert_rules_path())


def _promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: `make test` installs Debian's prometheus package "
                    "(apt-get install prometheus); install it to run the alert-rule tests")
    return path


def test_promtool_check_and_unit_test_rules():
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", alert_rules_path()], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "4 rules found" in check.stdout
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=RULES_DIR, capture_output=True,
                          text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def test_rule_tests_catch_a_wrong_threshold(tmp_path):
    """The unit tests are not vacuous: moving the AUC threshold from 0.60 to 0.70 makes them fail."""
    promtool = _promtool()
    rules = open(alert_rules_path()).read().replace("dp_membership_inference_auc > 0.60",
                                                    "dp_membership_inference_auc > 0.70")
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(os.path.join(RULES_DIR, "alerts_test.yml"), tmp_path / "alerts_test.yml")
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert test.returncode != 0 and "DPMembershipInferenceAUCHigh" in test.stdout + test.stderr


def test_metrics_are_scraped_over_http():
    m = DPMetrics("cnn_small", "digits", "run42", port=0)
    try:
        m.record_epoch(epsilon=1.25, clip_fraction=0.4, group_clip_fraction={"all": 0.4, "conv1": 0.2},
                       noise_multiplier=1.1)
        m.record_ledger(protected=True, reserved=True, budget_remaining=2.5)
        m.record_audit(0.53)
        m.record_accuracy_delta(0.04)
        body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    expected = [
        'dp_training_epsilon_consumed{dataset="digits",model="cnn_small",run_id="run42"} 1.25',
        'dp_gradient_clip_fraction{layer="all",model="cnn_small"} 0.4',
        'dp_gradient_clip_fraction{layer="conv1",model="cnn_small"} 0.2',
        'dp_noise_multiplier{model="cnn_small"} 1.1',
        'dp_training_budget_remaining{dataset="digits"} 2.5',
        'dp_membership_inference_auc{model="cnn_small"} 0.53',
        'dp_training_accuracy_delta{model="cnn_small"} 0.04',
        'dp_training_ledger_reserved{dataset="digits",model="cnn_small",run_id="run42"} 1.0',
        'dp_dataset_protected{dataset="digits"} 1.0',
    ]
    for line in expected:
        assert line in body, line
