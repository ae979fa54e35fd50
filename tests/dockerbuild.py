"""docker-archives for tests, shaped like ``podman save --format docker-archive`` writes them.

``DockerArchive`` holds the archive's files, symlinks and manifest.json as plain values, so a test
damages one thing (a layer's bytes, a path in manifest.json, a symlink's target) and writes the
tar with tests/tarbuild.py's member writer. The shape follows podman's output: each layer once as
``<diff_id hex>.tar``, the config as ``<sha256 hex>.json``, and the legacy ``<id>/layer.tar``
symlinks (``../<hex>.tar``) that older ``docker save`` also names in manifest.json.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tarbuild import Member, file_member, link_member, write_archive


def layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar of ``files`` (path -> content), deterministic."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def config_json(diff_ids: list[str], arch: str = "amd64") -> bytes:
    """A minimal image config (config.md) with these ``rootfs.diff_ids``."""
    obj = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class DockerArchive:
    """A docker-archive as values: files (name -> bytes), symlinks (name -> target), manifest.json."""

    files: dict[str, bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    manifest: list[Any] = field(default_factory=list)

    def add_image(
        self,
        layers: list[bytes],
        tags: list[str],
        *,
        compress: bool = False,
        via_symlink: bool = False,
        arch: str = "amd64",
    ) -> dict[str, Any]:
        """Add an image of these uncompressed layer tars; returns its manifest.json entry.

        ``compress`` stores the layers gzip-compressed (the diff_ids stay those of the tars);
        ``via_symlink`` names each layer in manifest.json by a ``<id>/layer.tar`` symlink.
        """
        names = []
        for data in layers:
            hexd = sha256(data)
            stored = gzip.compress(data, mtime=0) if compress else data
            name = f"{hexd}.tar"
            self.files[name] = stored
            if via_symlink:
                link = f"{sha256(hexd.encode())}/layer.tar"
                self.symlinks[link] = f"../{name}"
                name = link
            names.append(name)
        config = config_json([f"sha256:{sha256(d)}" for d in layers], arch)
        config_name = f"{sha256(config)}.json"
        self.files[config_name] = config
        entry: dict[str, Any] = {"Config": config_name, "RepoTags": tags, "Layers": names}
        self.manifest.append(entry)
        return entry

    def members(self) -> list[Member]:
        """The tar members: layers and configs, the symlinks, then manifest.json (as podman orders them)."""
        out = [file_member(name, data) for name, data in self.files.items()]
        out += [link_member(name, target, tarfile.SYMTYPE) for name, target in self.symlinks.items()]
        out.append(file_member("manifest.json", json.dumps(self.manifest).encode()))
        return out

    def write(self, path: Path, *, manifest_bytes: bytes | None = None) -> Path:
        """Write the archive; ``manifest_bytes`` replaces manifest.json's content as it is."""
        members = self.members()
        if manifest_bytes is not None:
            members[-1] = file_member("manifest.json", manifest_bytes)
        return write_archive(path, members)


def two_images() -> DockerArchive:
    """Two images sharing a base layer, the second naming its layers through symlinks."""
    d = DockerArchive()
    base = layer_tar({"bin/tool": b"#!/bin/sh\necho base\n", "etc/motd": b"hello\n"})
    top = layer_tar({"app/data.txt": b"application data\n" * 100})
    d.add_image([base], ["localhost/base:latest"])
    d.add_image([base, top], ["localhost/app:v1", "example.com/team/app:1.0"], via_symlink=True)
    return d
