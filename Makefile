# oncofed — the two front-door commands (see README):
#   make run    set up .venv, build the five built-in sites, run the flwr simulation
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.oncofed-installed

.PHONY: setup run test test-slow sites bench clean

setup: $(STAMP)

# torch==2.13.0 first: a CPU build from this machine's disk (an unpinned torch may
# pull a multi-GB CUDA build). Then the runtime and test requirements, then the package
# itself (pyproject.toml lists no dependencies, so Flower's run-time `uv sync` works offline).
$(STAMP): pyproject.toml requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

run: setup
	$(PY) -m simulations.main_job

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

sites: setup
	$(VENV)/bin/oncofed sites build --all .oncofed/sites
	$(VENV)/bin/oncofed sites validate .oncofed/sites/*

bench: setup
	$(PY) -m simulations.bench_sites
	$(PY) -m simulations.bench_model
	$(PY) -m simulations.bench_federation

clean:
	rm -rf .oncofed results .flwr
