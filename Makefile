# The two commands a new user types: `make run` and `make test`. Both create the
# virtualenv, install the project, start the local stack (Kafka + Cassandra from
# Maven Central jars) and then do their job.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DURATION ?= 60
PYTEST_ARGS ?=

.PHONY: venv stack-up stack-down stack-status run test unit integration lint chaos chaos-long bench clean

venv: $(VENV)/.installed

# The optional builds (setup.py: schemas/_avroc.c, and the engine core compiled by mypyc) are made
# by the install: a change to their sources reinstalls (engine/__init__.py runs the source of a
# core edited since, never a stale build).
$(VENV)/.installed: pyproject.toml setup.py schemas/_avroc.c schemas/_cslots.h engine/_journalc.c engine/book.py engine/ledger.py engine/core.py engine/batch.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

stack-up: venv
	$(BIN)/ohs stack up

stack-down: venv
	$(BIN)/ohs stack down

stack-status: venv
	$(BIN)/ohs stack status

# The main job, end to end on the local stack: engine simulator -> bridge -> Kafka -> worker -> Cassandra.
run: stack-up
	$(BIN)/ohs smoke
	$(BIN)/ohs run --duration $(DURATION)

# Every test: unit and integration (real Kafka and Cassandra); compose tests skip without Docker.
test: stack-up
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: stack-up
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

chaos: stack-up
	$(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

# The fault suite with its long variants (a 3-minute Cassandra outage).
chaos-long: stack-up
	OHS_CHAOS_LONG=1 $(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
