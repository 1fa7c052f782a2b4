# Two entry points for a fresh machine with Python 3.11: `make run` and `make test`.
# Both create .venv and install chemmap into it first (once; again when pyproject.toml changes).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= pipelines/pork_belly.yaml

.PHONY: install run test lint bench-smoke

$(BIN)/chemmap: pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU wheel of torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/chemmap

run: install
	$(BIN)/chemmap run $(CONFIG)

# Two pytest sessions: the main suite (one local Ray per session), then the Ray job tests
# against a real Ray head of their own (tests_cluster/), so that no Ray address or token
# passes from one to the other.
test: install
	$(BIN)/pytest -q -ra
	$(BIN)/pytest -q -ra tests_cluster

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
