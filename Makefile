# One command per job; each sets up what it needs on a fresh Debian / Raspberry Pi OS machine.
#   make demo   - the daemon on the bundled model, fed the bundled real series through a private broker
#   make test   - the test suite (installs the converter extra: TensorFlow)
#   make bench  - the benchmark suite, writes bench/results/ and docs/performance.md
#   make lint   - ruff and mypy
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test bench lint os-demo os-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[convert,dev]'
	touch $(VENV)/.runtime $@

os-demo:
	scripts/os-deps.sh demo

os-test:
	scripts/os-deps.sh test

demo: os-demo $(VENV)/.runtime
	$(BIN)/edge-lstm demo

test: os-test $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check edge_lstm converter tests bench
	$(BIN)/mypy

bench: os-test $(VENV)/.dev
	$(BIN)/python -m bench --repeat 3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
