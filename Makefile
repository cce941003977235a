# medimg — `make help` lists the targets. Everything runs in ./.venv, created on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export GIT_PYTHON_REFRESH ?= quiet
# two pytest workers, one file each at a time: the end-to-end repro overlaps the unit tests
XDIST  ?= -n 2 --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help setup repro test test-slow test-all test-fast e2e lint format bench ui gate clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install medimg with pinned dependencies

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

repro: setup ## set up, then rebuild the whole pipeline (dvc repro)
	dvc repro

test: setup ## set up, then run the tests (incl. one end-to-end dvc repro; not the `slow` ones)
	pytest -q -m "not slow" $(XDIST)

test-slow: setup ## the `slow` tests: resume after kill, 2-device training, REST server, real archives
	pytest -q -m slow $(XDIST)

test-all: setup ## every test
	pytest -q $(XDIST)

test-fast: setup ## the tests without the slow/end-to-end ones
	pytest -q -m "not slow and not e2e"

e2e: setup ## only the end-to-end dvc repro test
	pytest -q -m e2e

lint: setup ## ruff lint + format check, import layers (lint-imports), workflow audit (zizmor)
	ruff check src tests stages bench
	ruff format --check src tests stages bench
	lint-imports
	zizmor --offline .github/workflows/

format: setup ## apply ruff fixes and formatting
	ruff check --fix src tests stages bench
	ruff format src tests stages bench

bench: setup ## print the benchmark tables (uses ../shared/data when present)
	python bench/dvc_noop.py
	python bench/input_pipeline.py

ui: setup ## MLflow UI on the local sqlite store, http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

gate: setup ## re-check the promotion gate from the reports and the registry
	medimg gate

clean: ## remove pipeline outputs (keeps .venv and the DVC cache)
	rm -rf data models reports mlruns/mlflow.db mlruns/artifacts
