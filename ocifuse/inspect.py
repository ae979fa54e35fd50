"""``ocifuse inspect``: what a layout holds — refs, platforms, and the images they resolve to.

``summarize`` is pure: it takes an open Layout and returns a Summary of frozen dataclasses; the
text and JSON renderers and the exit status live beside it. Without ``--ref`` and ``--platform``,
every index.json entry is resolved for this machine's platform; an entry that has no manifest for
it is listed with the reason instead of failing the command (nothing specific was asked for).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import model, resolve
from .cache import IndexCache
from .digest import Digest
from .dockerarchive import docker_view
from .errors import LayoutOpenError, NotFound, OcifuseError, PlatformNotFound
from .layout import Layout
from .model import Descriptor, Platform
from .units import human_size
from .views import ViewOptions, open_layout


@dataclass(frozen=True, slots=True, kw_only=True)
class Blob:
    """A descriptor as inspect shows it: media type, digest, size."""

    media_type: str
    digest: str
    size: int

    @classmethod
    def of(cls, desc: Descriptor) -> Blob:
        """The summary of ``desc``."""
        return cls(media_type=desc.media_type, digest=str(desc.digest), size=desc.size)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformEntry:
    """One entry of an index (``depth`` 0 is the index a ref names, 1 an index nested in it, ...)."""

    platform: str | None
    media_type: str
    digest: str
    size: int
    depth: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RefEntry:
    """One entry of index.json: its ref name (if any), what it points to, and an index's platforms."""

    name: str | None
    media_type: str
    digest: str
    size: int
    platforms: tuple[PlatformEntry, ...] = ()
    error: str | None = None  # why an index's platforms could not be listed


@dataclass(frozen=True, slots=True, kw_only=True)
class Referrer:
    """A manifest whose ``subject`` is an image's manifest (or an index on the way to it)."""

    subject: str
    media_type: str
    digest: str
    size: int
    artifact_type: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """A resolved image: its manifest, the indexes walked through, config, layers, referrers."""

    ref: str | None
    platform: str | None
    manifest: Blob
    via: tuple[Blob, ...]
    config: Blob
    image_config: model.ImageConfig | None
    config_error: str | None
    layers: tuple[Blob, ...]
    total_size: int  # manifest + config + layers: the bytes the image occupies in the layout
    referrers: tuple[Referrer, ...]
    referrers_error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unresolved:
    """An index.json entry (or a ``--ref``) with no image for the platform asked for, and why."""

    ref: str | None
    digest: str | None  # None for a --ref that names nothing in the layout
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """Everything ``ocifuse inspect`` shows."""

    path: str
    compression: str  # how the archive is stored: plain, gzip, zstd
    layout_version: str | None
    platform: str  # the platform images were resolved for
    refs: tuple[RefEntry, ...]
    images: tuple[Image, ...]
    unresolved: tuple[Unresolved, ...] = ()
    error: str | None = None  # what was asked for (--ref, --platform) and is not there: exit 1
    format: str = "oci-layout"  # "oci-layout" (a directory), "oci-archive" or "docker-archive"
    problems: tuple[str, ...] = ()  # what a docker-archive could not serve ("code: message")

    def to_json(self) -> dict[str, Any]:
        """The summary as one JSON object (``--json``)."""
        return dataclasses.asdict(self)


def _platforms(
    layout: Layout, desc: Descriptor, depth: int = 0, seen: set[str] | None = None
) -> list[PlatformEntry]:
    """The entries of the index ``desc`` and of the indexes nested in it, depth first.

    A nested index listed more than once is expanded only the first time (linear, not exponential).
    """
    seen = set() if seen is None else seen
    if str(desc.digest) in seen:
        return []
    seen.add(str(desc.digest))
    if depth > resolve.MAX_DEPTH:
        raise NotFound(f"indexes nested deeper than {resolve.MAX_DEPTH} levels at {desc.digest}")
    doc = layout.document(desc)
    if not isinstance(doc, model.Index):
        return []
    out: list[PlatformEntry] = []
    for child in doc.manifests:
        out.append(
            PlatformEntry(
                platform=None if child.platform is None else str(child.platform),
                media_type=child.media_type,
                digest=str(child.digest),
                size=child.size,
                depth=depth,
            )
        )
        if child.media_type in model.INDEX_TYPES:
            out.extend(_platforms(layout, child, depth + 1, seen))
    return out


