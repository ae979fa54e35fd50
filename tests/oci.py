"""A tiny OCI layout writer for tests: blobs, manifests, indexes, then a directory or a tar."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocifuse import model

Json = dict[str, Any]


@dataclass
class LayoutBuilder:
    """Collects files of a layout in memory; ``write_dir`` and ``write_tar`` lay them out."""

    algorithm: str = "sha256"
    files: dict[str, bytes] = field(default_factory=dict)
    index_manifests: list[Json] = field(default_factory=list)
    layout_version: str | None = "1.0.0"

    def blob(self, data: bytes, media_type: str = "application/octet-stream", **extra: Any) -> Json:
        """Store ``data`` as a blob; return its descriptor (``extra`` fields are added to it)."""
        digest = f"{self.algorithm}:{hashlib.new(self.algorithm, data).hexdigest()}"
        self.files[f"blobs/{self.algorithm}/{digest.split(':', 1)[1]}"] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def json_blob(self, obj: Json, media_type: str, **extra: Any) -> Json:
        """Store a JSON document as a blob; return its descriptor."""
        return self.blob(json.dumps(obj, sort_keys=True).encode(), media_type, **extra)

    def image(
        self,
        layers: list[bytes] | None = None,
        *,
        os_: str = "linux",
        arch: str = "amd64",
        config: Json | None = None,
        subject: Json | None = None,
        artifact_type: str | None = None,
        **extra: Any,
    ) -> Json:
        """Store config, layers and an image manifest; return the manifest's descriptor."""
        cfg = (
            config
            if config is not None
            else {
                "architecture": arch,
                "os": os_,
                "rootfs": {"type": "layers", "diff_ids": []},
                "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "Labels": {"a": "b"}},
            }
        )
        manifest: Json = {
            "schemaVersion": 2,
            "mediaType": model.MEDIA_MANIFEST,
            "config": self.json_blob(cfg, model.MEDIA_CONFIG),
            "layers": [self.blob(b, "application/vnd.oci.image.layer.v1.tar") for b in layers or []],
        }
        if subject is not None:
            manifest["subject"] = subject
        if artifact_type is not None:
            manifest["artifactType"] = artifact_type
        return self.json_blob(manifest, model.MEDIA_MANIFEST, **extra)

    def index(self, manifests: list[Json], **extra: Any) -> Json:
        """Store an image index over ``manifests``; return its descriptor."""
        doc = {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": manifests}
        return self.json_blob(doc, model.MEDIA_INDEX, **extra)

    def tag(self, desc: Json, name: str | None) -> Json:
        """Add ``desc`` to index.json under ref ``name`` (None: no ref annotation)."""
        entry = dict(desc)
        if name is not None:
            entry["annotations"] = {model.REF_NAME: name}
        self.index_manifests.append(entry)
        return entry

    def layout_files(self) -> dict[str, bytes]:
        """Every file of the layout, oci-layout and index.json included."""
        out = {}
        if self.layout_version is not None:
            out["oci-layout"] = json.dumps({"imageLayoutVersion": self.layout_version}).encode()
        out["index.json"] = json.dumps(
            {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": self.index_manifests}
        ).encode()
        out.update(self.files)
        return out

    def write_dir(self, root: Path) -> Path:
        """Write the layout as a directory tree at ``root``."""
        for name, data in self.layout_files().items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return root

    def write_tar(
        self, path: Path, *, fmt: int = tarfile.PAX_FORMAT, prefix: str = "", dirs: bool = True
    ) -> Path:
        """Write the layout as an oci-archive; ``prefix`` (e.g. ``./``) goes before each name."""
        files = self.layout_files()
        with tarfile.open(path, "w", format=fmt) as tf:
            for name, is_dir in parents_first(files, dirs=dirs):
                info = tarfile.TarInfo(prefix + name)
                if is_dir:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tf.addfile(info)
                    continue
                info.size = len(files[name])
                info.mode = 0o644
                info.mtime = 1_700_000_000
                tf.addfile(info, io.BytesIO(files[name]))
        return path


def parents_first(names: Iterable[str], *, dirs: bool = True) -> Iterator[tuple[str, bool]]:
    """Each of ``names`` as ``(name, False)``, after ``(directory, True)`` for each directory above it
    not named yet (none if ``dirs`` is false): the order in which tar writes a tree."""
    done: set[str] = set()
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if dirs and d not in done:
                done.add(d)
                yield d, True
        yield name, False
