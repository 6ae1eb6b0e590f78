# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates its own virtualenv in $(VENV). TORCH pins the CPU build that this project's
# machines carry; on your own machine keep your torch with `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-all lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.bench: pyproject.toml $(VENV)/.dev
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@

demo: $(VENV)/.demo
	$(BIN)/fasttrak demo

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

test-all: lint typecheck
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(VENV)/.bench
	$(BIN)/python benchmarks/featurize.py

clean:
	rm -rf $(VENV) fasttrak-demo .pytest_cache .ruff_cache .mypy_cache
