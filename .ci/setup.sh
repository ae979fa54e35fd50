#!/usr/bin/env bash
# Install what ocifuse needs on a fresh Debian/Ubuntu machine, then a venv in .venv with ocifuse in it.
# Sourced by .ci/run (the test suite) and .ci/sample (the demo); safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS="libfuse3-dev fuse3 pkg-config gcc python3-dev python3-venv tar skopeo umoci oci-image-tool"
# The rootfs tests run programs from the mount: chroot (coreutils), bwrap, podman with runc.
PKGS="$PKGS busybox-static bubblewrap podman runc"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
