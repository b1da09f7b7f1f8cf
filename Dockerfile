# Two images from one file (deploy/build-images.sh builds both):
#   docker build --target sandbox  -t atropos-sandbox:local .        the sandbox server
#   docker build --target executor -t atropos-tool-executor:local .  the executor service
# Both run the same entry points the test suite runs directly (python -m atropos_agent.sandbox,
# atropos-tool-executor serve), on Debian with Python 3.11.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The package as a wheel, so that the images get it without its sources or build files.
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY atropos_agent ./atropos_agent
RUN pip wheel --no-deps --wheel-dir /wheels .

# The sandbox server. bubblewrap isolates each slot; procps gives ps for inspecting slots;
# tmux backs the `tmux` tool (interactive terminals).
# Slots run /usr/local/bin/python3 of this image (the slot agent and the `python` tool).
# It runs as root on purpose: the server gives slot N its own unprivileged host uid
# (ATROPOS_SANDBOX_SLOT_UID_BASE + N), which only root can do. Commands never run as root.
FROM base AS sandbox
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap procps tmux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
ENV ATROPOS_SANDBOX_HOST=0.0.0.0
EXPOSE 8080
USER root
CMD ["python", "-m", "atropos_agent.sandbox"]

# The executor service, for TOOL_EXECUTOR_BACKEND=nomad: its sandboxes run elsewhere, so it
# needs no bubblewrap and no root.
FROM base AS executor
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent atropos
ENV TOOL_EXECUTOR_HOST=0.0.0.0
EXPOSE 9001
USER 10001
CMD ["atropos-tool-executor", "serve"]
