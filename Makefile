# Every target sets up .venv itself; a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench proto lock audit-screenshot clean compiled pure bytecode

# The dev dependencies as locked (requirements/dev.txt: every version pinned, every
# file hashed), then the project itself, editable, without resolving anything more
# (and built with them: setup.py needs the locked mypy).
$(STAMP): pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	OUTRIDER_PURE=1 $(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The agent's hot path, compiled by mypyc in place (setup.py; the list is pyproject's
# `[tool.outrider] compiled`): each extension imports instead of its .py file. Built
# again when any agent or identity module changes, since mypyc compiles against their
# types; tests/conftest.py stops a run whose extensions are older than their sources.
# `make pure` removes them: everything then runs as Python.
COMPILED := $(VENV)/.compiled
SOURCES  := $(shell find agent identity -name '*.py' -not -path '*/proto/*') identity/_ec_methods.c

$(COMPILED): $(STAMP) setup.py pyproject.toml $(SOURCES)
	@echo "compiling the agent's hot path with mypyc (about a minute)"
	$(BIN)/python setup.py --quiet build_ext --inplace --force --parallel 2
	touch $@

compiled: $(COMPILED)

pure:
	rm -f $(COMPILED)
	find agent identity -name '*.so' -delete

demo: $(COMPILED)
	$(BIN)/outrider demo

# Four test processes (pytest-xdist) on two cores: the suite is mostly real processes
# waiting on the clock, so four workers overlap the waits. A worker that runs out of
# tests takes some from another's queue (worksteal): with `load` three of the four
# sat idle for minutes behind one worker's queue of long tests (7 minutes, not 5.5).
# The linters, the compile and the bytecode run side by side first.
test: $(STAMP)
	$(MAKE) --no-print-directory -j2 lint compiled bytecode
	$(BIN)/pytest -q -n 4 --dist worksteal

# Bytecode written once, before the run: where none is written on import (a fresh
# clone, PYTHONDONTWRITEBYTECODE) every agent, CA and CLI a test starts compiles the
# modules it imports, and each worker rewrites every test module's asserts; that was
# 2 of the suite's 12 minutes of CPU. A collection with writing on leaves pytest's
# rewritten modules beside compileall's; its errors are the test run's to report.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 agent identity ca control injector outrider bench tests
	-PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q --collect-only -p no:cacheprovider > /dev/null 2>&1

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The harness installs the load generators and rival proxies it lacks from
# Debian's packages (bench/procs.py); Envoy comes from the dev dependencies,
# matplotlib and py-spy from the bench extra. QUICK=1 finishes in under 3 minutes.
BENCH_STAMP := $(VENV)/.bench

$(BENCH_STAMP): $(COMPILED)
	OUTRIDER_PURE=1 $(BIN)/pip install --quiet --no-build-isolation -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)

# Regenerate the wire protocols; tests/unit/test_proto_drift.py fails when
# the committed code and identity/proto/*.proto disagree.
proto: $(STAMP)
	$(BIN)/python -m identity.proto.generate

# The lock files, from pyproject.toml (pip-tools): dev.txt for make, all.txt for
# Dockerfile.ca, agent.txt for Dockerfile.agent, build.txt (the build backend) for the
# wheel both images build of the project. The images' locks are
# constrained by dev.txt, so a package has one version in all of them. Every
# distribution file of a pinned version is hashed: the locks hold on any platform
# the pinned versions have wheels for. `outrider` itself (dev and all name it, as
# outrider[all]) is left out of the files: it is the project, not a dependency.
LOCK = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--strip-extras --allow-unsafe --unsafe-package outrider \
	--no-emit-index-url --no-emit-find-links

lock: $(STAMP)
	$(LOCK) --extra dev -o requirements/dev.txt pyproject.toml
	$(LOCK) --extra all -c requirements/dev.txt -o requirements/all.txt pyproject.toml
	$(LOCK) --extra agent -c requirements/dev.txt -o requirements/agent.txt pyproject.toml
	OUTRIDER_PURE=1 $(LOCK) --only-build-deps --all-build-deps -c requirements/dev.txt \
		-o requirements/build.txt pyproject.toml
	$(BIN)/python -c 'import pathlib, re; [p.write_text(re.sub(r"\n*# The following packages are considered to be unsafe.*", "\n", p.read_text(), flags=re.S)) for p in pathlib.Path("requirements").glob("*.txt")]'

# docs/audit.png, the README's picture of `outrider audit`: the acceptance test's own
# report (a running mesh, a real Prometheus, headless Chromium), kept instead of thrown away.
audit-screenshot: $(STAMP)
	OUTRIDER_AUDIT_SCREENSHOT=docs/audit.png $(BIN)/pytest -q -p no:xdist \
		tests/e2e/test_audit_questions.py -k chromium

clean: pure
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build
