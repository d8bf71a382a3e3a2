#!/usr/bin/env bash
# Build the project's image with podman from the top-level Dockerfile, offline.
#
# Usage: bash ops/tools/devkit/build_image.sh [IMAGE]     (default: localhost/dstream-fleet:<version>)
#
# 1. the base image from Debian's packages (ops/tools/devkit/build_base_image.sh, cached);
# 2. the project's wheel and every dependency's, built on the host with pip into
#    .wheelhouse/ (gitignored; pip's own cache keeps reruns quick), because TLS to PyPI
#    fails inside containers on the project's machines;
# 3. `podman build --build-arg BASE_IMAGE=... --build-arg WHEELHOUSE=.wheelhouse` with no
#    network (pip installs from the wheelhouse only).
# A user with Docker Hub builds the same Dockerfile without build arguments.
# Environment: PYTHON (the interpreter that runs pip; default .venv/bin/python, then python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
IMAGE="${1:-localhost/dstream-fleet:$VERSION}"
BASE="${DSTREAM_BASE_IMAGE:-localhost/dstream-base:bookworm}"
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)

bash ops/tools/devkit/build_base_image.sh "$BASE"

start=$SECONDS
rm -f .wheelhouse/dstream_fleet-*.whl
"$PY" -m pip wheel -q --disable-pip-version-check -w .wheelhouse . >&2
echo "build_image: wheels in $((SECONDS - start)) s" >&2

# runc sets the container's rlimits and this machine cannot raise them: pass values at or
# below the host's (runc was refused nproc=50000 under a host limit of 96365 here, so cap
# both at 16384, plenty for pip and for the fleet's processes).
cap() { local v="$1"; [[ "$v" == unlimited || "$v" -gt 16384 ]] && v=16384; echo "$v"; }
nofile="$(cap "$(ulimit -Sn)")"
nproc="$(cap "$(ulimit -Su)")"
# The host's Python (e.g. 3.11.7) may resolve environment markers differently from the
# image's (bookworm: 3.11.2; redis needs async-timeout below 3.11.3): resolve once more
# with the image's pip, offline, and add each requirement it misses until it has all.
run_base=("${PODMAN[@]}" run --rm --network none --ulimit "nofile=$nofile:$nofile"
    --ulimit "nproc=$nproc:$nproc" -v "$PWD/.wheelhouse:/wh:ro" "$BASE")
for _ in 1 2 3 4 5 6; do
    if out="$("${run_base[@]}" sh -c 'python3 -m venv /tmp/v && /tmp/v/bin/pip install -q \
            --disable-pip-version-check --no-index --find-links /wh --dry-run dstream-fleet' 2>&1)"; then
        break
    fi
    missing="$(grep -oP 'No matching distribution found for \K[^;]+' <<<"$out" | head -n1 || true)"
    if [[ -z "$missing" ]]; then
        echo "$out" >&2
        exit 1
    fi
    echo "build_image: the image's Python also needs '$missing'" >&2
    "$PY" -m pip wheel -q --disable-pip-version-check -w .wheelhouse "$missing" >&2
done

start=$SECONDS
# --layers=false: no intermediate images kept; the label finds this script's earlier
# builds, left untagged (dangling) by the new one, to remove them below.
"${PODMAN[@]}" build -q --network none --layers=false --label dstream-fleet.build=1 \
    --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" \
    --build-arg "BASE_IMAGE=$BASE" --build-arg WHEELHOUSE=.wheelhouse \
    -t "$IMAGE" -f Dockerfile . >&2
echo "build_image: $IMAGE built in $((SECONDS - start)) s" >&2
"${PODMAN[@]}" image prune -f --filter label=dstream-fleet.build=1 >/dev/null
echo "$IMAGE"
