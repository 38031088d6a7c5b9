# One-command entry points. `make demo` and `make test` install into .venv first when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test lint fast-test demo bench clean-demo

install: $(STAMP)

# Re-installs only when the dependency list changes.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/bandit -q -c pyproject.toml -r src

test: lint
	$(PY) -m pytest

# What the pre-commit hook runs: the quick tests only.
fast-test: install
	$(PY) -m pytest -q -x -m "not slow and not e2e"

demo: install
	$(PY) src/demo.py

bench: install
	$(PY) benchmarks/bench_rle.py
