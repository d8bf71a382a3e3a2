#!/usr/bin/env bash
# Install the Debian packages whose command is missing (the Makefile's *-deps targets).
#
#   apt_missing.sh CHECK:PACKAGE ...
#
# CHECK is a command looked up on PATH (and in /usr/sbin, where iptables and ip live) or an
# absolute path that must be executable. Installs only as root; otherwise prints the
# apt-get line to run and exits 1. Does nothing when everything is there.
set -euo pipefail
missing=""
for spec in "$@"; do
  check=${spec%%:*}
  pkg=${spec#*:}
  if [[ $check == /* ]]; then
    [ -x "$check" ] && continue
  else
    command -v "$check" >/dev/null 2>&1 && continue
    [ -x "/usr/sbin/$check" ] && continue
  fi
  missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing:$missing; install them: sudo apt-get install -y$missing" >&2
  exit 1
fi
echo "installing:$missing"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
