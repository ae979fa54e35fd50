"""``ocifuse index ARCHIVE|URL -o FILE``: a portable index of an archive, for machines that mount it.

The archive is opened through the front door (views.py) with a ``portable.RecordingStore`` as its
cache, so the index holds exactly what the index cache would: the archive's entry table, its gzip
seek points or zstd frame table, a docker-archive's member digests, and for every image in it
(each platform of each index, not only this machine's: the machines of a fleet are of several
architectures, and the one that makes the index is seldom one of them) every layer's index and
table and the merged tree of ``--rootfs``. Each layer is decompressed once, its blob hashed
against its digest before anything built from it is kept (image.VerifiedStore), as a mount does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import replace

from .digest import Digest
from .errors import OcifuseError
from .image import LazyLayer, open_image
from .layout import Layout, TableLayout, ViewOptions
from .model import CONFIG_TYPES, Manifest
from .portable import ARCHIVE, RecordingStore
from .resolve import walk
from .store import TABLE
from .tablecodec import encode_table
from .units import human_size
from .urls import is_url, redact
from .views import open_layout

log = logging.getLogger(__name__)


def build_index(path: str, options: ViewOptions | None = None) -> tuple[RecordingStore, list[str]]:
    """Open ``path`` and every image in it as mounts would, recording what they store.

    Returns the recording and the images left out (one line each: why). Raises OcifuseError when
    ``path`` cannot be opened as an archive (a layout directory has no index: nothing to key it by).
    """
    recorder = RecordingStore()
    options = replace(options or ViewOptions(), cache=recorder, index=None, rescan=False)
    skipped: list[str] = []
    with contextlib.closing(open_layout(path, options)) as layout:
        if not isinstance(layout, TableLayout):
            raise OcifuseError(f"{path}: a layout directory; an index is made of an archive")
        # A small plain tar's table is not cached (scanning it is as quick), but over a URL it is worth it.
        if recorder.load(TABLE.kind, ARCHIVE) is None:
            recorder.store(TABLE.kind, ARCHIVE, encode_table(layout.archive.table))
        for digest in _images(layout):
            try:
                _record_image(layout, replace(options, ref=digest, platform=None))
            except OcifuseError as e:
                skipped.append(f"image {digest}: {e}")
    return recorder, skipped


def _images(layout: Layout) -> list[str]:
    """The digest of every image manifest reachable from index.json (each platform of each index).

    Artifacts (a signature, an SBOM: a manifest whose config is no image config) have no root
    filesystem: they are left out.
    """
    found: list[str] = []
    seen: set[Digest] = set()
    for top in layout.index().manifests:
        try:
            for desc, doc in walk(layout, top, _seen=seen):
                if isinstance(doc, Manifest) and doc.config.media_type in CONFIG_TYPES:
                    found.append(str(desc.digest))
        except OcifuseError as e:
            log.warning("not indexed: what %s leads to: %s", top.digest, e)
    return list(dict.fromkeys(found))


def _record_image(layout: Layout, options: ViewOptions) -> None:
    """Open one image's root filesystem (its tree, then every layer's index and table) into the recording."""
    image = open_image(layout, options)
    try:
        # A tree already recorded (an image listed twice) opens no layer: open each, so that its
        # index and table are recorded whatever the tree did.
        for layer in image.sources.sources:
            if isinstance(layer, LazyLayer):
                layer.table()
                layer.finish()
    finally:
        image.sources.close()  # not image.close(): the layout stays open for the next image


def main(path: str, output: str, options: ViewOptions | None = None) -> int:
    """``ocifuse index``: write the index of ``path`` to ``output``; 0 written, 2 unusable input."""
    shown = redact(path) if is_url(path) else path
    recorder, skipped = build_index(path, options)
    for line in skipped:
        log.warning("not indexed: %s", line)
    data = recorder.encode()
    tmp = f"{output}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OcifuseError(f"{output}: cannot write the index: {e.strerror or e}") from e
    kinds = Counter(kind for kind, _ in recorder.records)
    what = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    print(f"{output}: index of {shown} ({recorder.identity}): {human_size(len(data))}, {what}")
    return 1 if skipped else 0
