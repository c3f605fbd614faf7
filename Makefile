# Two commands for a fresh machine:  make demo   (the main job on the embedded demo)
#                                     make test   (lint, then the test suite)
# Everything else here is what those two need: a virtual environment with the project's
# dependencies from the package registry, and headless Chromium for the report tests.
# `make lint` alone (ruff check, ruff format --check, mypy; configured in pyproject.toml) is for local use.
# The environment is installed from requirements.lock (exact versions, sha256 hashes; Linux x86_64,
# CPython 3.11); `make lock` re-resolves it from pyproject.toml's ranges (python tools/lock.py).
# The review viewer's OpenSeadragon is vendored from the npm registry (pipeline/review/static/vendor):
# `make vendor-viewer OSD_VERSION=x.y.z` replaces it (tools/update_openseadragon.py; needs npm).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install-stamp
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint install lock doctor browser clean-demo vendor-viewer

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve requirements.lock from pyproject.toml (newest releases within its ranges), then install it.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/lock.py
	$(MAKE) install

# Download OpenSeadragon OSD_VERSION from the npm registry (integrity checked) into the review app.
OSD_VERSION ?= 6.1.1
vendor-viewer:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/update_openseadragon.py $(OSD_VERSION)

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
