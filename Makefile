# Vaultline: `make run` starts the local stack, `make test` runs every check.
# Both bootstrap what they need on first use: a virtualenv (.venv) with the Python
# dependencies, and buf (from the npm package @bufbuild/buf) under .tools/.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed

include infra/make/proto.mk

.PHONY: help run test unit lint bench clean

help: ## show the targets
	@grep -hE '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

run: $(VENV_STAMP) ## start OpenBao, PostgreSQL and the tokenizer (Ctrl-C stops)
	$(VENV)/bin/vaultline dev up

test: $(VENV_STAMP) lint proto ## every check: lint, proto lint/breaking/codegen, all tests
	$(PY) -m pytest -q -p no:cacheprovider

unit: $(VENV_STAMP) ## only the pure unit tests (seconds)
	$(PY) -m pytest -q tests/unit

# The pure cores (no I/O) are held to mypy --strict; everything else to mypy's defaults.
PURE_CORES := $(addprefix services/vaultline/,card.py tokens.py crypto.py errors.py \
	group_commit.py commit_delay.py runtime.py resources.py ivr/interpreter.py ivr/flows.py \
	ivr/twiml.py ivr/signing.py ivr/sealing.py settlement/fileformat.py settlement/batch.py \
	security/identity.py security/answers.py batches.py ivr/pay_connector.py ivr/payment.py)

lint: $(VENV_STAMP) ## ruff, mypy (--strict for the pure cores)
	$(VENV)/bin/ruff check services tests load
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict --follow-imports=silent $(PURE_CORES)

bench: $(VENV_STAMP) ## throughput benchmark against a fresh stack (see load/README.md)
	$(PY) load/bench.py

clean: ## remove local state (.vaultline), the venv and tools
	rm -rf .vaultline $(VENV) .tools
