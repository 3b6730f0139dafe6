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

.PHONY: help run test unit lint bench clean browser patroni

help: ## show the targets
	@grep -hE '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# Patroni (the HA stack's PostgreSQL manager) runs as PostgreSQL's server account, which
# cannot run as root: when we are root it needs a Python that account can read, and ours may
# live under /root. A small virtualenv from the system Python, readable by all, under .tools/.
PATRONI_STAMP := .tools/patroni/.installed
SYSTEM_PYTHON := $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo $(PYTHON))
$(PATRONI_STAMP): pyproject.toml
	@mkdir -p .tools
	$(SYSTEM_PYTHON) -m venv .tools/patroni
	.tools/patroni/bin/python -m pip install --quiet 'patroni[etcd3]>=4.0' 'psycopg[binary]>=3.2'
	chmod -R a+rX .tools/patroni
	@touch $@

patroni: $(PATRONI_STAMP) ## the HA stack's Patroni, runnable by PostgreSQL's server account

run: $(VENV_STAMP) ## start OpenBao, PostgreSQL and the tokenizer (Ctrl-C stops)
	$(VENV)/bin/vaultline dev up

test: $(VENV_STAMP) lint proto browser patroni ## every check: lint, proto lint/breaking/codegen, all tests
	$(PY) -m pytest -q -p no:cacheprovider

# The agent panel's browser tests drive Debian's chromium through chromium-driver (nothing is
# downloaded at test time). Installed here when missing and apt-get is available; otherwise
# this says what to install. VAULTLINE_SKIP_BROWSER=1 skips those tests, explicitly.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## install Debian's chromium + chromium-driver for the browser tests, if missing
	@if [ "$$VAULTLINE_SKIP_BROWSER" = 1 ]; then \
	  echo "VAULTLINE_SKIP_BROWSER=1: the agent panel's browser tests will be skipped"; \
	elif [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }; \
	else \
	  echo "the browser tests need Chromium: install Debian's chromium and chromium-driver" \
	    "(/usr/bin/chromium, /usr/bin/chromedriver), or set VAULTLINE_SKIP_BROWSER=1" >&2; \
	  exit 1; \
	fi

unit: $(VENV_STAMP) ## only the pure unit tests (seconds)
	$(PY) -m pytest -q tests/unit

# The pure cores (no I/O) are held to mypy --strict; everything else to mypy's defaults.
PURE_CORES := $(addprefix services/vaultline/,card.py tokens.py crypto.py errors.py \
	group_commit.py commit_delay.py runtime.py resources.py ivr/interpreter.py ivr/flows.py \
	ivr/twiml.py ivr/signing.py ivr/sealing.py settlement/fileformat.py settlement/batch.py \
	security/identity.py security/answers.py batches.py ivr/pay_connector.py ivr/payment.py \
	panel/links.py recordings/dtmf.py recordings/audio.py \
	recordings/envelope.py descope/detect.py descope/rewrite.py)

lint: $(VENV_STAMP) ## ruff, mypy (--strict for the pure cores)
	$(VENV)/bin/ruff check services tests load
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict --follow-imports=silent $(PURE_CORES)

bench: $(VENV_STAMP) ## throughput benchmark against a fresh stack (see load/README.md)
	$(PY) load/bench.py

clean: ## remove local state (.vaultline), the venv and tools
	rm -rf .vaultline $(VENV) .tools
