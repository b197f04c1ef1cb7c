# One command per job; each sets up what it needs on a fresh Debian / Raspberry Pi OS machine.
#   make demo   - the daemon on the bundled model, fed the bundled real series through a private broker
#   make test   - the test suite (installs the converter extra: TensorFlow)
#   make bench  - the benchmark suite, writes bench/results/ and docs/performance.md
#   make lint   - ruff and mypy
#   make check-arm64 - the no-TensorFlow tests and the demo on an emulated arm64 Debian (slow: not in CI)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test bench lint os-demo os-test os-arm64 check-arm64 clean

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

os-arm64:
	scripts/os-deps.sh arm64

demo: os-demo $(VENV)/.runtime
	$(BIN)/edge-lstm demo

test: os-test $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check edge_lstm converter tests bench
	$(BIN)/mypy

check-arm64: os-arm64 $(VENV)/.dev
	scripts/check-arm64.sh $(BIN)/python

bench: os-test $(VENV)/.dev
	$(BIN)/python -m bench --repeat 3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
