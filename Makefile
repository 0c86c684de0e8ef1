# Two commands on a fresh machine: `make demo` (the whole system, local stand-ins) and `make test`.
SHELL := /bin/bash
PY    := .venv/bin/python
UV    := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup test demo demo-stop bench system-deps python-deps node-deps

setup: system-deps python-deps node-deps

# Debian packages the local stack runs on (Mosquitto, Node.js for the SQS/S3 emulator, Prometheus +
# promtool and the Pushgateway for monitoring).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_passwd >/dev/null || missing="$$missing mosquitto-clients"; \
	command -v node >/dev/null || missing="$$missing nodejs npm"; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-pushgateway >/dev/null || missing="$$missing prometheus-pushgateway"; \
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

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) -m devstack.demo

demo-stop:
	$(PY) -m devstack.demo --stop

# Benchmarks print figures; they are kept out of the default test run.
bench: setup
	$(PY) -m pytest -m benchmark -s -p no:cacheprovider
