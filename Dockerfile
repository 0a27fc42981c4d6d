# syntax=docker/dockerfile:1.7
#
# One image for every process of the pipeline: `ohs engine ...`, `ohs bridge`, `ohs worker`,
# `ohs api`, `ohs db migrate` (docker-compose.yml runs each as its own service).
#
#   docker build -t order-history-service:local .
#   docker run --rm order-history-service:local --help
#
# No JVM: Kafka and Cassandra are separate services (Redpanda and ScyllaDB in compose); the
# `ohs stack` launcher that fetches their jars is for machines without Docker.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Every dependency ships manylinux wheels for CPython 3.11 (librdkafka, libzmq, libev and
# RocksDB are bundled in them); the compiler is only a fallback for a pure sdist with an optional
# C extension, and it stays in this stage. It also builds the engine's optional C encoder
# (schemas/_avroc.c) and its core compiled by mypyc (setup.py), which the image always has (the
# checks below); neither needs a compiler or mypy at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change,
# not on every source edit.
WORKDIR /src
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --upgrade pip \
    && pip install -r /tmp/requirements.txt

# Then the project itself, as a regular (non-editable) install into the venv.
COPY README.md ./
COPY schemas ./schemas
COPY kit ./kit
COPY engine ./engine
COPY bridge ./bridge
COPY streams ./streams
COPY api ./api
COPY audit ./audit
COPY bench ./bench
COPY stack ./stack
COPY ohs ./ohs
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && cd / \
    && python -c "import api, audit, bench, bridge, engine, kit, ohs, schemas, schemas._avroc, stack, streams, streams.app" \
    && python -c "import engine; build = engine.core_build(); assert build.startswith('compiled'), build" \
    && ohs --help > /dev/null

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="order-history-service" \
      org.opencontainers.image.description="Order-history streaming service: engine -> ZeroMQ -> Kafka (Avro) -> Faust -> Cassandra/ScyllaDB, and its query API" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1

# A fixed, unprivileged uid/gid: named volumes mounted on /var/lib/ohs/* are created with this
# ownership from the image, and host bind mounts can be chowned to it.
RUN groupadd --system --gid 10001 ohs \
    && useradd --system --uid 10001 --gid ohs --home-dir /var/lib/ohs --shell /usr/sbin/nologin ohs \
    && mkdir -p /var/lib/ohs/engine /var/lib/ohs/worker \
    && chown -R ohs:ohs /var/lib/ohs

COPY --from=build /opt/venv /opt/venv

USER ohs:ohs
# Relative defaults (.ohs/engine/journal, ohs-worker-data) resolve here, in a writable directory.
WORKDIR /var/lib/ohs

# Documentation only: engine gateway/feed/replay, bridge metrics, worker web, API.
EXPOSE 5555 5556 5557 9464 6066 8080

ENTRYPOINT ["ohs"]
CMD ["--help"]
