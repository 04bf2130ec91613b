"""Issue 16 (CLI layer and names): one --json flag, one strict JSON rule, one error -> exit-status map for every
command (docs/cli.md); one atomic write (jaxdp._io); the renamed keywords and their deprecated old names."""
from __future__ import annotations

import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxdp import _cli, _io
from jaxdp.cli import build_parser, main

SMALL = ["-N", "1000", "-B", "10", "--epochs", "1", "--delta", "1e-5"]


def strict_json(text: str):
    """Parse as RFC 8259 JSON: ``Infinity``, ``-Infinity`` and ``NaN`` are not JSON and are refused."""
    def refuse(name):
        raise ValueError(f"not RFC 8259 JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------- the JSON rule
def test_epsilon_at_sigma_0_prints_strict_json(capsys):
    rc, out, _ = run(capsys, "epsilon", *SMALL, "-s", "0", "--json")
    assert rc == 0
    assert strict_json(out)["epsilon"] == "inf"


def test_ledger_json_writes_nan_as_null_not_minus_inf(tmp_path, capsys, monkeypatch):
    from jaxdp.ledger import Ledger
    led = str(tmp_path / "l.db")
    assert main(["ledger", "init", "--ledger", led, "--dataset-id", "d", "--max-epsilon", "5", "--delta", "1e-5"]) == 0
    capsys.readouterr()
    real = Ledger.summary

    def with_nan(self):
        s = real(self)
        s["datasets"]["d"]["remaining"] = math.nan  # an undefined value (e.g. inf - inf)
        s["datasets"]["d"]["epsilon"] = math.inf
        return s
    monkeypatch.setattr(Ledger, "summary", with_nan)
    rc, out, _ = run(capsys, "ledger", "show", "--ledger", led, "--json")
    d = strict_json(out)["datasets"]["d"]
    assert rc == 0 and d["remaining"] is None and d["epsilon"] == "inf"
    rc, out, _ = run(capsys, "ledger", "show", "--ledger", led)
    assert rc == 0 and "remaining undefined" in out and "spent (composed) inf" in out


def test_jsonable_and_dumps():
    import numpy as np
    v = {"a": float("inf"), "b": -float("inf"), "c": float("nan"), "d": np.float32(0.5), "e": (1, np.int64(2)),
         "f": np.array([1.0, np.inf])}
    assert _cli.jsonable(v) == {"a": "inf", "b": "-inf", "c": None, "d": 0.5, "e": [1, 2], "f": [1.0, "inf"]}
    assert strict_json(_cli.dumps(v))["c"] is None


# ------------------------------------------------------------------------------------- errors, exit statuses
# Every command with --json: a bad input gives exit 2, one line on stderr and one JSON error object on stdout.
BAD_INPUTS = {
    "epsilon": ["epsilon", "-N", "100", "-B", "200", "--epochs", "1", "-s", "1", "--delta", "1e-5"],
    "calibrate": ["calibrate", "-N", "100", "-B", "10", "--epochs", "1", "-e", "-1", "--delta", "1e-5"],
    "train": ["train", "--config", "{tmp}/missing.yaml"],
    "compare": ["compare", "--config", "{tmp}/missing.yaml"],
    "sweep": ["sweep", "--config", "{tmp}/missing.yaml", "--epsilons", "1"],
    "audit": ["audit", "--run", "{tmp}/missing", "--attack", "one_run"],
    "report": ["report", "--run", "{tmp}/missing"],
    "ledger show": ["ledger", "show", "--ledger", "{tmp}/missing.db"],
    "ledger reserve": ["ledger", "reserve", "--ledger", "{tmp}/missing.db", "--dataset-id", "d", "--run-id", "r",
                       "--steps", "1", "--sample-rate", "0.1", "--noise-multiplier", "1"],
    "ledger verify": ["ledger", "verify", "--ledger", "{tmp}/missing.db"],
    "ledger export": ["ledger", "export", "--ledger", "{tmp}/missing.db"],
}


@pytest.mark.parametrize("command", sorted(BAD_INPUTS))
def test_every_command_reports_errors_the_same_way(command, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in BAD_INPUTS[command]]
    rc, out, err = run(capsys, *argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxdp {command}: error: "), err
    assert out == ""                      # without --json: nothing on stdout
    rc, out, err = run(capsys, *argv, "--json")
    obj = strict_json(out)                # exactly one JSON object
    assert rc == 2 and obj["ok"] is False and obj["exit_status"] == 2 and obj["error"]
    assert obj["message"] and obj["message"] in err


def test_a_refusal_exits_1_with_its_details(tmp_path, capsys):
    led = str(tmp_path / "l.db")
    assert main(["ledger", "init", "--ledger", led, "--dataset-id", "d", "--max-epsilon", "0.5", "--delta",
                 "1e-5", "--accountant", "rdp"]) == 0
    capsys.readouterr()
    rc, out, err = run(capsys, "ledger", "reserve", "--ledger", led, "--dataset-id", "d", "--run-id", "r",
                       "--steps", "1000", "--sample-rate", "0.1", "--noise-multiplier", "0.8", "--json")
    obj = strict_json(out)
    assert rc == 1 and obj["exit_status"] == 1 and obj["error"] == "BudgetExceededError" and obj["details"]
    assert err.startswith("jaxdp ledger reserve: error: ") and len(err.strip().splitlines()) == 1


def test_ctrl_c_exits_130(capsys, monkeypatch):
    from jaxdp.accounting import core

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(core, "compute_epsilon", interrupted)
    try:
        rc, out, err = run(capsys, "epsilon", *SMALL, "-s", "1", "--json")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped jaxdp.cli.main as a KeyboardInterrupt traceback")
    assert rc == 130 and err.strip() == "jaxdp epsilon: interrupted"
    assert strict_json(out)["exit_status"] == 130


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    from jaxdp.accounting import core

    def bug(*a, **k):
        raise TypeError("a bug in jaxdp")
    monkeypatch.setattr(core, "compute_epsilon", bug)
    with pytest.raises(TypeError, match="a bug in jaxdp"):
        main(["epsilon", *SMALL, "-s", "1"])


def _options(parser, path=()):
    """(command path, option string, argparse action) for every option of every (sub)command."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, path + (name,))
        for opt in action.option_strings:
            yield " ".join(path), opt, action


def test_json_flag_and_choices_are_defined_once():
    from jaxdp.accounting import core
    opts = list(_options(build_parser()))
    json_flags = [a for _, o, a in opts if o == "--json"]
    assert all("one JSON object on stdout (an error object on failure)" in a.help for a in json_flags)
    with_json = {c for c, o, _ in opts if o == "--json"}
    assert {"epsilon", "calibrate", "train", "compare", "sweep", "audit", "report", "ledger show",
            "ledger reserve", "ledger verify", "ledger export"} <= with_json
    for cmd, opt, action in opts:
        if opt == "--accountant":
            assert set(action.choices) == set(core.ACCOUNTANTS), cmd
        if opt == "--neighboring-relation":
            assert set(action.choices) == set(core.NEIGHBORING_RELATIONS), cmd
        if opt == "--sampling":
            assert set(action.choices) <= set(core.SAMPLINGS), cmd


# ------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_text_bytes_mode_and_no_temporary(tmp_path):
    p = tmp_path / "sub" / "f.json"
    _io.atomic_write(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    os.chmod(p, 0o640)
    _io.atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and (os.stat(p).st_mode & 0o777) == 0o640  # the file's mode is kept
    _io.atomic_write(tmp_path / "secret", b"k", mode=0o600)
    assert os.stat(tmp_path / "secret").st_mode & 0o777 == 0o600
    assert sorted(os.listdir(p.parent)) == ["f.json"]
    with pytest.raises(TypeError, match="str or bytes"):
        _io.atomic_write(p, {"not": "data"})


def test_atomic_write_flushes_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None)
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    _io.atomic_write(tmp_path / "f", "x")
    assert len(synced) == 2 and synced[-1] in (True, None)  # the data, then the directory entry


def _crash_on_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_write_leaves_the_old_export_and_head_file(tmp_path, capsys, monkeypatch):
    """`ledger export -o` and `ledger verify --head-file` wrote in place (export) or without fsync (head file):
    a crash or a full disk could leave a truncated export or an unflushed head. Now the old file stays whole."""
    led = str(tmp_path / "l.db")
    assert main(["ledger", "init", "--ledger", led, "--dataset-id", "d", "--max-epsilon", "5", "--delta", "1e-5"]) == 0
    export, head = tmp_path / "export.json", tmp_path / "head.json"
    assert main(["ledger", "export", "--ledger", led, "-o", str(export)]) == 0
    assert main(["ledger", "verify", "--ledger", led, "--head-file", str(head)]) == 0
    before = export.read_text(), head.read_text()
    assert main(["ledger", "register", "--ledger", led, "--dataset-id", "e", "--max-epsilon", "5",
                 "--delta", "1e-5"]) == 0  # the ledger changes: a new export and a new head differ
    capsys.readouterr()
    _crash_on_fsync(monkeypatch)
    assert main(["ledger", "export", "--ledger", led, "-o", str(export)]) == 2
    assert main(["ledger", "verify", "--ledger", led, "--head-file", str(head)]) == 2
    monkeypatch.undo()
    assert (export.read_text(), head.read_text()) == before
    assert sorted(os.listdir(tmp_path)) == ["export.json", "head.json", "l.db"]
    assert "No space left on device" in capsys.readouterr().err


def test_a_head_file_that_is_not_json_is_named(tmp_path, capsys):
    led = str(tmp_path / "l.db")
    assert main(["ledger", "init", "--ledger", led]) == 0
    (tmp_path / "head.json").write_text("garbage")
    rc, _, err = run(capsys, "ledger", "verify", "--ledger", led, "--head-file", str(tmp_path / "head.json"))
    assert rc == 2 and "head.json is not the JSON head file" in err


# ------------------------------------------------------------------------------------- names
def _private(engine, **clip):
    return engine.make_private(loss_fn=lambda p, b: jnp.sum((b["x"] @ p["w"]) ** 2, axis=-1),
                               params={"w": jnp.zeros((3, 1))}, optimizer=optax.sgd(0.1), dataset_size=100,
                               batch_size=10, noise_multiplier=1.0, seed=0, **clip)


def test_l2_clip_norm_and_the_deprecated_max_grad_norm():
    import jaxdp
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        new = _private(engine, l2_clip_norm=0.5)
    assert new.l2_clip_norm == 0.5
    with pytest.warns(DeprecationWarning, match="max_grad_norm= is deprecated; use l2_clip_norm="):
        old = _private(jaxdp.PrivacyEngine(accountant="rdp"), max_grad_norm=0.5)
    assert old.l2_clip_norm == 0.5
    with pytest.warns(DeprecationWarning, match=r"\.l2_clip_norm"):
        assert old.max_grad_norm == 0.5
    with pytest.raises(TypeError, match="l2_clip_norm= only"):
        _private(engine, l2_clip_norm=0.5, max_grad_norm=0.5)
    with pytest.raises(TypeError, match="needs l2_clip_norm="):
        _private(engine)
    from jaxdp.clip_groups import clip_norm_tree
    params = {"a": jnp.zeros(3), "b": jnp.zeros(1)}
    with pytest.warns(DeprecationWarning, match="use l2_clip_norm="):
        assert clip_norm_tree(params, "equal", max_grad_norm=2.0) == clip_norm_tree(params, "equal", 2.0)


def test_secure_and_the_deprecated_secure_mode():
    import jaxdp
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jaxdp.PrivacyEngine(secure=True).secure is True
    with pytest.warns(DeprecationWarning, match="secure_mode= is deprecated; use secure="):
        engine = jaxdp.PrivacyEngine(secure_mode=True)
    assert engine.secure is True
    with pytest.warns(DeprecationWarning, match=r"\.secure"):
        assert engine.secure_mode is True
    p = engine.make_private(loss_fn=lambda p, b: jnp.sum(b["x"] @ p["w"], axis=-1), params={"w": jnp.zeros((3,))},
                            optimizer=optax.sgd(0.1), dataset_size=100, batch_size=10, noise_multiplier=1.0,
                            l2_clip_norm=1.0)  # no seed needed: batches and noise from the OS entropy source
    assert p.sampler.secure is True


def test_accountant_method_and_the_deprecated_accountant_attribute():
    from jaxdp.accounting import Accountant
    acc = Accountant("rdp")
    assert acc.method == "rdp" and acc.to_dict()["accountant"] == "rdp"  # the wire format keeps its key
    with pytest.warns(DeprecationWarning, match="Accountant.method"):
        assert acc.accountant == "rdp"
    assert Accountant.from_dict(acc.to_dict()).method == "rdp"


def test_jaxdp_deprecations_are_errors_in_the_test_suite():
    """pyproject.toml's filterwarnings: a deprecated jaxdp API used outside pytest.warns fails the test (jaxdp's
    own JaxdpDeprecationWarning, a DeprecationWarning); other libraries' deprecations do not."""
    import jaxdp
    from jaxdp._checks import JaxdpDeprecationWarning
    assert issubclass(JaxdpDeprecationWarning, DeprecationWarning)
    with pytest.raises(JaxdpDeprecationWarning, match="secure_mode= is deprecated"):
        jaxdp.PrivacyEngine(secure_mode=True)
    warnings.warn("a third-party deprecation", DeprecationWarning, stacklevel=1)   # ignored, as before


def test_restoring_an_accountant_uses_no_deprecated_jaxdp_api():
    """The engine's state-dict restore compared accountants through the deprecated ``Accountant.accountant``."""
    import jaxdp
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    private = engine.make_private(loss_fn=lambda p, b: jnp.sum(b["x"] @ p["w"], axis=-1),
                                  params={"w": jnp.zeros((3,))}, optimizer=optax.sgd(0.1), dataset_size=100,
                                  batch_size=10, noise_multiplier=1.0, l2_clip_norm=1.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert private._load_accountant(engine.accountant.to_dict(), 0) == []


def test_local_device_count_is_this_process_and_device_count_the_job(monkeypatch):
    from jaxdp import distributed
    monkeypatch.setattr(jax, "local_device_count", lambda *a, **k: 2)  # process 0 of 2, 2 devices each
    monkeypatch.setattr(jax, "device_count", lambda *a, **k: 4)
    assert distributed.local_device_count() == 2
    assert distributed.device_count() == 4