def _ref_entry(layout: Layout, desc: Descriptor) -> RefEntry:
    platforms: list[PlatformEntry] = []
    error = None
    if desc.media_type in model.INDEX_TYPES:
        try:
            platforms = _platforms(layout, desc)
        except OcifuseError as e:
            error = str(e)
    return RefEntry(
        name=desc.ref_name,
        media_type=desc.media_type,
        digest=str(desc.digest),
        size=desc.size,
        platforms=tuple(platforms),
        error=error,
    )


def _artifact_type(layout: Layout, desc: Descriptor) -> str | None:
    """manifest.md "artifactType": the manifest's own, else its config's media type."""
    if desc.artifact_type is not None:
        return desc.artifact_type
    try:
        doc = layout.document(desc)
    except OcifuseError:
        return None
    if isinstance(doc, model.Manifest):
        return doc.artifact_type or doc.config.media_type
    return None if doc is None else doc.artifact_type


class _Referrers:
    """The layout's referrer index, made on first use and shared by every image of one summary."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._index: dict[Digest, list[tuple[Descriptor, str | None]]] | None = None
        self._error: OcifuseError | None = None

    def of(self, subject: Digest) -> list[Descriptor]:
        """The referrers of ``subject``; the index's error (an unreadable document) if it has one."""
        if self._index is None and self._error is None:
            try:
                self._index = resolve.referrer_index(self._layout)
            except OcifuseError as e:
                self._error = e
        if self._error is not None:
            raise self._error
        return resolve.referrers(self._layout, subject, index=self._index)


def _image(layout: Layout, found: resolve.Resolved, ref: str | None, referrers_of: _Referrers) -> Image:
    m = found.manifest
    image_config = None
    config_error = None
    if m.config.media_type in model.CONFIG_TYPES:
        name = f"config {m.config.digest}"
        try:
            image_config = model.ImageConfig.from_json(name, model.loads(name, layout.read_blob(m.config)))
        except OcifuseError as e:
            config_error = str(e)
    if image_config is not None and image_config.os and image_config.architecture:
        plat: str | None = str(
            Platform(os=image_config.os, architecture=image_config.architecture, variant=image_config.variant)
        )
    else:
        plat = None if found.descriptor.platform is None else str(found.descriptor.platform)
    referrers: list[Referrer] = []
    referrers_error = None
    subjects = [d.digest for d in found.trail] + [found.descriptor.digest]
    try:
        for subject in dict.fromkeys(subjects):
            for r in referrers_of.of(subject):
                referrers.append(
                    Referrer(
                        subject=str(subject),
                        media_type=r.media_type,
                        digest=str(r.digest),
                        size=r.size,
                        artifact_type=_artifact_type(layout, r),
                    )
                )
    except OcifuseError as e:
        referrers_error = str(e)
    return Image(
        ref=ref,
        platform=plat,
        manifest=Blob.of(found.descriptor),
        via=tuple(Blob.of(d) for d in found.trail),
        config=Blob.of(m.config),
        image_config=image_config,
        config_error=config_error,
        layers=tuple(Blob.of(d) for d in m.layers),
        total_size=found.descriptor.size + m.config.size + sum(d.size for d in m.layers),
        referrers=tuple(referrers),
        referrers_error=referrers_error,
    )


def _why_not(error: OcifuseError, path: str) -> str:
    """Why an entry has no image: for a platform, the platforms it does have (resolve says them)."""
    if isinstance(error, PlatformNotFound):
        return error.why
    if not isinstance(error, NotFound):
        return f"{error} (ocifuse fsck {path} checks the whole layout)"
    return str(error)


def _entry_for(refs: tuple[RefEntry, ...], ref: str | None) -> RefEntry | None:
    """The index.json entry ``ref`` names (a unique ref name or a top-level digest; None: the only one)."""
    if ref is None:
        return refs[0] if len(refs) == 1 else None
    named = [r for r in refs if r.name == ref] or [r for r in refs if r.digest == ref]
    return named[-1] if named else None  # resolve.refs: the last of duplicate names wins


