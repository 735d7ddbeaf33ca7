# The lab's entry points. `make reproduce` and `make test` are all a newcomer types:
# both create the virtual environment first when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pyproject.toml keeps a range for torch; the install step pins the exact version the lab is
# checked with. On a Mac the PyPI wheel is the right one (MPS included). On Linux PyPI's default
# torch is the multi-GB CUDA build: the lab's build box finds a local CPU wheel through
# PIP_FIND_LINKS; elsewhere add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for it.
TORCH_PIN ?= torch==2.13.0
# The interpreter setup will use: the venv's once it exists, else $(PYTHON).
SETUP_PYTHON = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
STAMP := $(VENV)/.installed
JOBS ?= 1

.PHONY: system-deps setup reproduce quick html publish test lint lab clean model-quick swift-test help

help:
	@echo "make setup       check this Python and machine, create .venv, install labkit and its dev tools"
	@echo "make reproduce   run every notebook with full parameters (figures/, data/results/)"
	@echo "make quick       run every notebook with quick parameters"
	@echo "make html        the static site of the executed notebooks (build/site)"
	@echo "make publish     the same site into docs/ (a clean, complete, full run only), to commit"
	@echo "make test        unit tests, notebook smoke runs, Swift parity tests"
	@echo "make lint        ruff"
	@echo "make lab         JupyterLab on notebooks/ (root too); prints the URL to open"
	@echo "make model-quick train a small decoder on this CPU in minutes (not the shipped one)"
	@echo "make clean       remove build/ and caches (keeps .venv, figures/, data/)"

setup: $(STAMP)

# The pre-flight (standard library only, so Apple's Python 3.9 can run it) stops here, with the
# fix, where setup cannot work: a Python outside 3.10-3.12, an x86_64 Python on Apple silicon,
# macOS before 14. `labkit doctor` gives the same advice and more once the venv exists.
$(STAMP): pyproject.toml requirements-nodeps.txt
	@$(SETUP_PYTHON) labkit/core/preflight.py
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The Swift port multiplies matrices through BLAS: Accelerate on macOS, OpenBLAS on Linux.
# Installed when we can (root with apt-get); otherwise the Swift tests say what is missing.
system-deps:
	@if [ "$$(uname)" = Linux ] && ! [ -e /usr/include/x86_64-linux-gnu/cblas.h ] && ! [ -e /usr/include/aarch64-linux-gnu/cblas.h ] && ! [ -e /usr/include/cblas.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas-dev (BLAS for the Swift port)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev >/dev/null) \
	      || echo "warning: libopenblas-dev could not be installed; the Swift port will not build"; \
	  else echo "note: install libopenblas-dev (sudo apt-get install libopenblas-dev) for the Swift port"; fi; \
	fi

# Every notebook, then the site; a failed notebook still fails the target after the site is built.
reproduce: $(STAMP)
	$(PY) -m labkit reproduce --jobs $(JOBS); rc=$$?; $(PY) -m labkit site; exit $$rc

quick: $(STAMP)
	$(PY) -m labkit reproduce --quick --jobs $(JOBS); rc=$$?; $(PY) -m labkit site; exit $$rc

# The static site of the executed notebooks in build/notebooks (build/site/index.html, the
# refresh sheet build/site/refresh.html).
html: $(STAMP)
	$(PY) -m labkit site

# The same site into docs/, what GitHub Pages serves; refused unless the last run was a full,
# complete, successful run of the committed notebooks. Commit docs/ with the results it shows.
publish: $(STAMP)
	$(PY) -m labkit site --publish

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

# JupyterLab on notebooks/ with the labkit kernel, as root too (containers): it prints the URL.
# LAB_IP=0.0.0.0 to reach it from outside a container; LAB_PORT to choose the port.
LAB_IP ?= 127.0.0.1
LAB_PORT ?=
lab: $(STAMP)
	@$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q -e ".[lab]"
	$(PY) -m labkit lab --ip $(LAB_IP) $(if $(LAB_PORT),--port $(LAB_PORT))

# The Swift port's own tests against reference dumps written by labkit (make test runs them too).
swift-test: $(STAMP)
	$(PY) -c "from labkit.ports import swift; swift.prepare_fixtures('build/lmport-fixtures')"
	cd swift && LMPORT_FIXTURES="$(CURDIR)/build/lmport-fixtures" swift test -c release

model-quick: $(STAMP)
	$(PY) -m labkit train --config quick --out build/models/tiny-llama-quick

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
