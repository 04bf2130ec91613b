# One-command set-up: `make demo` and `make test` each create .venv, install jaxdp into it and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_cpu_multi_thread_eigen=true
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-deps test-slow bench venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/jaxdp compare --config jaxdp/configs/digits_dp.yaml --out runs/demo

test: $(VENV)/.installed test-deps
	$(PY) -m pytest -q

# PostgreSQL server binaries for the ledger's PostgreSQL tests (Debian's `postgresql` package; the tests start a
# throwaway server themselves). Skip with JAXDP_SKIP_POSTGRES=1. See docs/ledger.md.
test-deps:
	@[ "$$JAXDP_SKIP_POSTGRES" = 1 ] || command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  { S=$$([ "$$(id -u)" = 0 ] || echo sudo -n); echo "test-deps: installing postgresql (apt-get)"; \
	    ( $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq postgresql >/dev/null ) || \
	    echo "test-deps: could not install postgresql with apt-get (needs root or sudo, network and a Debian/Ubuntu system); install it yourself or set JAXDP_SKIP_POSTGRES=1 (the PostgreSQL ledger tests will fail otherwise)"; }

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) .pytest_cache runs
