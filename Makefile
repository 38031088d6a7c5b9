# One-command entry points. Every target installs into .venv first when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.yaml

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install lock test lint fast-test demo serve serve-venv serve-lock bench strip-notebooks check-notebooks clean-demo

install: $(STAMP)

# Re-installs only when the dependency list changes.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

# Regenerates the lock constraints.txt: a fresh venv in a temporary folder (nothing from .venv or
# earlier installs leaks in), `pip install -e '.[dev]'` with only the loose ranges of
# pyproject.toml, `pip check`, then `pip freeze` (every package, setuptools included: torch needs
# it at run time; not pip itself, not pneumoseg) under the header below, written to a temporary
# file and renamed over constraints.txt only once everything succeeded. Then run `make test`.
define LOCK_HEADER
# constraints.txt: the lock of the tested environment, written by `make lock`.
# Every package that `pip install -e '.[dev]'` installs (the dependencies and the dev extra of
# pyproject.toml and everything they pull in) pinned with ==; pip itself and pneumoseg are left
# out. `make install` installs with `-c constraints.txt`, so every later install gets exactly
# these versions; pyproject.toml keeps the loose ranges.
# Refresh (after changing dependencies in pyproject.toml, or to move to newer releases):
#   make lock && make test      # then commit constraints.txt
# Other platforms: a pin applies only to packages that get installed there, so the nvidia-*,
# cuda-* and triton lines (the CUDA 13 runtime of the default Linux torch wheel) are ignored
# where they are not needed, and packages needed only elsewhere (e.g. colorama on Windows) are
# not pinned.
# GPU users: torch==X also matches the CUDA builds X+cuNNN of the same release (PEP 440 ignores
# the +local part), so install that build of the locked torch and torchvision first (from
# PyTorch's CUDA index, see README), then `pip install -c constraints.txt -e '.[dev]'` keeps it.
# For another torch release, change the torch and torchvision lines to that release pair and
# delete the nvidia-*, cuda-* and triton lines.
endef
export LOCK_HEADER

lock:
	@set -eu; \
	tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/pneumoseg-lock.XXXXXX"); \
	trap 'rm -rf "$$tmp" constraints.txt.tmp' EXIT; \
	echo "make lock: fresh venv in $$tmp/venv"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet -e '.[dev]'; \
	"$$tmp/venv/bin/python" -m pip check; \
	{ \
	  printf '%s\n' "$$LOCK_HEADER"; \
	  "$$tmp/venv/bin/python" -c 'import platform, sysconfig; print(f"# Tested with {platform.python_implementation()} {platform.python_version()} on {sysconfig.get_platform()}.")'; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable --exclude pip --exclude pneumoseg; \
	} > constraints.txt.tmp; \
	mv -f constraints.txt.tmp constraints.txt; \
	echo "make lock: wrote constraints.txt ($$(grep -c '^[^#]' constraints.txt) pins); now run make test"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/bandit -q -c pyproject.toml -r src
	$(VENV)/bin/lint-imports
	$(MAKE) --no-print-directory check-notebooks

test: lint
	$(PY) -m pytest

# What the pre-commit hook runs: the quick tests only.
fast-test: install
	$(PY) -m pytest -q -x --ignore=tests/test_train.py --ignore=tests/test_notebook.py

# The whole pipeline on the built-in synthetic data set (see src/demo.py).
demo: install
	$(PY) src/demo.py

# The web app over the demo experiment (after `make demo`): http://127.0.0.1:8000/
# The experiment is exported first when it has no up-to-date export (src/export.py --update), so
# the app predicts with the fastest runtime that passed its checks on this CPU; when it cannot be
# exported (not trained yet), the app still starts and says what to run.
serve: install
	$(PY) src/export.py --config $(CONFIG) --update \
	  || echo "make serve: no export (see the message above); the app predicts with torch"
	$(PY) src/serve.py --config $(CONFIG)

# The serving install: what serving an exported experiment needs, without the training stack
# (requirements-serve.txt, pinned from the lock), in its own venv .venv-serve. Then e.g.
#   .venv-serve/bin/python src/serve.py --config configs/demo.yaml predict.backend=onnxruntime
SERVE_VENV ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed-stamp

serve-venv: $(SERVE_STAMP)

$(SERVE_STAMP): requirements-serve.txt pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -r requirements-serve.txt
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	@touch $@

# Regenerates requirements-serve.txt: requirements-serve.in resolved against the lock
# (constraints.txt) in a fresh venv, `pip check`, then `pip freeze`; every pin is the lock's.
serve-lock:
	@set -eu; \
	tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/pneumoseg-serve-lock.XXXXXX"); \
	trap 'rm -rf "$$tmp" requirements-serve.txt.tmp' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet -c constraints.txt -r requirements-serve.in; \
	"$$tmp/venv/bin/python" -m pip check; \
	{ \
	  echo "# requirements-serve.txt: the serving install (make serve-venv), written by make serve-lock"; \
	  echo "# from requirements-serve.in and the lock constraints.txt. No torch: it serves exports."; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude pip --exclude setuptools; \
	} > requirements-serve.txt.tmp; \
	mv -f requirements-serve.txt.tmp requirements-serve.txt; \
	echo "make serve-lock: wrote requirements-serve.txt ($$(grep -c '^[^#]' requirements-serve.txt) pins)"

bench: install
	$(PY) benchmarks/bench_rle.py
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_oof_tune.py
	$(PY) benchmarks/bench_predict.py
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_train.py

# Notebooks are committed without outputs (nbstripout): cell ids (stable), tags (the papermill
# `parameters` cell) and the kernelspec stay; outputs, counts and volatile metadata go.
NOTEBOOKS ?= notebooks/*.ipynb
NBSTRIP := $(VENV)/bin/nbstripout --keep-id --extra-keys "metadata.language_info.version \
	metadata.language_info.codemirror_mode metadata.language_info.pygments_lexer \
	metadata.language_info.nbconvert_exporter metadata.language_info.file_extension \
	metadata.language_info.mimetype metadata.papermill cell.metadata.papermill metadata.vscode \
	metadata.colab metadata.toc metadata.varInspector cell.metadata.pycharm"

strip-notebooks: install
	$(NBSTRIP) $(NOTEBOOKS)

# exit 1 (and name the file) when a notebook would be changed by strip-notebooks
check-notebooks: install
	$(NBSTRIP) --verify $(NOTEBOOKS)

# Removes only what `make demo` made from its synthetic data, after checking each item (see
# src/demo.py): anything else there (real data, another run) is refused and nothing is deleted.
clean-demo: install
	$(PY) src/demo.py --clean
