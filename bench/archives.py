"""Build the bench's oci-archives in a scratch directory.

- ``big``: a real image made by ``umoci`` (one layer holding a 1 GiB random file, which umoci
  gzips: random data stays ~1 GiB) and written as an oci-archive by ``skopeo copy``.
- ``blobs5k``: 5,000 blobs: four 256 MiB random layers (the concurrent-reader test reads them)
  plus small random blobs spread over image manifests, written with ``tarfile``.
- ``entries100k``: 100,000 tar entries (small blobs, manifests, index), written with ``tarfile``.

Nothing here imports ocifuse: the bench measures the installed command from outside.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True, slots=True, kw_only=True)
class BuiltArchive:
    """An archive on disk, the tag to inspect, and the blobs the read tests use (largest first)."""

    path: Path
    tag: str
    entries: int
    big_blobs: tuple[str, ...]  # layout-relative paths, e.g. blobs/sha256/<hex>
    big_blob_size: int
    build_seconds: float
    size: int  # the archive's bytes, recorded so that the report outlives the scratch directory


class _TarWriter:
    """Write an OCI layout straight into a tar: oci-layout first, then blobs, then index.json."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed in close()
        self.entries = 0
        self.mtime = int(time.time())
        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = self.mtime
            self.tar.addfile(info)
            self.entries += 1
        self.file("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())

    def file(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = self.mtime
        self.tar.addfile(info, io.BytesIO(data))
        self.entries += 1

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        """Store ``data`` as a blob; return its descriptor."""
        digest = hashlib.sha256(data).hexdigest()
        self.file(f"blobs/sha256/{digest}", data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def image(
        self, layers: list[dict[str, object]], config: dict[str, object], ref: str | None
    ) -> dict[str, object]:
        """Write a manifest over ``layers``; return its descriptor (with a ref name if given)."""
        doc = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config, "layers": layers}
        desc = self.blob(json.dumps(doc).encode(), MEDIA_MANIFEST)
        if ref is not None:
            desc["annotations"] = {REF_NAME: ref}
        return desc

    def close(self, manifests: list[dict[str, object]]) -> None:
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests}
        self.file("index.json", json.dumps(index).encode())
        self.tar.close()


def _config(writer: _TarWriter) -> dict[str, object]:
    doc = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    return writer.blob(json.dumps(doc).encode(), MEDIA_CONFIG)


def build_many(
    path: Path, *, total_blobs: int, big_layers: int, big_mib: int, small_size: int, per_manifest: int
) -> BuiltArchive:
    """An archive of ``total_blobs`` blobs: ``big_layers`` random layers of ``big_mib`` MiB under
    the image tagged ``big``, the rest small random blobs under manifests of ``per_manifest`` layers.
    """
    start = time.perf_counter()
    w = _TarWriter(path)
    config = _config(w)
    big = [w.blob(os.urandom(big_mib * MIB), MEDIA_LAYER) for _ in range(big_layers)]
    manifests = [w.image(big, config, "big")]
    left = total_blobs - len(big) - 2  # the config and the big image's manifest
    n = 0
    while left > 1:
        count = min(per_manifest, left - 1)  # leave room for this manifest's own blob
        layers = [w.blob(os.urandom(small_size), MEDIA_LAYER) for _ in range(count)]
        n += 1
        manifests.append(w.image(layers, config, f"small{n}"))
        left -= count + 1
    w.close(manifests)
    big_paths = tuple(f"blobs/sha256/{str(d['digest']).split(':', 1)[1]}" for d in big)
    return BuiltArchive(
        path=path,
        tag="big",
        entries=w.entries,
        big_blobs=big_paths,
        big_blob_size=big_mib * MIB,
        build_seconds=time.perf_counter() - start,
        size=path.stat().st_size,
    )


def build_entries100k(path: Path) -> BuiltArchive:
    """The 100,001-entry archive: 99,997 blobs of 100 random bytes under manifests of 1,000 layers."""
    return build_many(path, total_blobs=99_997, big_layers=0, big_mib=0, small_size=100, per_manifest=1000)


def build_umoci(path: Path, scratch: Path, *, mib: int) -> BuiltArchive:
    """A real image: ``umoci insert`` of a ``mib`` MiB random file, then ``skopeo copy`` to an oci-archive."""
    start = time.perf_counter()
    layout = scratch / "umoci-layout"
    data = scratch / "random.bin"
    with open(data, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))

    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:big")
    run("umoci", "insert", "--image", f"{layout}:big", str(data), "/data/random.bin")
    run("skopeo", "copy", "-q", f"oci:{layout}:big", f"oci-archive:{path}:big")
    data.unlink()
    subprocess.run(["rm", "-rf", str(layout)], check=True)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    largest = max((m for m in members if m.isreg()), key=lambda m: m.size)
    return BuiltArchive(
        path=path,
        tag="big",
        entries=len(members),
        big_blobs=(largest.name.removeprefix("./"),),
        big_blob_size=largest.size,
        build_seconds=time.perf_counter() - start,
        size=path.stat().st_size,
    )