def summarize(layout: Layout, *, ref: str | None = None, platform: Platform | None = None) -> Summary:
    """Summarize a layout: every ref, the platforms of each index, and the images asked for.

    With ``ref``, that ref (a name or a digest) is resolved; with only ``platform``, every
    index.json entry is resolved for it and at least one must have it. With neither, every entry
    is resolved for this machine's platform, and entries without it are listed as unresolved.
    What was asked for and is not there never hides the rest: it is listed as unresolved, with
    the platforms there are, and ``Summary.error`` says why in one line (the command exits 1).
    Raises OcifuseError only when index.json itself is unusable.
    """
    try:
        version: str | None = layout.header().image_layout_version
    except OcifuseError:
        version = None
    index = layout.index()
    want = platform or resolve.host_platform()
    refs = tuple(_ref_entry(layout, d) for d in index.manifests)
    referrers_of = _Referrers(layout)
    images: list[Image] = []
    unresolved: list[Unresolved] = []
    error = None
    if ref is not None or (len(index.manifests) == 1 and platform is not None):
        entry = _entry_for(refs, ref)
        name = ref if ref is not None else index.manifests[0].ref_name
        label = name or (entry.digest if entry is not None else "the only image")
        try:
            img = _image(layout, resolve.resolve(layout, ref, platform), name, referrers_of)
        except OcifuseError as e:
            why = _why_not(e, layout.path)
            unresolved.append(Unresolved(ref=name, digest=None if entry is None else entry.digest, error=why))
            error = why if entry is None else f"{label}: {why}"
        else:
            images.append(img)
    else:
        names = collections.Counter(d.ref_name for d in index.manifests)  # not list.count: n**2
        # Entries of one digest (an image's tags) resolve to one image: resolved once, not per tag.
        done: dict[str, Image | OcifuseError] = {}
        for desc in index.manifests:
            name = desc.ref_name
            # A unique ref name says which entry; otherwise the digest does.
            target = name if name is not None and names[name] == 1 else str(desc.digest)
            found = done.get(str(desc.digest))
            if found is None:
                try:
                    found = _image(layout, resolve.resolve(layout, target, platform), name, referrers_of)
                except OcifuseError as e:
                    found = e
                done[str(desc.digest)] = found
            if isinstance(found, OcifuseError):
                why = _why_not(found, layout.path)
                unresolved.append(Unresolved(ref=name, digest=str(desc.digest), error=why))
                continue
            images.append(dataclasses.replace(found, ref=name))
        if platform is not None and not images:
            shown = [f"{u.ref or u.digest}: {u.error}" for u in unresolved[:4]]
            more = f"; and {len(unresolved) - 4} more" if len(unresolved) > 4 else ""
            listing = f" ({'; '.join(shown)}{more})" if shown else " (index.json lists nothing)"
            error = f"no image for {want} in {layout.path}{listing}"
    docker = docker_view(layout)
    return Summary(
        path=layout.path,
        compression=layout.compression,
        layout_version=version,
        platform=str(want),
        refs=refs,
        images=tuple(images),
        unresolved=tuple(unresolved),
        error=error,
        format=layout.format,
        problems=tuple(f"{p.code}: {p}" for p in (docker.problems if docker is not None else ())),
    )


# -- output ----------------------------------------------------------------------------------------

_KINDS = {
    model.MEDIA_INDEX: "index",
    model.MEDIA_MANIFEST: "manifest",
    model.DOCKER_LIST: "docker-list",
    model.DOCKER_MANIFEST: "docker-manifest",
}


def _kind(media_type: str) -> str:
    return _KINDS.get(media_type, media_type)


