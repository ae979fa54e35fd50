"""fsck's checks of one document at a time (pure): the bytes or JSON of one document in, findings out.

The walk (fsck.py) reads, hashes and queues; these judge what it read, each a function of its
arguments alone: the ``oci-layout`` header, ``index.json``, an index or manifest blob (whose
descriptors come back as children for the walk to visit), a config, a descriptor's embedded data.
Each descriptor is parsed on its own, so one invalid descriptor is one finding and the valid ones
are still walked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import model
from .digest import Digest
from .errors import InvalidDocument
from .findings import Finding, finding
from .layout import INDEX_JSON, OCI_LAYOUT

# image-layout.md: "imageLayoutVersion" is "1.0.0" for every layout the spec has defined so far.
LAYOUT_VERSION = "1.0.0"

_DOCUMENT_TYPES = model.INDEX_TYPES | model.MANIFEST_TYPES | model.CONFIG_TYPES
# A stand-in for a manifest's invalid config, so the rest of the manifest can still be judged.
_PLACEHOLDER = {"mediaType": model.MEDIA_CONFIG, "digest": "sha256:" + "0" * 64, "size": 0}


def is_document(media_type: str) -> bool:
    """True for the media types fsck parses and judges: indexes, manifests, configs."""
    return media_type in _DOCUMENT_TYPES


def is_json(media_type: str) -> bool:
    """True for JSON content: a document, or any ``+json`` media type (RFC 6839 suffix)."""
    return is_document(media_type) or media_type.split(";")[0].strip().endswith("+json")


def short(digest: Digest | str) -> str:
    """A digest cut to 12 characters of its encoded part, for messages."""
    text = str(digest)
    alg, _, enc = text.partition(":")
    return f"{alg}:{enc[:12]}" if len(enc) > 12 else text


@dataclass(frozen=True, slots=True)
class Child:
    """A descriptor for the walk to visit, where it was found, and the role it plays there."""

    desc: model.Descriptor
    where: str
    role: str  # "manifest", "config", "layer", "subject"


@dataclass(frozen=True, slots=True, kw_only=True)
class Checked:
    """What checking one document found, and the descriptors it points at (in document order).

    ``complete`` is False when the document could not be read as one: what it refers to is then
    unknown (for index.json: there is nothing to walk).
    """

    findings: tuple[Finding, ...] = ()
    children: tuple[Child, ...] = field(default=())
    complete: bool = True


# image-layout.md, "oci-layout file": a JSON object with "imageLayoutVersion".
def layout_header(data: bytes) -> list[Finding]:
    """The findings of an ``oci-layout`` file's bytes."""
    try:
        obj = model.loads(OCI_LAYOUT, data)
    except InvalidDocument as e:
        return [finding("layout-invalid", e.message, path=OCI_LAYOUT)]
    version = obj.get("imageLayoutVersion")
    if not isinstance(version, str):
        return [finding("layout-invalid", "imageLayoutVersion is missing or not a string", path=OCI_LAYOUT)]
    if version != LAYOUT_VERSION:
        why = f"imageLayoutVersion is {version!r}, not {LAYOUT_VERSION!r}"
        return [finding("layout-version", why, path=OCI_LAYOUT)]
    return []


# image-layout.md, "index.json file": REQUIRED, and an image index (image-index.md).
def index_json(data: bytes) -> Checked:
    """index.json's bytes: its findings and its entries; not ``complete`` when there is nothing to walk."""
    try:
        obj = model.loads(INDEX_JSON, data)
    except InvalidDocument as e:
        return Checked(findings=(finding("index-invalid", e.message, path=INDEX_JSON),), complete=False)
    found, problems, children = _document(INDEX_JSON, obj, model.MEDIA_INDEX, None, INDEX_JSON)
    found += [finding("index-invalid", p, path=INDEX_JSON) for p in problems]
    seen: set[str] = set()
    for child in children:
        name = child.desc.ref_name
        if name is None:
            continue
        if name in seen:
            why = f"ref {name!r} names more than one index.json entry"
            found.append(finding("ref-duplicate", why, path=INDEX_JSON))
        seen.add(name)
    return Checked(
        findings=tuple(found), children=tuple(children), complete=isinstance(obj.get("manifests"), list)
    )


