# Two entry points (README): `make lab` starts JupyterLab on the notebooks, `make test` runs every test.
# Both set everything up first on a machine that has nothing but python3 (3.11) and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel on disk here.
TORCH ?= torch==2.13.0
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test lint benchmarks chromium

setup: $(VENV)/.installed
	@git rev-parse --git-dir >/dev/null 2>&1 && git config core.hooksPath hooks || true

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The browser tests drive Debian's chromium through Playwright (Playwright cannot download its own here).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir=notebooks $(ROOT_FLAG)

# Two workers (pytest-xdist): the suite is mostly Python-bound small models, notebooks and a browser, so two
# processes on two cores take about half the time. The Ray tests then run alone: Ray's start-up waits a fixed
# 30 s for its raylet, which a 2-core machine kept busy by the other worker does not meet.
test: setup chromium
	$(PY) -m pytest -n 2 --dist load -m "not ray"
	$(PY) -m pytest -m ray

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Every benchmark in benchmarks/ (each prints a table and writes benchmarks/results/<name>.json).
benchmarks: setup
	@for b in $(filter-out benchmarks/common.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done
