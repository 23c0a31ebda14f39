# The two commands of the README's quickstart: `make run` and `make test`.
# Both create .venv with the first python3 on PATH (3.11 or newer) and install into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "poolq needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) tools/bootstrap_venv.py $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/poolq up

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/poolq bench all --write BENCHMARKS.md

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check poolq api_shim worker tools tests
	$(BIN)/python -m ruff format --check poolq api_shim worker tools
	$(BIN)/python -m mypy poolq api_shim worker

clean:
	rm -rf $(VENV) .poolq .pytest_cache
