# wsmanager: every target installs what it needs, from nothing (apt + pip).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
APT_PACKAGES = uthash-dev redis-server
ASAN_LIB = $(shell gcc -print-file-name=libasan.so)

.PHONY: help deps apt build demo test test-fast test-asan lint bench clean

help:
	@echo "make demo   - run the demo app on http://$(HOST):$(PORT) (in-memory)"
	@echo "make test   - lint, type-check, full test suite, then the suite under ASan+UBSan"
	@echo "make bench  - benchmarks (tables with ratios against baselines)"

# System packages (Debian): only when something is missing, and only as root.
apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

$(VENV)/.deps-stamp: pyproject.toml
	$(MAKE) apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,demo]'
	touch $@

deps: $(VENV)/.deps-stamp

# In-place build of wsmanager/_core*.so with warnings as errors.
build: deps
	WSM_DEV=1 $(PY) setup.py -q build_ext --inplace --force

demo: build
	$(PY) -m uvicorn examples.lobby_chat.app:app --host $(HOST) --port $(PORT)

lint: deps
	$(VENV)/bin/ruff check wsmanager tests examples benchmarks setup.py
	$(VENV)/bin/ruff format --check wsmanager tests examples benchmarks setup.py
	$(VENV)/bin/mypy

test-fast: build
	$(PY) -m pytest -q

# The suite again with the extension built under ASan + UBSan.
test-asan: deps
	WSM_DEV=1 WSM_SANITIZE=1 $(PY) setup.py -q build_ext --inplace --force
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONMALLOC=malloc LD_PRELOAD=$(ASAN_LIB) $(PY) -m pytest -q -p no:cacheprovider; \
	  rc=$$?; WSM_DEV=1 $(PY) setup.py -q build_ext --inplace --force; exit $$rc

test: lint test-fast test-asan

bench: build
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_redis.py

clean:
	rm -rf build wsmanager/*.so *.egg-info .pytest_cache .mypy_cache .ruff_cache
