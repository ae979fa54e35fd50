"""Find manifests in a layout: by ref name, digest or platform, through nested indexes; referrers."""

from __future__ import annotations

import platform as _platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from .digest import Digest
from .errors import InvalidDigest, NotFound, OcifuseError, PlatformNotFound
from .layout import Layout
from .model import CONFIG_TYPES, INDEX_TYPES, Descriptor, ImageConfig, Index, Manifest, Platform, loads

# Go's GOARCH names, which image-index.md uses for "architecture".
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
# Nested indexes deeper than this are refused (a cycle of digests is impossible, but depth is not).
MAX_DEPTH = 32


def host_platform() -> Platform:
    """The platform of this machine, in image-index.md's (Go's) names."""
    machine = _platform.machine().lower()
    variant = {"armv7l": "v7", "armv6l": "v6", "aarch64": "v8", "arm64": "v8"}.get(machine)
    return Platform(
        os=sys.platform if sys.platform != "linux2" else "linux",
        architecture=_GOARCH.get(machine, machine),
        variant=variant,
    )


def platform_matches(want: Platform, have: Platform | None) -> bool:
    """True when ``have`` satisfies ``want``; a wanted variant must match, an absent one matches any.

    arm64's variant ``v8`` is its default, so a missing variant on either side is accepted for it.
    """
    if have is None or have.os != want.os or have.architecture != want.architecture:
        return False
    if want.variant is None or want.variant == have.variant:
        return True
    return want.architecture == "arm64" and {want.variant, have.variant} <= {"v8", None}


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """A manifest found in a layout, with the descriptor that led to it and the path there."""

    descriptor: Descriptor
    manifest: Manifest
    trail: tuple[Descriptor, ...]  # index descriptors walked through, outermost first


def refs(layout: Layout, index: Index | None = None) -> dict[str, Descriptor]:
    """Every ref name of index.json and the descriptor it names (the last one wins on duplicates)."""
    index = layout.index() if index is None else index
    return {d.ref_name: d for d in index.manifests if d.ref_name is not None}


def walk(
    layout: Layout, desc: Descriptor, depth: int = 0, _seen: set[Digest] | None = None
) -> Iterator[tuple[Descriptor, Index | Manifest]]:
    """Every index and manifest reachable from ``desc``, depth first, ``desc`` itself first.

    Each digest is visited once: indexes that list the same child several times, level after
    level, would otherwise make the walk exponential in the depth.
    """
    seen = set() if _seen is None else _seen
    if desc.digest in seen:
        return
    seen.add(desc.digest)
    if depth > MAX_DEPTH:
        raise NotFound(f"indexes nested deeper than {MAX_DEPTH} levels at {desc.digest}")
    doc = layout.document(desc)
    if doc is None:
        return
    yield desc, doc
    if isinstance(doc, Index):
        for child in doc.manifests:
            yield from walk(layout, child, depth + 1, seen)


def _select(
    layout: Layout,
    desc: Descriptor,
    want: Platform,
    trail: tuple[Descriptor, ...],
    seen: set[Digest] | None = None,
) -> Resolved | None:
    # A digest already searched without a match has none: skip it (else repeated children make
    # the search exponential in the nesting depth).
    seen = set() if seen is None else seen
    if desc.digest in seen:
        return None
    seen.add(desc.digest)
    if len(trail) > MAX_DEPTH:
        raise NotFound(f"indexes nested deeper than {MAX_DEPTH} levels at {desc.digest}")
    doc = layout.document(desc)
    if isinstance(doc, Manifest):
        return Resolved(descriptor=desc, manifest=doc, trail=trail)
    if isinstance(doc, Index):
        for child in doc.manifests:
            if child.media_type in INDEX_TYPES or platform_matches(want, child.platform):
                found = _select(layout, child, want, (*trail, desc), seen)
                if found is not None:
                    return found
    return None


