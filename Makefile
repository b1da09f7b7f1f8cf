# Entry points for people and CI. `make run` and `make test` work as root (or with sudo) on a
# stock Debian 12/13 or Ubuntu 24.04 with nothing but git, make and curl installed: the system
# packages come from apt, everything else goes into a virtual environment (.venv) made with
# $(PYTHON). The system's Python is never installed into; slots run it, standard library only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 9001
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps run test lint bench images clean

# bubblewrap isolates slots; the slot agent runs on the system's python3; tmux backs the tmux
# tool; tests use ps; python3-venv gives $(PYTHON) the ensurepip that `-m venv` needs.
# apt runs only when one of them is missing.
APT_PACKAGES := bubblewrap python3 python3-venv procps tmux

system-deps:
	@if ! command -v bwrap >/dev/null || ! [ -x /usr/bin/python3 ] || ! command -v ps >/dev/null \
		|| ! command -v tmux >/dev/null || ! $(PYTHON) -c 'import ensurepip' 2>/dev/null; then \
		echo "apt-get install $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

# The virtual environment, with the package (editable) and its test tools: installed into
# again when pyproject.toml changes, made anew when PYTHON names another interpreter than the
# last time (the stamp holds its name). `make clean` removes it.
$(VENV)/installed: pyproject.toml | system-deps
	@if { [ -f $@ ] && [ "$$(cat $@)" != '$(PYTHON)' ]; } \
		|| ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
		rm -rf $(VENV); echo '$(PYTHON) -m venv $(VENV)'; \
		$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }; \
	fi
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@echo '$(PYTHON)' > $@

ifneq ($(shell cat $(VENV)/installed 2>/dev/null)$(wildcard $(BIN)/python),$(PYTHON)$(BIN)/python)
$(VENV)/installed: FORCE
endif
FORCE:

install: $(VENV)/installed

run: install
	$(BIN)/python -m atropos_agent.cli serve --host $(HOST) --port $(PORT)

# The layering contract (pyproject's [tool.importlinter]): a lower layer never imports an upper one.
LINT_IMPORTS := from importlinter.cli import lint_imports_command; lint_imports_command()

lint: install
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -c '$(LINT_IMPORTS)' --no-cache

# The executor's end-to-end suite runs twice: on the local backend, and with its pool on the
# Nomad API double (harness/nomad_double).
test: install lint
	$(BIN)/python -m pytest -q
	TEST_BACKEND=nomad $(BIN)/python -m pytest -q tests/test_executor_leases.py \
		tests/test_executor_faults.py tests/test_executor_protocol.py

bench: install
	$(BIN)/python -m benchmarks.sandbox_throughput
	$(BIN)/python -m benchmarks.slot_memory
	$(BIN)/python -m benchmarks.executor_throughput
	$(BIN)/python -m benchmarks.executor_cpu
	$(BIN)/python -m benchmarks.executor_memory
	$(BIN)/python -m benchmarks.python_calls
	$(BIN)/python -m benchmarks.workspace_fork

# The sandbox and executor images (Dockerfile). Needs a Docker engine; not part of `make test`.
# Tags: SANDBOX_IMAGE, EXECUTOR_IMAGE (see deploy/build-images.sh --help).
images:
	deploy/build-images.sh

clean:
	rm -rf $(VENV)