def _table(rows: list[list[str]], indent: str = "  ") -> Iterator[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        yield (indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip()


def _image_lines(img: Image) -> Iterator[str]:
    yield f"image {img.ref or img.manifest.digest} ({img.platform or 'platform unknown'})"
    yield f"  manifest    {img.manifest.digest}  {img.manifest.media_type}  {human_size(img.manifest.size)}"
    for via in img.via:
        yield f"  via         {via.digest}  {_kind(via.media_type)}"
    yield f"  config      {img.config.digest}  {img.config.media_type}  {human_size(img.config.size)}"
    if img.config_error:
        yield f"  config      unreadable: {img.config_error}"
    cfg = img.image_config
    if cfg is not None:
        if cfg.created:
            yield f"  created     {cfg.created}"
        if cfg.author:
            yield f"  author      {cfg.author}"
        if cfg.user:
            yield f"  user        {cfg.user}"
        if cfg.working_dir:
            yield f"  workdir     {cfg.working_dir}"
        if cfg.entrypoint is not None:
            yield f"  entrypoint  {json.dumps(list(cfg.entrypoint))}"
        if cfg.cmd is not None:
            yield f"  cmd         {json.dumps(list(cfg.cmd))}"
        for i, env in enumerate(cfg.env):
            yield f"  {'env' if i == 0 else '':<10}  {env}"
        for i, (k, v) in enumerate(sorted(cfg.labels.items())):
            yield f"  {'labels' if i == 0 else '':<10}  {k}={v}"
    layer_bytes = sum(layer.size for layer in img.layers)
    yield f"  layers      {len(img.layers)}, {human_size(layer_bytes)}"
    if img.layers:
        yield from _table(
            [[lay.digest, lay.media_type, human_size(lay.size)] for lay in img.layers], indent="    "
        )
    yield f"  total size  {human_size(img.total_size)} ({img.total_size} bytes)"
    if img.referrers:
        yield f"  referrers   {len(img.referrers)}"
        yield from _table(
            [[r.digest, r.artifact_type or r.media_type, human_size(r.size)] for r in img.referrers],
            indent="    ",
        )
    if img.referrers_error:
        yield f"  referrers   unavailable: {img.referrers_error}"


def render_text(summary: Summary) -> Iterator[str]:
    """Lines of the human summary: the ref table, each index's platforms, then each image."""
    version = f"oci-layout {summary.layout_version}" if summary.layout_version else "no valid oci-layout"
    if summary.format == "docker-archive":
        version = f"docker-archive, served as {version}"
    stored = "" if summary.compression == "plain" else f", {summary.compression}-compressed"
    yield f"{summary.path} ({version}{stored})"
    yield ""
    rows = [["REF", "TYPE", "DIGEST", "SIZE"]]
    for r in summary.refs:
        rows.append([r.name or "-", _kind(r.media_type), r.digest, human_size(r.size)])
        for p in r.platforms:
            pad = "  " * (p.depth + 1)
            rows.append([f"{pad}{p.platform or '-'}", _kind(p.media_type), p.digest, human_size(p.size)])
        if r.error:
            rows.append(["  (unreadable)", r.error, "", ""])
    if len(rows) == 1:
        rows.append(["(index.json lists nothing)", "", "", ""])
    yield from _table(rows, indent="")
    for img in summary.images:
        yield ""
        yield from _image_lines(img)
    if summary.unresolved:
        yield ""
        for u in summary.unresolved:
            yield f"not resolved for {summary.platform}: {u.ref or u.digest}: {u.error}"
    if summary.problems:
        yield ""
        for problem in summary.problems:
            yield f"not served from the docker-archive: {problem}"


def render_json(summary: Summary) -> str:
    """The ``--json`` summary."""
    return json.dumps(summary.to_json(), indent=2)


def main(
    path: str,
    *,
    ref: str | None,
    platform: str | None,
    as_json: bool,
    cache: IndexCache | None = None,
    index: str | None = None,
) -> int:
    """``ocifuse inspect``: 0 shown, 1 the ref or platform is not there, 2 PATH is not a usable layout.

    The archive's table comes from ``cache`` when stored there (as a mount's does), else from a
    portable ``index`` that is for this archive, else is scanned and stored.
    """
    try:
        want = None if platform is None else Platform.parse(platform)
    except ValueError as e:
        print(f"ocifuse: {e}", file=sys.stderr)
        return 2
    try:
        layout = open_layout(path, ViewOptions(cache=cache, index=index))
    except LayoutOpenError as e:
        print(f"ocifuse: {e}", file=sys.stderr)
        return 2
    with layout:
        try:
            layout.index()
        except OcifuseError as e:
            print(f"ocifuse: {layout.path}: not a usable layout: {e}", file=sys.stderr)
            return 2
        summary = summarize(layout, ref=ref, platform=want)
    # The whole summary even when what was asked for is not there (JSON stays one document); the
    # reason goes to stderr, and the exit status says it.
    if as_json:
        print(render_json(summary))
    else:
        for line in render_text(summary):
            print(line)
    if summary.error is not None:
        sys.stdout.flush()
        print(f"ocifuse: {summary.error}", file=sys.stderr)
        return 1
    return 0
