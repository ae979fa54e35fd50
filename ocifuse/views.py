"""The one front door: (path, options) -> a view, the same for mount, --rootfs, fsck, inspect and the API.

Every command opens what it reads here, with one ``ViewOptions``: the same cache, limits, ref and
platform resolution, and the same one-line refusal for input that holds no image. Which view a
path is, is decided here and only here:

- a directory: a layout directory (``DirectoryLayout``);
- a file holding an OCI layout (``oci-layout``, ``index.json``): ``ArchiveLayout``;
- a file holding a docker-archive (``manifest.json``, no ``oci-layout``): ``DockerLayout``, a
  view of its own over the archive;
- anything else: ``NotAnImage``;
- a URL (http://, https://, s3://): the archive it names, read by range (remote.py), as a file;

and, with ``rootfs``, the merged root filesystem of one image of that layout (image.py). An
archive's artifacts are asked of ``options.cache``, behind which ``options.index`` adds a
portable index when it is for this archive (portable.py). ``open_mount`` gives the daemon what
it serves: a tree and the reader of its entries.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .archive import Archive, FileOrigin, open_archive
from .dockerarchive import DOCKER_ARCHIVE, MANIFEST_JSON, DockerLayout, archive_format
from .entries import Sources
from .errors import LayoutOpenError, NotAnImage, OcifuseError
from .layout import INDEX_JSON, OCI_LAYOUT, ArchiveLayout, DirectoryLayout, Layout, TableLayout, ViewOptions
from .portable import RecordingStore, open_index, with_index
from .source import Origin
from .store import Store
from .tree import Tree
from .urls import is_url, redact

if TYPE_CHECKING:  # the rootfs view's modules are imported only for it: every mount pays for imports
    from .image import RootImage

log = logging.getLogger(__name__)

# The front door: ViewOptions lives in layout.py (image.py takes it too) and is offered here.
__all__ = ["MountView", "ViewOptions", "open_layout", "open_mount", "open_rootfs"]


def open_layout(path: str | os.PathLike[str], options: ViewOptions | None = None) -> Layout:
    """Open ``path`` as a layout: a directory, an oci-archive or a docker-archive (plain or compressed).

    Raises LayoutOpenError (NotAnImage for a tar that holds no image) with a one-line reason.
    """
    return _open(os.fspath(path), options or ViewOptions())[0]


def _open(path: str, options: ViewOptions) -> tuple[Layout, ViewOptions]:
    """The layout at ``path``, and the options its views open with (``cache``: with the index, if any)."""
    origin: Origin
    if is_url(path):  # an archive on a server (remote.py): read by range, never downloaded whole
        from .remote import RemoteObject  # the client (obstore, its threads) only for a URL

        blocks = None if isinstance(options.cache, RecordingStore) else options.cache  # blocks stay local
        origin = RemoteObject(path, options.remote, blocks)
    else:
        try:
            st = os.stat(path)
        except OSError as e:
            raise LayoutOpenError(path, e.strerror or str(e)) from e
        if stat.S_ISDIR(st.st_mode):
            if options.index is not None:
                log.warning("index %s not used: %s is a layout directory", options.index, path)
            return DirectoryLayout(path), options
        origin = FileOrigin(path)
    try:
        cache, key = _archive_store(origin, options)
    except BaseException:
        origin.close()
        raise
    archive = open_archive(origin, cache, rescan=options.rescan, limits=options.limits, key=key)
    try:
        return _archive_view(archive), replace(options, cache=cache)
    except BaseException:
        archive.close()
        raise


def _archive_store(origin: Origin, options: ViewOptions) -> tuple[Store | None, str | None]:
    """Where an archive's artifacts are loaded from and stored, and under which key (None: its identity).

    ``ocifuse index`` records them (portable.RecordingStore); ``options.index`` adds a portable
    index behind the cache when it is for this archive (else one warning, and it is not used).
    """
    cache = options.cache
    if isinstance(cache, RecordingStore):
        return cache, cache.bind(origin)
    if options.index is None:
        return cache, None
    index = open_index(options.index, options.remote)
    found = with_index(origin, cache, index) if index is not None else None
    if found is None:
        return cache, None
    return found


def _archive_view(archive: Archive) -> TableLayout:
    """The layout view of an open archive, by what it holds (never by its name)."""
    kind = archive_format(archive.table)
    if kind == DOCKER_ARCHIVE:
        return DockerLayout(archive)
    if kind is None and archive.table.get(INDEX_JSON) is None:
        raise NotAnImage(
            archive.path, f"not an image archive (no {OCI_LAYOUT}, {INDEX_JSON} or {MANIFEST_JSON})"
        )
    return ArchiveLayout(archive)  # an OCI layout; one without oci-layout is fsck's to report


def open_rootfs(path: str | os.PathLike[str], options: ViewOptions | None = None) -> RootImage:
    """The merged root filesystem of the image at ``path`` that ``options.ref``/``platform`` name."""
    from .image import open_image

    layout, options = _open(os.fspath(path), options or ViewOptions())
    try:
        return open_image(layout, options)
    except BaseException:
        layout.close()
        raise


@dataclass(frozen=True, slots=True)
class MountView:
    """What a mount serves: the tree, the reads of its entries, systemd's STATUS= line, its closer."""

    reader: Sources
    tree: Tree
    status: str
    close: Callable[[], None]


