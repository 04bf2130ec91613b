"""The quickstart example runs (1 epoch per framework) and learns something."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def _load():
    spec = importlib.util.spec_from_file_location("jaxdp_quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # Linen modules are dataclasses: their module must be registered
    spec.loader.exec_module(module)
    return module


def test_quickstart_one_epoch(capsys):
    quickstart = _load()
    results = quickstart.main(["--epochs", "1"])
    out = capsys.readouterr().out
    assert "[nnx] epoch  1" in out and "[linen] epoch  1" in out
    for name in ("nnx", "linen"):
        h = results[name]
        assert h["steps"] == 23                      # ceil(1437 / 64) Poisson steps in one epoch
        assert math.isfinite(h["loss"][0]) and h["loss"][0] < math.log(10)   # below the uniform-guess loss
        assert h["accuracy"][0] > 0.3                # chance is 0.1; one epoch reaches ~0.5-0.7
        assert h["epsilon"] is None or h["epsilon"] > 0
