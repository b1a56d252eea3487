# `make demo` and `make test` work on a fresh clone: both depend on `setup`, which creates .venv once and
# reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,hyperquest,export,bench]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m detseg.demo

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs bench demo_out .pytest_cache
