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

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

# The stack's data lives in the per-user data directory (~/.local/state/poolq, or
# POOLQ_DATA_DIR): one stack per data directory, found by `poolq nodes …` from anywhere.
run: $(VENV)/.installed
	$(BIN)/poolq up

# Every test, in two parts that must both pass: all but the `serial` tests in parallel
# (pytest-xdist: each worker is a pytest session of its own, with its own redis-server,
# ports and tmp dirs; `loadgroup` keeps the tests of a module's shared stack on one
# worker), then the `serial` tests, which measure rates, latencies and CPU shares, alone.
# 3 workers measured fastest on 2 cores (2: 423 s, 3: 350 s, 4: 369 s, 6: 443 s and
# timing failures). Tests that did not run are named, with why. The browser test's
# Chromium, the multi-host tests' `ip` and the TLS tests' redis-server come from Debian's
# packages (tools/ensure_packages.sh installs them as root).
test: $(VENV)/.installed-test
	@sh tools/ensure_packages.sh
	@status=0; \
	echo "$(BIN)/python -m pytest -n 3 --dist loadgroup -m 'not serial'"; \
	$(BIN)/python -m pytest -n 3 --dist loadgroup -m "not serial" || status=$$?; \
	echo "$(BIN)/python -m pytest -m serial"; \
	$(BIN)/python -m pytest -m serial || status=$$((status ? status : $$?)); \
	[ $$status -eq 0 ] || echo "make test: FAILED (see the summaries above)"; \
	exit $$status

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench all --write BENCHMARKS.md

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check poolq api_shim worker bench tools tests
	$(BIN)/python -m ruff format --check poolq api_shim worker bench tools
	$(BIN)/python -m mypy poolq api_shim worker bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .poolq .pytest_cache
