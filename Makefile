# Two commands on a fresh machine: `make demo` (the whole system, local stand-ins) and `make test`.
SHELL := /bin/bash
PY    := .venv/bin/python
UV    := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup test demo demo-stop bench system-deps python-deps node-deps dbt-parse dbt-build

setup: system-deps python-deps node-deps

# Debian packages the local stack runs on (Mosquitto, Node.js for the SQS/S3 emulator, Prometheus +
# promtool and the Pushgateway for monitoring, PostgreSQL for the production-profile stores' tests).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_passwd >/dev/null || missing="$$missing mosquitto-clients"; \
	command -v node >/dev/null || missing="$$missing nodejs npm"; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-pushgateway >/dev/null || missing="$$missing prometheus-pushgateway"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

python-deps: .venv/.synced
.venv/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null || [ -x $(HOME)/.local/bin/uv ] || python3 -m pip install -q --user uv==0.13.9 || python3 -m pip install -q uv==0.13.9
	$$(command -v uv || echo $(HOME)/.local/bin/uv) sync --frozen --quiet
	@touch $@

node-deps: devstack/fauxqs/node_modules/.installed
devstack/fauxqs/node_modules/.installed: devstack/fauxqs/package-lock.json
	cd devstack/fauxqs && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The Dagster code location reads dbt's manifest at import; outside `dagster dev` it must exist first.
dbt-parse: python-deps
	.venv/bin/dbt parse --project-dir dbt --profiles-dir dbt --quiet

# dbt build by hand (the daily schedule does it in Dagster): marts land in DBT_DUCKDB_PATH (default
# dbt/target/analytics.duckdb). Reads the demo's local S3 endpoint unless AWS_ENDPOINT_URL is set (empty: AWS).
dbt-build: dbt-parse
	$(PY) -m pipeline.analyst --install-httpfs
	AWS_ENDPOINT_URL=$${AWS_ENDPOINT_URL-http://127.0.0.1:4566} AWS_ACCESS_KEY_ID=$${AWS_ACCESS_KEY_ID:-local} \
	AWS_SECRET_ACCESS_KEY=$${AWS_SECRET_ACCESS_KEY:-local} .venv/bin/dbt build --project-dir dbt --profiles-dir dbt

test: setup dbt-parse
	$(PY) -m pytest -n 2 --durations=10

demo: setup dbt-parse
	$(PY) -m devstack.demo

demo-stop:
	$(PY) -m devstack.demo --stop

# Benchmarks print figures; they are kept out of the default test run.
bench: setup dbt-parse
	$(PY) -m pytest -m benchmark -s -p no:cacheprovider

# Puts back, one at a time, the defects the promise rules out (an ack before the event is safe, a delete
# before the destinations have the window, duplicates in the archive ...) in a temporary copy of HEAD,
# and runs the tests that must notice each; fails if one survives. The working tree is never changed.
.PHONY: mutants
mutants: setup dbt-parse
	$(PY) -m devstack.mutants
