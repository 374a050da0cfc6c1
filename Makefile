# Two commands on a fresh machine with Python 3.11+: `make dev` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint fault install clean bench bench-quick

$(STAMP): pyproject.toml web/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,dashboard]' -e ./web
	touch $(STAMP)

install: $(STAMP)

# make dev PORT=8001: another port (and `outbox dev --data-dir` for a second, separate instance).
PORT ?= 8000
dev: $(STAMP)
	$(BIN)/outbox dev --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Fault tests alone (kills, outages); OUTBOX_FAULT_SCALE=4 makes them bigger.
fault: $(STAMP)
	$(BIN)/python -m pytest -m fault $(PYTEST_ARGS)

# Benchmarks run in an environment of their own, with the peers (procrastinate, pgqueuer,
# Celery) and matplotlib, so the project's own environment stays lean.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP): pyproject.toml web/pyproject.toml bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e . -e ./web -r bench/requirements.txt
	touch $(BENCH_STAMP)

# --full is the published page: about 40 minutes on 2 cores (the sweeps of items 3-4 start every
# system's workers once per setting; item 9 holds a snapshot for 10 minutes on a cluster of its
# own). --quick checks the same code in a few minutes; --only ITEMS runs some items.
bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench --full

bench-quick: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench --quick

lint: $(STAMP)
	$(BIN)/ruff check outbox web tests migrations examples bench
	$(BIN)/ruff format --check outbox web tests migrations examples bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(BENCH_VENV) .outbox .pytest_cache
