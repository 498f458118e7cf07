# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPOSITORY ?= model_repository
# Pytest arguments, e.g. `make test PYTEST_ARGS="-k arithmetic"` (default: list the 25 slowest tests)
PYTEST_ARGS ?= --durations=25

.PHONY: setup serve test lint protos lock clean

# The torch the tests were run with; pyproject.toml itself asks only for torch>=2.4. Installed
# first, and only when the venv has no torch yet. On a machine without a GPU, a CPU build saves
# gigabytes: make TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0

# The venv is brought up to date when pyproject.toml or the lock changes. Every package but torch
# comes at the version requirements.lock pins (`make lock` refreshes it), so a release made
# after the lock cannot change what a fresh clone installs.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c requirements.lock -e '.[train,dev]'
	touch $@

setup: $(VENV)/.installed

# Set up, train the default model when the repository has none, serve it.
serve: setup
	@if [ -z "$$(ls -A $(REPOSITORY) 2>/dev/null)" ]; then \
		echo "no model in $(REPOSITORY): training the default (digits, alexnet_small)"; \
		$(VENV)/bin/convserve train --repository $(REPOSITORY); \
	fi
	$(VENV)/bin/convserve serve --repository $(REPOSITORY)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (lint and format) over everything; mypy over the serving half (pyproject.toml says what).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Regenerate the committed protobuf modules under convserve/proto from protos/
protos: setup
	$(PY) scripts/gen_protos.py

# Re-resolve requirements.lock (make setup's pins) and deploy/requirements.lock (the images') from
# pyproject.toml, with pip-tools in a venv of its own; then `make test` with the new pins.
lock:
	test -x .lock-venv/bin/python || $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip pip-tools
	.lock-venv/bin/python scripts/lock.py

clean:
	rm -rf $(VENV) .lock-venv .pytest_cache .hypothesis
