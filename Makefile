# `make demo` and `make test` each create .venv if needed, install sidestep into it and run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 installs from local disk on our dev/CI machines; GPU users: see README.
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/sidestep demo demo-run

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) bench/analysis.py
	$(PY) bench/train.py
	$(PY) bench/scale.py
	$(PY) bench/quality.py --quick
	$(PY) bench/planted.py --quick
	$(PY) bench/sampling.py --quick

clean:
	rm -rf $(VENV) demo-run .pytest_cache
