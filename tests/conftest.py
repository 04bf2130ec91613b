"""Test session set-up: CPU, JAX's persistent compilation cache, and the ``parity`` marker.

Everything here is set in the environment, before JAX is imported, so the subprocesses the tests start
(``jaxdp launch``, the multi-device checks, CLI runs) inherit it too.
"""
import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests run on CPU with one device unless a test starts its own subprocess (multi-device tests do).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA compilation dominates the suite's time, and most tests build a fresh jitted closure for a program
# that another test (or an earlier run) already compiled. JAX's persistent compilation cache, keyed on the
# program, the compile options, XLA_FLAGS and the jax/jaxlib versions, turns those into cache reads -- within
# one run and across runs. The two thresholds are lowered so that small programs are cached too (by default
# only compiles of >= 1 s are). The cache lives in the repository's git-ignored `.cache/jax` (delete it at
# will); JAXDP_TEST_COMPILATION_CACHE=0 switches it off, and a JAX_COMPILATION_CACHE_DIR already set wins.
if os.environ.get("JAXDP_TEST_COMPILATION_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Non-test helper scripts in tests/: never collected (pytest's --doctest-modules would import them, and
# multi_process_train.py runs on import).
collect_ignore = ["multi_process_train.py", "multi_process_checks.py", "multi_device_checks.py", "ledger_pg.py",
                  "tiny.py", "parity/parity_harness.py"]

PARITY_DIR = ROOT / "tests" / "parity"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/parity/ compares against an independent implementation (Opacus, PyTorch,
    Hugging Face): it carries the ``parity`` marker, so ``make test-parity`` can run them as their own step.
    They stay in the default run."""
    for item in items:
        if PARITY_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.parity)


# --- the tiny trainer runs shared by the trainer, report and audit tests (one training each per session) ---

@pytest.fixture(scope="session")
def tiny_private_run(tmp_path_factory):
    """The private tiny run (target epsilon 2; see tests/tiny.py). Read it, never write to its directory."""
    from tiny import train_tiny
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*examples were clipped")
        return train_tiny(tmp_path_factory.mktemp("tiny_private") / "run")


@pytest.fixture(scope="session")
def tiny_nonprivate_run(tmp_path_factory):
    """The same recipe without DP (training.dp.enabled: false). Read it, never write to its directory."""
    from tiny import train_tiny
    return train_tiny(tmp_path_factory.mktemp("tiny_nonprivate") / "run", enabled=False)