def resolve(layout: Layout, ref: str | None = None, platform: Platform | None = None) -> Resolved:
    """The image manifest for ``ref`` (a ref name or a digest; None: the only image) and ``platform``.

    An index is searched for a manifest whose platform matches (default: this machine), through
    nested indexes. A manifest named directly resolves to itself; when ``platform`` is given it
    must be for that platform too (image_platform), as docker and podman refuse another one.
    Raises NotFound with a message that lists what there is (PlatformNotFound: the platforms).
    """
    index = layout.index()
    want = platform or host_platform()
    if ref is None:
        if len(index.manifests) != 1:
            names = ", ".join(sorted(refs(layout, index))) or "none"
            raise NotFound(f"index.json has {len(index.manifests)} entries; choose a ref (refs: {names})")
        start = index.manifests[0]
    else:
        start = _find_ref(layout, index, ref)
    found = _select(layout, start, want, ())
    if found is not None and platform is not None and not found.trail:
        have = image_platform(layout, found.manifest, found.descriptor)
        if have is not None and not platform_matches(platform, have):
            found = None
    if found is None:
        label = ref or start.ref_name or str(start.digest)
        raise PlatformNotFound(label, str(want), tuple(platforms_of(layout, start)))
    return found


def image_platform(layout: Layout, manifest: Manifest, desc: Descriptor) -> Platform | None:
    """The platform an image is for: its config's os/architecture (config.md), else its descriptor's."""
    config = manifest.config
    if config.media_type in CONFIG_TYPES:
        name = f"config {config.digest}"
        try:
            found = ImageConfig.from_json(name, loads(name, layout.read_blob(config)))
        except OcifuseError:
            found = None  # fsck reports an unreadable config; the descriptor may still say
        if found is not None and found.os and found.architecture:
            return Platform(os=found.os, architecture=found.architecture, variant=found.variant)
    return desc.platform


def platforms_of(layout: Layout, desc: Descriptor) -> list[str]:
    """The platforms of the images under ``desc`` (an index, nested or not, or one manifest), each once."""
    found: list[str] = []
    try:
        for child, doc in walk(layout, desc):
            if isinstance(doc, Manifest):
                direct = child is desc or child.platform is None
                plat = image_platform(layout, doc, child) if direct else child.platform
                if plat is not None:
                    found.append(str(plat))
    except OcifuseError:
        pass  # what could be read is listed; fsck says what could not
    return list(dict.fromkeys(found))


def _find_ref(layout: Layout, index: Index, ref: str) -> Descriptor:
    by_name = refs(layout, index)
    if ref in by_name:
        return by_name[ref]
    try:
        digest = Digest.parse(ref)
    except InvalidDigest:
        names = ", ".join(sorted(by_name)) or "none"
        raise NotFound(f"no ref {ref!r} in index.json (refs: {names})") from None
    for top in index.manifests:
        for desc, _ in walk(layout, top):
            if desc.digest == digest:
                return desc
    raise NotFound(f"no manifest or index {digest} is reachable from index.json")


def referrer_index(layout: Layout) -> dict[Digest, list[tuple[Descriptor, str | None]]]:
    """Every manifest reachable from index.json that has a ``subject``, by that subject's digest.

    Each entry is (descriptor, artifact type): the manifest's ``artifactType``, else its config's
    media type (image-spec manifest.md, "artifactType"). One walk over all of index.json, each
    document parsed once: asking per image instead would parse every document once per image.
    """
    visited: set[Digest] = set()
    found: dict[Digest, list[tuple[Descriptor, str | None]]] = {}
    for top in layout.index().manifests:
        for desc, doc in walk(layout, top, _seen=visited):
            if doc.subject is None:
                continue
            kind = doc.artifact_type
            if kind is None and isinstance(doc, Manifest):
                kind = doc.config.media_type
            found.setdefault(doc.subject.digest, []).append((desc, kind))
    return found


def referrers(
    layout: Layout,
    subject: Digest,
    artifact_type: str | None = None,
    index: dict[Digest, list[tuple[Descriptor, str | None]]] | None = None,
) -> list[Descriptor]:
    """Descriptors of manifests reachable from index.json whose ``subject`` is ``subject``.

    ``artifact_type`` filters on the referrer's artifact type (see referrer_index); ``index``:
    a referrer_index already made, for callers that ask about many subjects.
    """
    index = referrer_index(layout) if index is None else index
    return [d for d, kind in index.get(subject, ()) if artifact_type is None or kind == artifact_type]
