# syntax=docker/dockerfile:1
# dstream-fleet image: `dstream coordinator|worker|run|produce|status ...`.
# The Helm chart runs it as user 10001 with a read-only root filesystem and /tmp as emptyDir.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
# A venv at the same path in both stages, so its scripts and paths stay valid when copied.
RUN python -m venv /opt/dstream \
    && /opt/dstream/bin/pip install .

FROM python:3.11-slim
# MALLOC_ARENA_MAX: fewer glibc arenas, so the memory worker threads free is reused
ENV PATH=/opt/dstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2
RUN groupadd --system --gid 10001 dstream \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/dstream --create-home \
       --shell /usr/sbin/nologin dstream
COPY --from=build /opt/dstream /opt/dstream
USER 10001:10001
WORKDIR /home/dstream
# coordinator rpc/http, worker rpc/http
EXPOSE 7070 8080 7071 8081
ENTRYPOINT ["dstream"]
CMD ["--help"]
