# Two commands matter: `make demo` and `make test`. Both create (or refresh, when pyproject.toml changed) the
# virtualenv in .venv/ first, so a fresh machine with Python 3.11 needs nothing else.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# operator/ (the source of kleinstyle.operator) would shadow the standard library's `operator` module for any
# `python -m ...` run from the repository root, which puts the current directory on sys.path; this stops that.
export PYTHONSAFEPATH := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo dev-cluster test lint crds crds-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[operator,runtime,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kleinstyle demo

dev-cluster: $(STAMP)
	$(BIN)/kleinstyle dev-cluster --apply examples

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/kleinstyle crds --check crds
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check operator runtime

crds: $(STAMP)
	$(BIN)/kleinstyle crds --write crds

crds-check: $(STAMP)
	$(BIN)/kleinstyle crds --check crds

clean:
	rm -rf $(VENV) .kleinstyle-dev .pytest_cache .ruff_cache
