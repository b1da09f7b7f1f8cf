# Entry points for people and CI. `make run` and `make test` work on a fresh Debian machine.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 9001
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps run test lint bench images

# bubblewrap isolates slots; the slot agent runs on the system's python3; tests use ps.
system-deps:
	@if ! command -v bwrap >/dev/null || ! [ -x /usr/bin/python3 ] || ! command -v ps >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq bubblewrap python3 procps; \
	fi

install: system-deps
	$(PYTHON) -m pip install -q -e '.[test]'

run: install
	$(PYTHON) -m atropos_agent.cli serve --host $(HOST) --port $(PORT)

# The layering contract (pyproject's [tool.importlinter]): a lower layer never imports an upper one.
LINT_IMPORTS := from importlinter.cli import lint_imports_command; lint_imports_command()

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -c '$(LINT_IMPORTS)' --no-cache

# The executor's end-to-end suite runs twice: on the local backend, and with its pool on the
# Nomad API double (harness/nomad_double).
test: install lint
	$(PYTHON) -m pytest -q
	TEST_BACKEND=nomad $(PYTHON) -m pytest -q tests/test_executor_leases.py \
		tests/test_executor_faults.py tests/test_executor_protocol.py

bench: install
	$(PYTHON) -m benchmarks.sandbox_throughput
	$(PYTHON) -m benchmarks.slot_memory
	$(PYTHON) -m benchmarks.executor_throughput
	$(PYTHON) -m benchmarks.executor_memory

# The sandbox and executor images (Dockerfile). Needs a Docker engine; not part of `make test`.
# Tags: SANDBOX_IMAGE, EXECUTOR_IMAGE (see deploy/build-images.sh --help).
images:
	deploy/build-images.sh
