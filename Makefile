# One-command entry points. Every target installs into .venv first when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.yaml

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test lint fast-test demo bench strip-notebooks clean-demo

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
	$(PY) tools/strip_notebook.py --check notebooks/*.ipynb

test: lint
	$(PY) -m pytest

# What the pre-commit hook runs: the quick tests only.
fast-test: install
	$(PY) -m pytest -q -x --ignore=tests/test_train.py --ignore=tests/test_notebook.py

# The whole pipeline on the built-in synthetic data set (see src/demo.py).
demo: install
	$(PY) src/demo.py

bench: install
	$(PY) benchmarks/bench_rle.py
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_oof_tune.py
	$(PY) benchmarks/bench_predict.py
	$(PY) benchmarks/bench_train.py

strip-notebooks: install
	$(PY) tools/strip_notebook.py notebooks/*.ipynb

# Removes only what `make demo` made.
clean-demo:
	rm -rf data/synthetic cache/synthetic_* cache/synthetic-png_* runs/demo folds/demo_folds.csv submissions/demo.csv
