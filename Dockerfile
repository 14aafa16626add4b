# syntax=docker/dockerfile:1
# One image for the supervisor and the worker: `taskloom supervisor ...`,
# `taskloom worker ...`. Build: `make image` (docker build -t taskloom:0.1.0 .).
# Reproducible: the base image is pinned by digest, every dependency by
# version and hash (requirements/*.txt, made by `make lock`, installed with
# --require-hashes), and taskloom itself is built from these sources by a
# hash-pinned hatchling in a virtualenv of its own. The final stage copies
# only the runtime virtualenv onto the same base, removes the base's own pip,
# and runs unprivileged: no compiler, no pip, no sources.
# tests/test_image.py installs the same way into a clean virtualenv and runs
# it, since no container engine runs in CI.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/ requirements/
RUN python -m venv /opt/taskloom \
    && /opt/taskloom/bin/pip install --no-cache-dir --require-hashes --no-deps \
       -r requirements/server.txt \
    && python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes --no-deps \
       -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY core/ core/
COPY client/ client/
COPY worker/ worker/
COPY supervisor/ supervisor/
RUN /opt/build/bin/python -m hatchling build --target wheel --directory /src/dist \
    && /opt/taskloom/bin/pip install --no-cache-dir --no-deps /src/dist/taskloom-*.whl \
    && /opt/taskloom/bin/pip uninstall --yes pip setuptools \
    && find /opt/taskloom -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="taskloom" \
      org.opencontainers.image.description="LLM-planned supervisor-worker cluster for agentic tasks" \
      org.opencontainers.image.source="https://github.com/taskloom/taskloom" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own pip (and setuptools, wheel) go: nothing installs here.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
    && groupadd --system --gid 10001 taskloom \
    && useradd --system --uid 10001 --gid taskloom --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin taskloom
COPY --from=build /opt/taskloom /opt/taskloom
ENV PATH=/opt/taskloom/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TASKLOOM_LOG_FORMAT=json \
    TASKLOOM_METRICS_PORT=9090
USER 10001:10001
WORKDIR /tmp
# gRPC, Prometheus metrics, plaintext health for probes
EXPOSE 50051 9090 9091
# Both roles serve /metrics; Kubernetes uses its own probes instead.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["taskloom", "health"]
ENTRYPOINT ["taskloom"]
CMD ["--help"]
