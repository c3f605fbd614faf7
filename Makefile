# Two commands for a fresh machine:  make demo   (the main job on the embedded demo)
#                                     make test   (lint, then the test suite)
# Everything else here is what those two need: a virtual environment with the project's
# dependencies from the package registry, and headless Chromium for the report tests.
# `make lint` alone (ruff check, ruff format --check, mypy; configured in pyproject.toml) is for local use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install-stamp
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint install doctor browser clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,onnx]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the real-browser report tests (no browser download at run time).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; browser tests will skip"; }

doctor: $(STAMP)
	$(PY) -m pipeline doctor

demo: $(STAMP)
	$(PY) infer.py

LINT_PATHS := pipeline models tests infer.py train.py benchmarks tools

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

test: $(STAMP) browser lint
	$(PY) -m pytest -q

clean-demo:
	rm -rf demo_output demo_slides
