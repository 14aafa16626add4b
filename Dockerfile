# syntax=docker/dockerfile:1
# One image for the supervisor and the worker: `taskloom supervisor ...`,
# `taskloom worker ...`. Build: docker build -t taskloom:0.1.0 .
# The build stage installs taskloom and its dependencies into a virtualenv;
# the final stage copies only that virtualenv onto the same slim base, so it
# holds no compiler, no pip, no sources and runs as an unprivileged user.
# tests/test_image.py installs the same way into a clean virtualenv and runs
# it, since no container engine runs in CI.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY core/ core/
COPY client/ client/
COPY worker/ worker/
COPY supervisor/ supervisor/
RUN python -m venv /opt/taskloom \
    && /opt/taskloom/bin/pip install --no-cache-dir /src \
    && /opt/taskloom/bin/pip uninstall --yes pip setuptools \
    && find /opt/taskloom -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="taskloom" \
      org.opencontainers.image.description="LLM-planned supervisor-worker cluster for agentic tasks" \
      org.opencontainers.image.source="https://github.com/taskloom/taskloom" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 taskloom \
    && useradd --system --uid 10001 --gid taskloom --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin taskloom
COPY --from=build /opt/taskloom /opt/taskloom
ENV PATH=/opt/taskloom/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TASKLOOM_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
# gRPC, Prometheus metrics, plaintext health for probes
EXPOSE 50051 9090 9091
ENTRYPOINT ["taskloom"]
CMD ["--help"]
