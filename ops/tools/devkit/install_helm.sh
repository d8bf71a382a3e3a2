#!/usr/bin/env bash
# Build the pinned helm binary from the Go module proxy into a per-user cache dir.
#
# Usage: bash ops/tools/devkit/install_helm.sh      (prints the path of the helm binary)
#
# The tests find helm through $DSTREAM_HELM, then this cache dir, then PATH.
# A second run with the right version already built is a quick no-op.
set -euo pipefail

HELM_VERSION="${DSTREAM_HELM_VERSION:-v3.22.0}"
BIN_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dstream-fleet/bin"
HELM_BIN="$BIN_DIR/helm"

if [[ -x "$HELM_BIN" ]]; then
    have="$("$HELM_BIN" version --template '{{.Version}}' 2>/dev/null || true)"
    if [[ "$have" == "$HELM_VERSION" ]]; then
        echo "$HELM_BIN"
        exit 0
    fi
    echo "install_helm: found helm '${have:-unknown}' at $HELM_BIN, want $HELM_VERSION: rebuilding" >&2
fi

if ! command -v go >/dev/null 2>&1; then
    echo "install_helm: 'go' is not on PATH; helm is built with 'go install' (Go >= 1.24)" >&2
    exit 1
fi

mkdir -p "$BIN_DIR"
echo "install_helm: building helm $HELM_VERSION with $(go version) (takes a few minutes the first time)" >&2
start=$SECONDS
# helm reports its version from ldflags; 'go install pkg@version' does not set them, so
# pass the same ones helm's Makefile does, or `helm version` would say v3.x-dev-ish.
GOBIN="$BIN_DIR" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false" go install \
    -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
echo "install_helm: built in $((SECONDS - start)) s: $("$HELM_BIN" version --short)" >&2
echo "$HELM_BIN"
