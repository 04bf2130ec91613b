# One-command set-up: `make demo` and `make test` each create .venv, install jaxdp into it and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_cpu_multi_thread_eigen=true
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-deps test-slow test-parity lint bench bench-gpu venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/jaxdp compare --config jaxdp/configs/digits_dp.yaml --out runs/demo

# The suite runs on every core (pytest-xdist; at most 4 workers, each a JAX process), one test file per worker at a
# time so a file's tests share their compiled functions; TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= auto
test: $(VENV)/.installed test-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

# System packages the tests use: promtool (Debian's `prometheus`) for the alert-rule tests, and PostgreSQL server
# binaries (Debian's `postgresql`) for the ledger's PostgreSQL tests (the tests start a throwaway server
# themselves; skip those with JAXDP_SKIP_POSTGRES=1). See docs/telemetry.md and docs/ledger.md.
test-deps:
	@command -v promtool >/dev/null 2>&1 || \
	  { S=$$([ "$$(id -u)" = 0 ] || echo sudo -n); echo "test-deps: installing prometheus (promtool) with apt-get"; \
	    ( $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq --no-install-recommends prometheus >/dev/null ) || \
	    echo "test-deps: could not install prometheus (promtool) with apt-get; install it yourself (the alert-rule tests will fail otherwise)"; }
	@[ "$$JAXDP_SKIP_POSTGRES" = 1 ] || command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  { S=$$([ "$$(id -u)" = 0 ] || echo sudo -n); echo "test-deps: installing postgresql (apt-get)"; \
	    ( $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq postgresql >/dev/null ) || \
	    echo "test-deps: could not install postgresql with apt-get (needs root or sudo, network and a Debian/Ubuntu system); install it yourself or set JAXDP_SKIP_POSTGRES=1 (the PostgreSQL ledger tests will fail otherwise)"; }

test-slow: $(VENV)/.installed test-deps
	$(PY) -m pytest -q -m slow

# The comparisons with independent implementations (Opacus, PyTorch, Hugging Face) alone; `make test` runs them too.
test-parity: $(VENV)/.installed
	$(PY) -m pytest -q -m 'parity and not slow'

# ruff (style and likely bugs) and mypy (types), both configured and pinned in pyproject.toml.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/step_speed.py
	$(PY) benchmarks/accounting_speed.py
	$(PY) benchmarks/multi_device.py
	$(PY) benchmarks/audit_shadow_speed.py
	$(PY) benchmarks/parity_report.py

# GPT-2 124M (real config, random init) on a GPU: fails unless JAX sees one; each JSON records the device.
bench-gpu: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	JAX_PLATFORMS=cuda $(PY) benchmarks/scale.py --require-gpu --preset gpt2 --batch 8 --seq-len 128 --steps 5 --fit-batch2 4 \
	  --json benchmarks/results/scale_gpu_gpt2_b8.json
	JAX_PLATFORMS=cuda $(PY) benchmarks/scale.py --require-gpu --preset gpt2 --batch 32 --seq-len 128 --steps 5 --fit-batch2 4 \
	  --json benchmarks/results/scale_gpu_gpt2_b32.json

clean:
	rm -rf $(VENV) .pytest_cache runs .cache
