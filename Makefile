# `make demo` and `make test` are the two commands; each sets up what it needs.
#   make test PYTEST_ARGS="-k merge -x"    pass arguments to pytest
#   make test PYTEST_WORKERS=0             one process (pytest-xdist off, e.g. to see -s output)
#   make demo DEMO_ARGS="--keep"           pass arguments to `streamsink demo`
# REDIS_URL / DATABASE_URL point the tests and the demo at other servers.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest-xdist workers: most tests wait on servers, subprocesses and deadlines, not on
# the CPU, so two nearly halve the run even on two busy cores. worksteal: an idle worker
# takes tests queued for the other, so the long ones (run first) do not leave a tail.
PYTEST_WORKERS ?= 2
DEMO_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup services demo test lint bench

help:
	@echo "make setup     create $(VENV) and install streamsink with its dev tools"
	@echo "make services  make sure Redis and PostgreSQL answer (scripts/services.sh)"
	@echo "make demo      publish a realistic burst, drain it into PostgreSQL with a worker, show the rows"
	@echo "make test      run the tests on 2 workers (PYTEST_ARGS=... passes arguments to pytest)"
	@echo "make lint      ruff check, ruff format --check, mypy, import-linter (layers), docker compose config"
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
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Runs every check, then fails if any did, so one run shows every problem.
# lint-imports checks the layers and library imports of pyproject.toml's [tool.importlinter].
lint: setup
	@status=0; \
	echo "$(BIN)/ruff check ."; $(BIN)/ruff check . || status=1; \
	echo "$(BIN)/ruff format --check ."; $(BIN)/ruff format --check . || status=1; \
	echo "$(BIN)/mypy"; $(BIN)/mypy || status=1; \
	echo "$(BIN)/lint-imports"; $(BIN)/lint-imports --no-cache --no-logo || status=1; \
	echo "scripts/compose_check.sh"; bash scripts/compose_check.sh || status=1; \
	exit $$status

bench: setup services
	$(BIN)/python bench/producer.py
