"""`jaxdp epsilon` / `jaxdp calibrate` through jaxdp.cli.main, capturing stdout."""
from __future__ import annotations

import json
import math

import pytest

from jaxdp import accounting as acct
from jaxdp.cli import main

MNIST = ["--dataset-size", "60000", "--batch-size", "256", "--epochs", "60", "--delta", "1e-5"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_epsilon_json(capsys):
    rc, out, _ = run(capsys, "epsilon", *MNIST, "--noise-multiplier", "1.1", "--accountant", "rdp", "--json")
    assert rc == 0
    res = json.loads(out)              # exactly one JSON object
    assert res["accountant"] == "rdp" and res["steps"] == 14063 == math.ceil(60 / (256 / 60000))
    assert res["sample_rate"] == pytest.approx(256 / 60000)
    assert res["epsilon"] == pytest.approx(2.5967, abs=5e-5)


def test_epsilon_table_default_prv(capsys):
    rc, out, _ = run(capsys, "epsilon", *MNIST, "--noise-multiplier", "1.1")
    assert rc == 0
    rows = dict(line.split(None, 1)[0:1] + [line.rsplit(None, 1)[-1]] for line in out.strip().splitlines())
    assert rows["accountant"] == "prv" and rows["steps"] == "14063"
    assert float(rows["epsilon"]) == pytest.approx(2.392, abs=1e-3)


def test_epsilon_steps_and_pld(capsys):
    rc, out, _ = run(capsys, "epsilon", "-N", "1000", "-B", "1000", "--steps", "1", "-s", "1.0",
                     "--delta", "1e-5", "--accountant", "pld", "--json")
    res = json.loads(out)
    assert rc == 0 and res["steps"] == 1 and res["sample_rate"] == 1.0
    assert res["epsilon"] == pytest.approx(4.37718, abs=1e-4)   # the plain Gaussian mechanism, sigma = 1


def test_calibrate_json(capsys):
    rc, out, _ = run(capsys, "calibrate", "--dataset-size", "1000", "--batch-size", "40", "--target-epsilon", "8",
                     "--epochs", "90", "--delta", "1e-5", "--accountant", "rdp", "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["steps"] == 2250 and res["sample_rate"] == pytest.approx(0.04)
    assert res["noise_multiplier"] <= 1.416015625                # Opacus's bisection answer
    assert res["epsilon"] <= 8.0 and res["epsilon"] == pytest.approx(8.0, abs=1e-3)
    assert res["epsilon"] == acct.compute_epsilon(res["noise_multiplier"], 0.04, 2250, 1e-5, "rdp")


def test_calibrate_table(capsys):
    rc, out, _ = run(capsys, "calibrate", "-N", "1000", "-B", "40", "-e", "8", "--epochs", "90",
                     "--delta", "1e-5", "--accountant", "rdp")
    assert rc == 0 and "noise multiplier" in out and "epsilon reached" in out


def test_cli_errors(capsys):
    rc, out, err = run(capsys, "epsilon", *MNIST, "-s", "1.1", "--sampling", "shuffle")
    assert rc == 2 and out == "" and "rdp" in err and "without replacement" in err
    rc, out, err = run(capsys, "epsilon", "-N", "100", "-B", "10", "--epochs", "1", "-s", "1", "--delta", "0")
    assert rc == 2 and "delta" in err
    rc, out, err = run(capsys, "calibrate", "-N", "100", "-B", "10", "--epochs", "1", "-e", "-1",
                       "--delta", "1e-5", "--accountant", "rdp")
    assert rc == 2 and "epsilon" in err
    rc, out, err = run(capsys, "epsilon", "-N", "100", "-B", "200", "--epochs", "1", "-s", "1", "--delta", "1e-5")
    assert rc == 2 and "batch-size" in err


def test_cli_delta_at_least_one_over_n_is_refused_unless_overridden(capsys):
    for cmd in (["epsilon", "-s", "1"], ["calibrate", "-e", "3"]):
        rc, out, err = run(capsys, *cmd, "-N", "100", "-B", "10", "--epochs", "1", "--delta", "0.05",
                           "--accountant", "rdp", "--json")
        assert rc == 2 and "not below 1/N" in err and "--allow-large-delta" in err
        failure = json.loads(out)  # with --json, the error as one JSON object (docs/cli.md)
        assert failure["ok"] is False and failure["exit_status"] == 2 and "not below 1/N" in failure["message"]
    with pytest.warns(acct.DeltaWarning, match=r"delta < 1/N"):
        rc, out, _ = run(capsys, "epsilon", "-N", "100", "-B", "10", "--epochs", "1", "-s", "1",
                         "--delta", "0.05", "--accountant", "rdp", "--json", "--allow-large-delta")
    res = json.loads(out)
    assert rc == 0 and res["epsilon"] > 0 and res["allow_large_delta"] is True


def test_shuffle_cli_rdp_replace_one(capsys):
    rc, out, _ = run(capsys, "epsilon", "-N", "10000", "-B", "100", "--epochs", "1", "-s", "1.0", "--delta",
                     "1e-5", "--sampling", "shuffle", "--accountant", "rdp", "--neighboring-relation",
                     "replace_one", "--json")
    res = json.loads(out)
    assert rc == 0 and res["sampling"] == "shuffle" and res["neighboring_relation"] == "replace_one"
    assert res["epsilon"] == acct.compute_epsilon(1.0, 0.01, 100, 1e-5, "rdp", sampling="shuffle",
                                                  dataset_size=10000, neighboring_relation="replace_one")


def test_help(capsys):
    for cmd in ("epsilon", "calibrate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "--accountant" in capsys.readouterr().out
