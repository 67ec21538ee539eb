# wsmanager: every target installs what it needs, from nothing (apt + pip).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
APT_PACKAGES =
# Only for the tests: the browser tests drive Debian's chromium (never Playwright's
# download); the backplane tests start Debian's redis-server; the client tests run
# on node >= 20 (installed from Debian when absent).
APT_TEST_PACKAGES = chromium redis-server
NODE ?= node
ASAN_LIB = $(shell gcc -print-file-name=libasan.so)

.PHONY: help deps apt apt-test build demo docs test test-fast test-js test-asan test-pythons lint bench bench-e2e clean

help:
	@echo "make demo   - run the demo app on http://$(HOST):$(PORT) (in-memory)"
	@echo "make test   - lint, type-check, full test suite (real browser included), the JS client's"
	@echo "              tests on node, then the suite under ASan+UBSan"
	@echo "make docs   - build the documentation site into site/ (open site/index.html), --strict"
	@echo "make bench  - benchmarks (tables with ratios against baselines)"
	@echo "make bench-e2e - end-to-end broadcast benchmark only (uvicorn, ~3 min)"

# System packages (Debian): only when something is missing, and only as root.
apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

apt-test:
	@pkgs="$(APT_TEST_PACKAGES)"; command -v $(NODE) >/dev/null 2>&1 || pkgs="$$pkgs nodejs"; \
	$(MAKE) --no-print-directory apt APT_PACKAGES="$$pkgs"

$(VENV)/.deps-stamp: pyproject.toml
	$(MAKE) apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools>=77' wheel
	$(PIP) install -q -e '.[dev,demo]'
	touch $@

deps: $(VENV)/.deps-stamp

# In-place build of wsmanager/_core*.so with warnings as errors.
build: deps
	WSM_DEV=1 $(PY) setup.py -q build_ext --inplace --force

demo: build
	$(PY) -m uvicorn examples.lobby_chat.app:app --host $(HOST) --port $(PORT)

lint: deps
	$(VENV)/bin/ruff check wsmanager tests examples benchmarks docs/_ext setup.py
	$(VENV)/bin/ruff format --check wsmanager tests examples benchmarks docs/_ext setup.py
	$(VENV)/bin/mypy

# The documentation site (mkdocs-material + mkdocstrings, the `docs` extra, which `dev` includes),
# built offline: no font or asset is fetched (mkdocs.yml). The API reference reads the built core's
# docstrings, hence `build`. Warnings are errors.
docs: build
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@echo "documentation built: site/index.html"

test-fast: build apt-test
	$(PY) -m pytest -q

# The browser client's logic on node's test runner: mocked sockets, then the demo app for real.
test-js: build apt-test
	@command -v $(NODE) >/dev/null 2>&1 || { echo "error: node >= 20 is needed for the client tests (apt-get install nodejs)"; exit 1; }
	@$(NODE) -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' || \
	  { echo "error: node >= 20 is needed for the client tests, found $$($(NODE) --version)"; exit 1; }
	WSM_PYTHON=$(abspath $(PY)) $(NODE) --experimental-websocket --test tests/js/*.test.mjs

# The suite again with the extension built under ASan + UBSan.
test-asan: deps apt-test
	WSM_DEV=1 WSM_SANITIZE=1 $(PY) setup.py -q build_ext --inplace --force
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONMALLOC=malloc LD_PRELOAD=$(ASAN_LIB) $(PY) -m pytest -q -p no:cacheprovider -m "not browser"; \
	  rc=$$?; WSM_DEV=1 $(PY) setup.py -q build_ext --inplace --force; exit $$rc

# Build and run the core tests on every CPython 3.10-3.13 that pyenv has.
CORE_TESTS = tests/test_manager_api.py tests/test_defects.py tests/test_json.py tests/test_model.py tests/test_memory.py \
             tests/test_c_safety.py tests/test_settings.py
test-pythons: apt
	@ran=""; root=$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv); \
	for v in 3.10 3.11 3.12 3.13; do \
	  py=$$(ls -d $$root/versions/$$v.*/bin/python3 2>/dev/null | sort -V | tail -n 1); \
	  if [ -z "$$py" ]; then echo "== CPython $$v: not installed here, not tested"; continue; fi; \
	  echo "== CPython $$v ($$py)"; \
	  venv=.venv-$$v; test -x $$venv/bin/python || $$py -m venv $$venv || exit 1; \
	  $$venv/bin/python -m pip install -q --upgrade pip 'setuptools>=77' wheel && \
	  $$venv/bin/python -m pip install -q -e '.[test]' && \
	  WSM_DEV=1 $$venv/bin/python setup.py -q build_ext --inplace --force && \
	  $$venv/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS) || exit 1; \
	  ran="$$ran $$v"; \
	done; echo "core tests passed on CPython:$$ran"; \
	WSM_DEV=1 $(PY) setup.py -q build_ext --inplace --force

test: lint docs test-pythons test-js test-asan test-fast

bench: build
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_json.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_redis.py

bench-e2e: build
	$(PY) benchmarks/bench_e2e.py

clean:
	rm -rf build site wsmanager/*.so *.egg-info .pytest_cache .mypy_cache .ruff_cache
