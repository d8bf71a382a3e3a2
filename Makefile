# dstream-fleet: the same checks everywhere (.ci/run calls `make lint` and `make test`).
#   make setup   venv + editable install (only when pyproject.toml changed), Redis, Java,
#                Maven, the Kafka jars (cached in ~/.cache/dstream-fleet) and helm
#   make lint    ruff check, ruff format --check, mypy (strict)
#   make test    the whole pytest suite (starts its own Kafka and Redis on free ports)
#   make demo    dev services up, then the demo pipeline
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

.PHONY: setup venv system-deps kafka-libs helm lint test deploy-deps deploy-test demo bench up down clean

setup: venv system-deps kafka-libs helm

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# reinstall only when pyproject.toml is newer than the last install
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# Debian packages: installed only when missing, and only as root (else a clear error);
# chromium (headless) is for the status-page test in tests/e2e; iproute2 and iptables for
# the network-partition tests in tests/fault/test_partitions.py (namespaces, DROP rules)
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing="$$missing iproute2"; \
	command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || missing="$$missing iptables"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "missing:$$missing; install them: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

kafka-libs: venv system-deps
	@$(VENV)/bin/dstream dev ensure

helm:
	@if [ -f ops/tools/devkit/install_helm.sh ]; then bash ops/tools/devkit/install_helm.sh; fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy engine state ops ingest

test: setup
	$(VENV)/bin/pytest -q

# The deployment test's Debian packages (installed only when missing, as system-deps does):
# podman with runc (crun refuses this machine's cgroup layout), debootstrap for the base
# image, netavark (+ aardvark-dns, podman's default DNS) and iptables for its bridge.
deploy-deps:
	@missing=""; \
	command -v podman >/dev/null || missing="$$missing podman"; \
	command -v runc >/dev/null || missing="$$missing runc"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v nsenter >/dev/null || missing="$$missing util-linux"; \
	[ -x /usr/lib/podman/netavark ] || missing="$$missing netavark"; \
	[ -x /usr/lib/podman/aardvark-dns ] || missing="$$missing aardvark-dns"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "missing:$$missing; install them: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Builds the image (base from Debian packages, cached in ~/.cache/dstream-fleet), renders the
# chart, runs its pods with podman and checks exact output through each scenario.
deploy-test: setup deploy-deps
	$(VENV)/bin/pytest -q tests/deploy

up: setup
	$(VENV)/bin/dstream dev up

down:
	@if [ -x $(VENV)/bin/dstream ]; then $(VENV)/bin/dstream dev down; fi

demo: up
	$(PY) -m ops.tools.demo

bench: up
	$(PY) -m bench.run_all

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist test-output *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
