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
	$(BIN)/python -m pip install --quiet -e '.[test,hyperquest,export,bench,caption]'
	@# METEOR 1.5 (cap/densecap's densecap_map) runs on Java: Debian's headless JRE where java is missing.
	@command -v java >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null; } || \
		echo "note: no java on PATH, so cap/densecap reports meteor unavailable (apt-get install default-jre-headless)"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m detseg.demo

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs bench demo_out .pytest_cache
