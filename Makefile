# Tollway: `make serve` and `make test` work on a fresh machine with Python 3.11+ (with its venv
# module: Debian's python3-venv) and make; scripts/check-python says what is missing, and how to
# install it, before anything is made.
# Every dependency comes from requirements/lock.txt, hash-pinned (`make lock` regenerates it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=
LOCK := requirements/lock.txt
LOCK_TOOLS := .venv-lock
LOCK_ARGS ?=

.PHONY: serve test lint typecheck bench clean install lock stress stress-reliability stress-fuzz

install: $(STAMP)

# Dependencies come only from the lock, with hash checking (pip refuses any file whose sha256
# is not recorded there), then the project itself without dependencies. Fails, saying so, when
# pyproject.toml's dependencies changed and the lock was not regenerated.
$(STAMP): pyproject.toml $(LOCK) requirements/build.in
	@sh scripts/check-python '$(PYTHON)'
	@$(PYTHON) scripts/lockfile.py check $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Regenerate the lock from pyproject.toml (runtime and dev dependencies; dev includes the otel
# extra) and requirements/build.in: every platform, Python >= 3.11, every file's sha256. Pins
# already in the lock are kept unless needed otherwise; LOCK_ARGS=--upgrade (or
# --upgrade-package NAME) moves them. uv itself comes hash-checked from requirements/tools.txt.
lock:
	@test -x $(LOCK_TOOLS)/bin/uv || { sh scripts/check-python '$(PYTHON)' && \
	  $(PYTHON) -m venv $(LOCK_TOOLS) && \
	  $(LOCK_TOOLS)/bin/pip install --quiet --require-hashes -r requirements/tools.txt; }
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml requirements/build.in --extra dev \
	  --universal --python-version 3.11 --generate-hashes --quiet -o $(LOCK) $(LOCK_ARGS)
	$(PYTHON) scripts/lockfile.py stamp $(LOCK)

serve: $(STAMP)
	$(BIN)/tollway db upgrade
	TOLLWAY_LOG_REQUESTS=$${TOLLWAY_LOG_REQUESTS:-all} \
	  $(BIN)/tollway serve --host $(HOST) --port $(PORT) --catalog examples/catalog.yaml --demo

# Runs every test on SQLite and on a throwaway PostgreSQL server (started here, stopped after).
test: $(STAMP)
	@url=$$(scripts/pg-test-server start var/pg-test) || { \
	  if [ -n "$$CI" ]; then echo "PostgreSQL is required in CI" >&2; exit 1; fi; \
	  echo "!! PostgreSQL unavailable: its test variants will be SKIPPED" >&2; url=""; }; \
	TOLLWAY_TEST_POSTGRES_URL="$$url" $(BIN)/python -m pytest $(PYTEST_ARGS); status=$$?; \
	scripts/pg-test-server stop var/pg-test >/dev/null 2>&1 || true; exit $$status

# The long runs, on SQLite and PostgreSQL: reliability (cluster, crashes, restart, flood, soak)
# and fuzzing (pytest marker `stress`, deselected by `make test`). Each prints its table.
stress: stress-reliability stress-fuzz

# Long fuzzing: schemathesis over every operation, hypothesis over catalogs and usage
# (TOLLWAY_STRESS_EXAMPLES examples each), then the per-operation table.
STRESS_EXAMPLES ?= 300
stress-fuzz: $(STAMP)
	@mkdir -p var/stress && rm -f var/stress/fuzz-api.jsonl
	@url=$$(scripts/pg-test-server start var/pg-test) || { echo "stress needs PostgreSQL" >&2; exit 1; }; \
	TOLLWAY_TEST_POSTGRES_URL="$$url" TOLLWAY_STRESS_EXAMPLES=$(STRESS_EXAMPLES) \
	  TOLLWAY_FUZZ_REPORT=var/stress/fuzz-api.jsonl $(BIN)/python -m pytest -m stress -q \
	  tests/api/test_fuzz_api.py tests/pricing/test_fuzz_catalog.py tests/gateway/test_fuzz_usage.py $(PYTEST_ARGS); \
	status=$$?; scripts/pg-test-server stop var/pg-test >/dev/null 2>&1 || true; \
	$(BIN)/python scripts/fuzz-summary var/stress/fuzz-api.jsonl; exit $$status

# The long versions: 10,000 requests over three instances on one PostgreSQL ledger, 10 SIGKILLs
# per backend, the PostgreSQL restart, then a flood and a 1,000,000-request soak (bench/soak.py,
# SOAK_REQUESTS to change); prints the summary table (docs/reliability.md has the figures).
SOAK_REQUESTS ?= 1000000
stress-reliability: $(STAMP)
	@mkdir -p var/stress && rm -f var/stress/results.jsonl var/stress/soak.jsonl
	@url=$$(scripts/pg-test-server start var/pg-test) || { echo "stress needs PostgreSQL" >&2; exit 1; }; \
	TOLLWAY_STRESS=1 TOLLWAY_STRESS_REPORT=var/stress/results.jsonl TOLLWAY_TEST_POSTGRES_URL="$$url" \
	  $(BIN)/python -m pytest -q tests/reliability/test_reliability_cluster.py tests/reliability/test_reliability_crash.py \
	  tests/reliability/test_operations.py; status=$$?; \
	$(BIN)/python bench/soak.py --requests $(SOAK_REQUESTS) --json var/stress/soak.jsonl || status=1; \
	scripts/pg-test-server stop var/pg-test >/dev/null 2>&1 || true; \
	$(BIN)/python bench/stress_report.py var/stress/results.jsonl var/stress/soak.jsonl; exit $$status

# ruff, mypy strict, and the import contracts in pyproject.toml (the layering in README "Layout").
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: $(STAMP)
	$(BIN)/python bench/ledger.py

clean:
	rm -rf $(VENV) $(LOCK_TOOLS) var .pytest_cache .hypothesis
