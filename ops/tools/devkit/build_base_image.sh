#!/usr/bin/env bash
# Build a Debian bookworm base image for podman from Debian's packages (no registry needed).
#
# Usage: bash ops/tools/devkit/build_base_image.sh [IMAGE]   (default: localhost/dstream-base:bookworm)
#
# Docker Hub is not reachable on the project's machines, so the deployment test builds the
# project's Dockerfile FROM this image (`--build-arg BASE_IMAGE=...`). The image has
# python3 + venv (bookworm: Python 3.11) and `passwd` (useradd/groupadd for the Dockerfile).
# Idempotent: when IMAGE already exists in podman's store it does nothing. The debootstrap
# tarball is cached under ~/.cache/dstream-fleet, so a wiped podman store rebuilds fast.
# The mirror is the one apt is configured with (DSTREAM_DEBIAN_MIRROR overrides it).
set -euo pipefail

IMAGE="${1:-localhost/dstream-base:bookworm}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dstream-fleet/base-image"
TARBALL="$CACHE_DIR/bookworm-minbase.tar"
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)

if "${PODMAN[@]}" image exists "$IMAGE"; then
    echo "build_base_image: $IMAGE exists" >&2
    exit 0
fi

mirror="${DSTREAM_DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    # first deb.debian.org-style "debian" URI (not -security) that apt is configured with
    mirror="$(grep -hoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

mkdir -p "$CACHE_DIR"
if [[ ! -s "$TARBALL" ]]; then
    root="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    trap 'rm -rf "$root"' EXIT
    echo "build_base_image: debootstrap bookworm from $mirror (a few minutes the first time)" >&2
    start=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,passwd bookworm "$root" "$mirror" >&2
    # apt lists and caches are not needed in the image
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    echo "build_base_image: rootfs in $((SECONDS - start)) s" >&2
fi
"${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$TARBALL" "$IMAGE" >/dev/null
echo "build_base_image: imported $IMAGE" >&2
