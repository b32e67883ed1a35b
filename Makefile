# eventrelay developer tasks (GNU make).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv test lint fmt demo clean reliability bench soak

all: test

venv: $(STAMP)

# Re-install whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

# pytest in 3 processes on 2 cores: most tests wait (on servers, child processes, timeouts) rather than compute.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy -p bookstore
	$(VENV)/bin/pytest -n 3

# The fault and crash suite at full sizes (a 10 s outage, a 1,000,000-event backlog; `make test` runs it
# scaled down), then its table of figures (docs/reliability.md). Takes hours: see docs/reliability.md.
reliability: $(STAMP)
	EVENTRELAY_RELIABILITY_FULL=1 $(VENV)/bin/pytest tests/reliability -m reliability; status=$$?; \
	$(PY) -m tests.reliability.report; exit $$status

# Flake hunt (tests/soak.py): the process-level and broker tests 5 times, each in a shuffled order, beside
# two CPU hogs; prints each test that failed at least once, with its count. `make soak SOAK_ARGS="--runs 10"`.
soak: $(STAMP)
	$(PY) -m tests.soak $(SOAK_ARGS)

# The benchmark of issue 9 (bench/, docs/benchmarks.md): every scenario and its baselines, 3 rounds each, about
# 20 minutes on 2 cores; writes the figures and the plot into docs/, and every row as JSON into
# bench-results.json (gitignored). `$(PY) -m bench --quick` takes 2 minutes.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VENV)/bin/mypy --strict bench
	$(PY) -m bench --write-docs --json bench-results.json $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy -p bookstore

fmt: $(STAMP)
	$(VENV)/bin/ruff format src tests examples bench
	$(VENV)/bin/ruff check --fix src tests examples bench

# make demo [BROKER=amqp://guest:guest@127.0.0.1:5672/] [DATABASE=postgresql+asyncpg://postgres@127.0.0.1/bookstore]
# `@`: not echoed, since BROKER and DATABASE may hold passwords.
demo: $(STAMP)
	@PYTHONPATH=examples BROKER='$(BROKER)' DATABASE='$(DATABASE)' $(PY) -m bookstore.demo

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
