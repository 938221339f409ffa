# gpu-health-exporter: developer entry points.
#   make demo   - start the exporter on simulated GPUs at http://localhost:9400/metrics
#   make test   - install everything and run lint, type checks and the whole test suite
#   make bench  - print the benchmark figures recorded in docs/benchmarks.md
#   make docs   - regenerate docs/metrics.md and docs/configuration.md

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# Debian packages the tests need: a C compiler and cJSON for the fake NVML,
# prometheus for promtool and the end-to-end server, nginx-light and wrk for benchmarks.
APT_PACKAGES = gcc make libcjson-dev prometheus nginx-light wrk

.PHONY: demo test lint typecheck generated unit venv deps system-deps fakenvml bench docs clean

$(VENV)/.installed: pyproject.toml
	@# Debian/Ubuntu's system python3 ships venv without ensurepip: install python3-venv if needed.
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Installs the Debian packages when they are missing (needs root or sudo).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

deps: system-deps venv

demo: venv
	$(PY) -m exporter --simulate --collect-interval 1000 --state-dir .demo-state --log-format console

fakenvml:
	$(MAKE) -C tests/fakenvml

# What ruff and mypy check (pyproject.toml keeps the generated protobuf stubs out of both).
PY_SOURCES = exporter podresources tests benchmarks deploy

lint: venv
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)

typecheck: venv
	$(VENV)/bin/mypy $(PY_SOURCES)

unit: deps fakenvml
	$(PY) -m pytest -q

# Generated artefacts must be current: docs from the code's tables, chart rules and
# dashboards from deploy/ sources.
generated: venv
	$(PY) -m exporter.docgen --check
	$(PY) deploy/generate.py --check

test: deps lint typecheck generated fakenvml
	$(PY) -m pytest -q -p no:cacheprovider

bench: deps fakenvml
	$(PY) benchmarks/run.py

docs: venv
	$(PY) -m exporter.docgen

clean:
	rm -rf $(VENV) tests/fakenvml/build .demo-state .mypy_cache .ruff_cache .pytest_cache
