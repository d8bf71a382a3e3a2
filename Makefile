# dstream-fleet: the same checks everywhere (.ci/run calls `make lint`, `make test` and
# `make deploy-test`).
#   make setup   what the demo needs: venv + editable install (only when pyproject.toml
#                changed), Redis, Java, Maven and the Kafka jars (cached in ~/.cache/dstream-fleet)
#   make test-setup   setup, plus the test and bench extras, chromium, prometheus, iproute2,
#                iptables and helm (what the suite needs)
#   make lint    ruff check, ruff format --check, mypy (strict)
#   make test    the whole pytest suite (starts its own Kafka and Redis on free ports)
#   make demo    dev services up, then the demo pipeline (installs only what it needs)
#   make bench   dev services up, then every benchmark
#   make up / make down   start / stop the local dev Kafka and Redis
#   make deploy-test   the chart's pods as podman containers from the real image (tests/deploy;
#                podman, runc, debootstrap, netavark, aardvark-dns, iptables via apt if missing)
#   make clean   caches and build artifacts (keeps .venv and the jar cache)

SHELL := /bin/bash
VENV := .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
APT := bash ops/tools/devkit/apt_missing.sh

.PHONY: setup test-setup venv test-venv service-deps test-deps kafka-libs helm lint test \
	deploy-deps deploy-test demo bench up down clean

setup: venv service-deps kafka-libs

test-setup: setup test-venv test-deps helm

venv: $(STAMP)

test-venv: $(TEST_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# reinstall only when pyproject.toml is newer than the last install; the runtime alone for
# the demo, with the test and bench extras for the suite
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@ $(STAMP)

# Debian packages, installed only when missing and only as root (else a clear error):
# the dev services' (Redis; Java and Maven for Kafka) ...
service-deps:
	@$(APT) redis-server:redis-server java:openjdk-17-jre-headless mvn:maven

# ... and the suite's: chromium (headless) for the status-page test in tests/e2e,
# prometheus (with promtool) for the alert rules and the dashboard check, iproute2 and
# iptables for the network-partition tests (namespaces, DROP rules)
test-deps:
	@$(APT) chromium:chromium prometheus:prometheus ip:iproute2 iptables:iptables

kafka-libs: venv service-deps
	@$(VENV)/bin/dstream dev ensure

helm:
	@if [ -f ops/tools/devkit/install_helm.sh ]; then bash ops/tools/devkit/install_helm.sh; fi

lint: test-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy engine state ops ingest

test: test-setup
	$(VENV)/bin/pytest -q

# The deployment test's Debian packages (installed only when missing, as above):
# podman with runc (crun refuses this machine's cgroup layout), debootstrap for the base
# image, netavark (+ aardvark-dns, podman's default DNS) and iptables for its bridge.
deploy-deps:
	@$(APT) podman:podman runc:runc debootstrap:debootstrap iptables:iptables \
		nsenter:util-linux /usr/lib/podman/netavark:netavark \
		/usr/lib/podman/aardvark-dns:aardvark-dns

# Builds the image (base from Debian packages, cached in ~/.cache/dstream-fleet), renders the
# chart, runs its pods with podman and checks exact output through each scenario.
deploy-test: test-setup deploy-deps
	$(VENV)/bin/pytest -q tests/deploy

up: setup
	$(VENV)/bin/dstream dev up

down:
	@if [ -x $(VENV)/bin/dstream ]; then $(VENV)/bin/dstream dev down; fi

demo: up
	$(PY) -m ops.tools.demo

bench: up test-venv
	$(PY) -m bench.run_all

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist test-output *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
