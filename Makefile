# `make demo` and `make test` are the two commands; each sets up what it needs.
#   make test PYTEST_ARGS="-k merge -x"    pass arguments to pytest
#   make demo DEMO_ARGS="--keep"           pass arguments to `streamsink demo`
# REDIS_URL / DATABASE_URL point the tests and the demo at other servers.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup services demo test lint bench

help:
	@echo "make setup     create $(VENV) and install streamsink with its dev tools"
	@echo "make services  make sure Redis and PostgreSQL answer (scripts/services.sh)"
	@echo "make demo      publish a realistic burst and show the streams"
	@echo "make test      run the tests (PYTEST_ARGS=... passes arguments to pytest)"
	@echo "make lint      ruff check, ruff format --check, mypy, import-linter (layers)"
	@echo "make bench     run the producer benchmark"

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (or the stamp is gone).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

services:
	bash scripts/services.sh

demo: setup services
	$(BIN)/streamsink demo $(DEMO_ARGS)

test: setup services
	$(BIN)/pytest $(PYTEST_ARGS)

# Runs all four checks, then fails if any did, so one run shows every problem.
# lint-imports checks the layers and library imports of pyproject.toml's [tool.importlinter].
lint: setup
	@status=0; \
	echo "$(BIN)/ruff check ."; $(BIN)/ruff check . || status=1; \
	echo "$(BIN)/ruff format --check ."; $(BIN)/ruff format --check . || status=1; \
	echo "$(BIN)/mypy"; $(BIN)/mypy || status=1; \
	echo "$(BIN)/lint-imports"; $(BIN)/lint-imports --no-cache --no-logo || status=1; \
	exit $$status

bench: setup services
	$(BIN)/python bench/producer.py
