# syntax=docker/dockerfile:1
# dstream-fleet image: `dstream coordinator|worker ...` (the runtime; no tooling).
# The Helm chart runs it as user 10001 with a read-only root filesystem and /tmp as emptyDir.
#
# Build: `docker build -t dstream-fleet:0.1.0 .` (or `podman build`).
# Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 (>= 3.11), python3-venv and useradd
#               (default python:3.11-slim). `make deploy-test` builds one from Debian's
#               packages (ops/tools/devkit/build_base_image.sh), where Docker Hub is unreachable.
#   WHEELHOUSE  a folder in the build context holding the project's wheel and every
#               dependency's (`pip wheel . -w .wheelhouse`); when set, pip installs from it
#               only (--no-index), so the build needs no network. Empty (default): pip
#               installs the project from the context and its dependencies from PyPI.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG WHEELHOUSE=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
# A venv at the same path in both stages, so its scripts and paths stay valid when copied.
# The image runs the fleet only: the tooling (ops/tools: dev services, load harness,
# verify, demo, devkit) is removed, and `dstream` then offers `coordinator` and `worker`.
RUN python3 -m venv /opt/dstream \
    && if [ -n "$WHEELHOUSE" ]; then \
         /opt/dstream/bin/pip install --no-index --find-links "$WHEELHOUSE" dstream-fleet; \
       else \
         /opt/dstream/bin/pip install .; \
       fi \
    && rm -rf /opt/dstream/lib/python3*/site-packages/ops/tools

FROM ${BASE_IMAGE}
# DSTREAM_BIND_HOST: every role listens on all interfaces in a container (the runtime's
#   default is 127.0.0.1, right for `dstream run` on one host), on the fixed ports below.
# MALLOC_ARENA_MAX: fewer glibc arenas, so the memory worker threads free is reused
ENV PATH=/opt/dstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    DSTREAM_BIND_HOST=0.0.0.0
RUN groupadd --system --gid 10001 dstream \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/dstream --create-home \
       --shell /usr/sbin/nologin dstream
COPY --from=build /opt/dstream /opt/dstream
USER 10001:10001
WORKDIR /home/dstream
# The default ports (ops/config.py): coordinator RPC 7070 and HTTP 8080, worker RPC 7071
# and HTTP 8081 (DSTREAM_RPC_PORT, DSTREAM_HTTP_PORT).
EXPOSE 7070 8080 7071 8081
ENTRYPOINT ["dstream"]
CMD ["--help"]