def blob(desc: model.Descriptor, data: bytes) -> Checked:
    """A JSON blob's bytes, judged as its media type says: an index's or manifest's descriptors are
    its children; a config is parsed as one; other ``+json`` content need only be JSON."""
    digest, media_type = desc.digest, desc.media_type
    name = str(digest)

    def bad(code: str, why: str, complete: bool) -> Checked:
        return Checked(findings=(finding(code, why, digest=name, path=digest.path),), complete=complete)

    try:
        obj = model.load_value(name, data)
    except InvalidDocument as e:
        return bad("invalid-json", f"{media_type}: {e.reason}", not is_document(media_type))
    if not is_document(media_type):
        return Checked()
    if not isinstance(obj, dict):
        return bad("invalid-document", f"{media_type} is not a JSON object", False)
    if media_type in model.CONFIG_TYPES:
        found: list[Finding] = []
        children: list[Child] = []
        try:
            model.ImageConfig.from_json(name, obj)
            problems = []
        except InvalidDocument as e:
            problems = [e.reason]
    else:
        found, problems, children = _document(name, obj, media_type, digest, digest.path)
    why = f"not a valid {media_type}: "
    found += [finding("invalid-document", why + p, digest=name, path=digest.path) for p in problems]
    return Checked(findings=tuple(found), children=tuple(children))


# descriptor.md, "data": the decoded data MUST be verified against the digest and size fields.
def embedded_data(child: Child) -> Finding | None:
    """A ``data-mismatch`` when a descriptor's embedded ``data`` is not its size and digest."""
    desc = child.desc
    if desc.data is None:
        return None
    if len(desc.data) != desc.size:
        why = f"{len(desc.data)} bytes, size says {desc.size}"
    elif desc.digest.verifiable and Digest.of(desc.data, desc.digest.algorithm) != desc.digest:
        why = f"hashes to {Digest.of(desc.data, desc.digest.algorithm)}"
    else:
        return None
    message = f"{child.where}: embedded data does not match: {why}"
    return finding("data-mismatch", message, digest=str(desc.digest))


def _document(
    name: str, obj: Mapping[str, Any], media_type: str, digest: Digest | None, path: str
) -> tuple[list[Finding], list[str], list[Child]]:
    """An index's or manifest's descriptors and findings, and what is wrong with the document itself.

    Each descriptor is parsed on its own (an invalid one is an ``invalid-descriptor`` finding and
    left out); the document is then judged with the invalid ones left out.
    """
    found: list[Finding] = []
    problems: list[str] = []
    own = obj.get("mediaType")
    sane = dict(obj)
    kind = media_type
    if own is not None:
        # manifest.md / image-index.md: mediaType, when present, must match the descriptor's.
        if isinstance(own, str) and own in model.INDEX_TYPES | model.MANIFEST_TYPES:
            kind = own
        index_json_index = name == INDEX_JSON and isinstance(own, str) and own in model.INDEX_TYPES
        if own != media_type and not index_json_index:
            problems.append(f"mediaType {own!r} differs from the descriptor's {media_type!r}")
            sane.pop("mediaType")
    children: list[Child] = []
    where = short(digest) if digest is not None else name
    named = None if digest is None else str(digest)

    def one(role: str, value: object, label: str) -> bool:
        try:
            desc = model.Descriptor.from_json(f"{where} {label}", value)
        except InvalidDocument as e:
            found.append(finding("invalid-descriptor", e.message, digest=named, path=path))
            return False
        children.append(Child(desc, f"{where} {label}", role))
        return True

    def many(key: str, role: str) -> None:
        value = obj.get(key)
        if isinstance(value, list):
            sane[key] = [v for i, v in enumerate(value) if one(role, v, f"{key}[{i}]")]

    if kind in model.INDEX_TYPES:
        many("manifests", "manifest")
    else:
        if "config" in obj and not one("config", obj["config"], "config"):
            sane["config"] = _PLACEHOLDER
        many("layers", "layer")
    if "subject" in obj and not one("subject", obj["subject"], "subject"):
        sane.pop("subject")
    try:
        if kind in model.INDEX_TYPES:
            model.Index.from_json(name, sane)
        else:
            model.Manifest.from_json(name, sane)
    except InvalidDocument as e:
        problems.append(e.reason)
    return found, problems, children
