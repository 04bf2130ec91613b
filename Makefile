# One-command set-up: `make demo` and `make test` each create .venv, install jaxdp into it and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_cpu_multi_thread_eigen=true
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow bench venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/jaxdp compare --config jaxdp/configs/digits_dp.yaml --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) .pytest_cache runs
