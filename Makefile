# Two commands matter: `make demo` and `make test`. Both create (or refresh, when a pyproject.toml changed) the
# virtualenv in .venv/ first, so a fresh machine with Python 3.11 needs nothing else.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The packages go in with uv (bootstrapped by pip into the virtualenv): it resolves the same versions as pip, but
# links them from its cache (~/.cache/uv) instead of unpacking torch's 5.8 GB each time: 3 s warm, 24 s cold,
# against pip's 110 s on 2 cores.
UV_REQUIREMENT := uv>=0.13.10
UV := $(BIN)/uv
# Caches that outlive a checkout, beside the control plane's: mypy's (it checks each file's hash against its
# entry, so a fresh clone re-checks only what changed: 2 s instead of 60).
CACHE_ROOT ?= $(or $(KLEINSTYLE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kleinstyle)
export MYPY_CACHE_DIR ?= $(CACHE_ROOT)/mypy
# What the operator image installs, alone, in a virtualenv of its own (operator-image-check).
OPERATOR_VENV := .venv-operator

.PHONY: venv demo dev-cluster test test-unit test-emulator e2e typecheck lint lint-imports operator-image-check crds crds-check clean

$(STAMP): pyproject.toml devcluster/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(UV_REQUIREMENT)'
	$(UV) pip install --quiet --python $(BIN)/python -e '.[operator,runtime,dev]' -e ./devcluster
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kleinstyle demo

dev-cluster: $(STAMP)
	$(BIN)/kleinstyle dev-cluster --apply examples

# pytest workers for `make test` (pytest-xdist; a module's tests stay on one worker, so each worker starts the
# session's clusters it needs once). Two halves the 2-core CI's wall time (525 s -> 332 s): the cluster tier mostly
# waits on its control planes while the unit tier computes.
TEST_WORKERS ?= 2

# Every tier: the cluster tier needs the real control plane, built here once per machine when Go is on PATH (about
# nine minutes cold on 2 cores, "up to date" after); without Go it is skipped, and both this line and pytest say so.
test: $(STAMP) operator-image-check
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/kleinstyle crds --check crds
	$(BIN)/mypy
	@if command -v go > /dev/null; then $(MAKE) --no-print-directory controlplane; \
	else echo "make test: no go on PATH: the cluster tier (a real control plane) is SKIPPED"; fi
	@if command -v podman > /dev/null && command -v buildah > /dev/null; then $(MAKE) --no-print-directory images; \
	else echo "make test: no podman and buildah: the images are not built and their test is SKIPPED"; fi
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

# One tier of the tests each (tests/conftest.py gives every test one; `make test` runs them all): unit, the
# embedded cluster, and a real control plane on loopback (`make e2e` builds it first, once per machine; elsewhere
# the cluster tier skips and says why).
test-unit: $(STAMP)
	$(BIN)/python -m pytest -m unit

test-emulator: $(STAMP)
	$(BIN)/python -m pytest -m emulator

# Ends with one line: the Kubernetes version, the examples Succeeded, and the identity the operator ran as
# (tests/cluster/test_examples.py writes it where KLEINSTYLE_E2E_SUMMARY says).
e2e: $(STAMP) controlplane
	@if command -v podman > /dev/null && command -v buildah > /dev/null; then $(MAKE) --no-print-directory images; \
	else echo "make e2e: no podman and buildah: the images are not built and their test is SKIPPED"; fi
	@rm -f .kleinstyle-e2e-summary
	@KLEINSTYLE_E2E_SUMMARY=.kleinstyle-e2e-summary $(BIN)/python -m pytest -m cluster; rc=$$?; \
	cat .kleinstyle-e2e-summary 2>/dev/null || echo "e2e: no summary (the examples test did not finish)"; exit $$rc

# mypy --strict over contract, operator, runtime and cli: the files and settings are [tool.mypy] in pyproject.toml.
typecheck: $(STAMP)
	$(BIN)/mypy

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check contract operator runtime cli devcluster
	$(BIN)/lint-imports

lint-imports: $(STAMP)
	$(BIN)/lint-imports

# The operator image's own steps (images/operator.Containerfile), without podman: `.[operator]` installed (not
# editable) in a fresh virtualenv, its entry point imported and its command started, and none of the runtime's
# packages there. uv resolves as the image's pip does, from the same metadata, in seconds.
operator-image-check: $(STAMP)
	rm -rf $(OPERATOR_VENV) build
	$(UV) venv --quiet --python $(PYTHON) $(OPERATOR_VENV)
	$(UV) pip install --quiet --python $(OPERATOR_VENV)/bin/python '.[operator]'
	cd / && $(CURDIR)/$(OPERATOR_VENV)/bin/python -c "import kleinstyle.operator.main"
	cd / && $(CURDIR)/$(OPERATOR_VENV)/bin/kleinstyle operator --help > /dev/null
	cd / && $(CURDIR)/$(OPERATOR_VENV)/bin/kleinstyle crds > /dev/null
	cd / && ! $(CURDIR)/$(OPERATOR_VENV)/bin/python -c "import PIL" 2>/dev/null
	cd / && ! $(CURDIR)/$(OPERATOR_VENV)/bin/python -c "import torch" 2>/dev/null
	rm -rf $(OPERATOR_VENV) build

crds: $(STAMP)
	$(BIN)/kleinstyle crds --write crds

crds-check: $(STAMP)
	$(BIN)/kleinstyle crds --check crds

clean:
	rm -rf $(VENV) $(OPERATOR_VENV) .kleinstyle-dev .pytest_cache .ruff_cache

# The fault-injection run on the real control plane at its default size (200 resources; about 18 minutes on 2 cores):
# bench/chaos.py, README "Chaos". The small size runs in `make test` (tests/cluster/test_chaos.py).
.PHONY: chaos
chaos: $(STAMP) controlplane
	$(BIN)/python bench/chaos.py --json

# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm) and
# Kueue, built once per machine from pinned Go modules into ~/.cache/kleinstyle (docs/real-cluster.md), and Debian's
# Prometheus and promtool unpacked beside them; tests/cluster uses them.
.PHONY: controlplane
controlplane:
	hack/controlplane/build.sh
	hack/kueue/build.sh
	hack/prometheus/fetch.sh

# The operator and runtime images, built with buildah from a Debian base made here with debootstrap, pulling from no
# registry (hack/images/build.sh, images/README.md): about 3.5 minutes cold on 2 cores, seconds after a change to the
# code (the dependencies are an image of their own), "up to date" when nothing changed. Tagged
# $(REGISTRY)/operator:VERSION and $(REGISTRY)/runtime:VERSION, the chart's defaults with the default REGISTRY;
# `make images push REGISTRY=registry.example.com/team` builds and pushes both (podman login first).
REGISTRY ?= ghcr.io/kleinstyle
.PHONY: images push
images: $(STAMP)
	REGISTRY=$(REGISTRY) hack/images/build.sh build

push:
	REGISTRY=$(REGISTRY) hack/images/build.sh push
