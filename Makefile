# edgecascade — `make` lists the targets. Newcomers need two: `make bench` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
EXTRAS := device,cloud,train,db,jetson,dev
SYSTEM_PACKAGES := mosquitto mosquitto-clients dataset-fashion-mnist postgresql haproxy ejabberd
DEVICE ?= $(shell [ -e /etc/nv_tegra_release ] && echo jetson || echo x86)
DEVICE_PACKAGES := device_agent protocol metering video vibration
PACKAGES := edgecascade device_agent cloud_worker protocol broker metering results_db training bench deploy video cells vibration

.PHONY: help setup test lint bench train train-video train-fault report clean install fleet-sim screenshots check-device-install

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## Install system packages (apt) and the venv with every extra; idempotent

$(STAMP): pyproject.toml
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing system packages:$$missing"; echo "run: sudo apt-get install -y$$missing"; exit 1; fi; fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

lint: setup ## ruff (format + lint), mypy, Python 3.8 check of the device side
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(PACKAGES)
	$(VENV)/bin/vermin --target=3.8- --no-tips --violations --eval-annotations $(DEVICE_PACKAGES)

test: setup lint ## Lint, then the whole test suite against a private Mosquitto and PostgreSQL
	$(VENV)/bin/pytest -q

bench: setup ## End-to-end metered benchmarks: classification, then REACT video (DEVICE=x86|jetson, QUICK=1, BROKER=host:port, CHECK=1: fail on a missed target)
	$(VENV)/bin/edgecascade bench --profile $(DEVICE) $(if $(QUICK),--quick,) $(if $(BROKER),--broker $(BROKER),) $(if $(CHECK),--check,); \
	status=$$?; $(VENV)/bin/edgecascade bench --task video $(if $(QUICK),--quick,) $(if $(CHECK),--check,) --json results/video.json || status=$$?; exit $$status

train: setup ## Retrain the committed Fashion-MNIST models into models/ (CUDA when present)
	$(VENV)/bin/edgecascade train --out models/fashion-mnist

train-video: setup ## Regenerate the synthetic clips and retrain the REACT detectors into models/video-fmnist (~21 min on 2 cores)
	$(VENV)/bin/edgecascade video make --split train --sequences 800 --frames 24 --out build/video/train
	$(VENV)/bin/edgecascade video make --split test --sequences 20 --frames 150 --out build/video/test
	$(VENV)/bin/python -m training.detection train --kind edge --steps 4000 --threads 1 --ckpt build/video/ckpt/edge.pt & \
	$(VENV)/bin/python -m training.detection train --kind cloud --steps 1500 --threads 1 --ckpt build/video/ckpt/cloud.pt; \
	wait
	$(VENV)/bin/python -m training.detection publish --edge build/video/ckpt/edge.pt --cloud build/video/ckpt/cloud.pt \
	    --test build/video/test --out models/video-fmnist

train-fault: setup ## Retrain the vibration fault models (sensor, gateway, cloud) on simulated recordings into models/vibration (~15 min on a shared 2-core box)
	nice -n 10 $(PY) -m training.fault --out build/fault --kinds sensor --epochs 30,10,10 --batch 64,32,32 --train-hop 1024
	nice -n 10 $(PY) -m training.fault --out build/fault --kinds gateway --epochs 30,20,10 --train-hop 1024 & \
	nice -n 10 $(PY) -m training.fault --out build/fault --kinds cloud --epochs 30,10,10 --train-hop 2048; \
	wait
	$(PY) -m training.fault_publish --src build/fault --out models/vibration

report: setup ## Report from results/bench.db into results/report
	$(VENV)/bin/edgecascade report --db results/bench.db --out results/report

# Not part of `make lint`: it asks PyPI (lint needs no network) and takes 5-25 s. CI runs it through the
# suite (tests/test_check_install.py, marker `network`), which fails rather than skips without PyPI.
check-device-install: setup ## Resolve .[device,jetson] for JetPack 5/6 (aarch64, Python 3.8/3.10) and .[device] for x86-64 from PyPI (dry run)
	$(PY) -m deploy.check_install

# Chromium is installed here, not by `make setup`: nothing else needs a browser, and CI stays fast.
screenshots: setup ## Headless-Chromium screenshots of report.html and Datasette into build/screenshots (DB=results/bench.db)
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "missing system package: chromium"; echo "run: sudo apt-get install -y chromium"; exit 1; fi; }
	$(PY) docs/screenshots.py --db $(or $(DB),results/bench.db) --out build/screenshots

fleet-sim: setup ## Fleet simulation (AGENTS=50 WORKERS=2)
	$(VENV)/bin/python -m bench.fleet_sim --agents $(or $(AGENTS),50) --workers $(or $(WORKERS),2)

install: ## Install systemd units, config examples and a venv (DESTDIR, PREFIX)
	DESTDIR=$(DESTDIR) PREFIX=$(or $(PREFIX),/opt/edgecascade) bash deploy/install.sh

clean: ## Remove the venv, caches and results (keeps committed models)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache results build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
