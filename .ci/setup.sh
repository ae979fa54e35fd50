#!/usr/bin/env bash
# Install what ocifuse needs on a fresh Debian/Ubuntu machine, then a venv in .venv with ocifuse in it.
#   bash .ci/setup.sh          the command only (what .ci/sample runs)
#   bash .ci/setup.sh test     also the test tools: pytest, hypothesis, mypy, ruff (what .ci/run runs)
# Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extra=""
case "${1:-}" in
  "") ;;
  test) extra="[test]" ;;
  *) echo "usage: $0 [test]" >&2; exit 2 ;;
esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS="libfuse3-dev fuse3 pkg-config gcc python3-dev python3-venv tar skopeo umoci oci-image-tool"
# The rootfs tests run programs from the mount: chroot (coreutils), bwrap, podman with runc.
PKGS="$PKGS busybox-static bubblewrap podman runc"
# The docker-archive tests build images with buildah and save them with podman.
PKGS="$PKGS buildah"
# Compressed archives and layers: the tools that make them in the tests.
PKGS="$PKGS gzip pigz zstd xz-utils bzip2"
# man ocifuse (man-db brings groff, which the tests lint the page with) and bash completion.
PKGS="$PKGS man-db bash-completion"
# The tests run the zsh completion in a zsh.
[ -z "$extra" ] || PKGS="$PKGS zsh"
# The eStargz tests convert an image with stargz-snapshotter's ctr-remote, through a containerd of their own.
[ -z "$extra" ] || PKGS="$PKGS containerd stargz-snapshotter"
# The remote tests serve archives over HTTP with an nginx of their own (127.0.0.1 only).
[ -z "$extra" ] || PKGS="$PKGS nginx"
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
  # The system's interpreter, which the apt packages above are for (python3-dev, python3-venv): the
  # first python3 on PATH may be a pyenv or conda one under a home directory other users cannot
  # enter, and then nobody else could run .venv/bin/ocifuse (a mount for another user, mount(8)).
  python=python3
  [ -x /usr/bin/python3 ] && python=/usr/bin/python3
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extra"
# Every command starts by importing ocifuse. An editable install leaves its modules uncompiled, and
# where PYTHONDONTWRITEBYTECODE is set no run writes them: each start would compile every module
# again (~30% of a mount's imports). Compiled here, once; a module changed since is compiled at
# import as usual (its .pyc no longer matches it).
.venv/bin/python -m compileall -q ocifuse

# The man page and the shell completion: for everyone as root; otherwise next to the venv's
# command, where man finds the page while .venv/bin is on PATH (docs/install.md says the rest).
share=$PWD/.venv/share
[ "$(id -u)" -ne 0 ] || share=/usr/local/share
install -D -m 0644 man/ocifuse.1 "$share/man/man1/ocifuse.1"
install -D -m 0644 completion/ocifuse.bash "$share/bash-completion/completions/ocifuse"
install -D -m 0644 completion/_ocifuse "$share/zsh/site-functions/_ocifuse"
if [ "$share" = /usr/local/share ] && command -v mandb >/dev/null; then
  mandb -q /usr/local/share/man 2>/dev/null || true # whatis and apropos; man ocifuse works without
fi