def open_mount(path: str, mountpoint: str, options: ViewOptions) -> MountView:
    """The view a mount of ``path`` on ``mountpoint`` serves: the layout, or (``rootfs``) one image's files.

    What is not served is logged as a warning, one line each. The layout view of a file must hold
    a servable image: an ``oci-layout`` file, or a docker-archive with an image (LayoutOpenError).
    """
    if options.rootfs:
        image = open_rootfs(path, options)
        for note in image.merged.notes:
            log.warning("not served: layer %d: %s: %s", note.layer, note.name, note.reason)
        tree = Tree(image.merged.entries, root=image.merged.root)
        digest = image.resolved.descriptor.digest
        shown = redact(path) if is_url(path) else path
        status = f"serving the root filesystem of {digest} from {shown} on {mountpoint}, {tree.files} files"
        return MountView(image.sources, tree, _one_line(status), image.close)
    layout = open_layout(path, options)
    try:
        if not isinstance(layout, TableLayout):
            raise LayoutOpenError(path, "a layout directory: mount it with --rootfs, or read it as it is")
        _check_servable(layout)
        archive = layout.archive
        for skipped in layout.skipped:
            log.warning("not served: %s: %s", skipped.name, skipped.reason)
        tree = Tree(layout.table, root_mtime=int(archive.origin.mtime))
        return MountView(layout.reader, tree, _status(layout, mountpoint, tree.files), layout.close)
    except BaseException:
        layout.close()
        raise


def _check_servable(layout: TableLayout) -> None:
    """Refuse (one line) a layout view with nothing a tool could read: no oci-layout, no docker image."""
    if isinstance(layout, DockerLayout):
        problems = layout.docker.problems
        if not layout.docker.images:  # one line: the first problem says why
            why = str(problems[0]) if problems else "manifest.json lists no image"
            raise LayoutOpenError(layout.path, f"docker-archive with no image to serve: {why}")
        for problem in problems:
            log.warning("not served from the docker-archive: %s: %s", problem.code, problem)
    elif not layout.has_file(OCI_LAYOUT):
        raise NotAnImage(layout.path, f"not an image archive (no {OCI_LAYOUT} file; ocifuse fsck says more)")


def _status(layout: Layout, mountpoint: str, files: int) -> str:
    """systemd's STATUS= line (sd_notify(3)): the archive, its refs (index.json), the mountpoint."""
    from .resolve import refs

    try:
        names = list(refs(layout))  # in index.json's order
    except OcifuseError as e:
        log.debug("no refs for the status line: %s", e)
        names = []
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return _one_line(
        f"serving {layout.path} ({f'refs {shown}' if names else 'no refs'}) on {mountpoint}, {files} files"
    )


def _one_line(text: str) -> str:
    """``text`` with every unprintable character (a newline in a ref name) as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)
