"""Typed, frozen values for the OCI documents ocifuse reads (image-spec), parsed at the edge.

Unknown fields and unknown media types are tolerated, as the spec requires
(descriptor.md, manifest.md, image-index.md: "implementations MUST NOT error on unknown").
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import InvalidDigest, InvalidDocument

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = frozenset({MEDIA_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({MEDIA_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({MEDIA_CONFIG, DOCKER_CONFIG})
# The most layers of one image that ocifuse merges into a root filesystem or lists in a manifest it
# makes (image-spec sets no bound; Docker and overlayfs stop near 128): each layer costs an open
# source and a table, so an archive listing one blob 100,000 times must not cost 100,000 of them.
MAX_LAYERS = 4096
# annotations.md: the name of a reference within an image layout.
REF_NAME = "org.opencontainers.image.ref.name"

JsonObject = Mapping[str, Any]


def load_value(name: str, data: bytes) -> object:
    """Parse any JSON value (the one JSON parse of ocifuse); raises InvalidDocument for bad UTF-8,
    bad JSON or deep nesting."""
    try:
        value: object = json.loads(data)
    except RecursionError as e:
        raise InvalidDocument(name, "JSON nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidDocument(name, f"not valid JSON: {e}") from e
    return value


def loads(name: str, data: bytes) -> JsonObject:
    """Parse a JSON object; raises InvalidDocument for bad UTF-8, bad JSON, deep nesting or non-objects."""
    value = load_value(name, data)
    if not isinstance(value, dict):
        raise InvalidDocument(name, "JSON is not an object")
    return value


def parse_diff_ids(name: str, config: object) -> list[Digest]:
    """An image config's ``rootfs.diff_ids`` (config.md), each a valid digest, at most MAX_LAYERS.

    ``config`` is the parsed config (any JSON value); raises InvalidDocument naming ``name`` otherwise.
    """
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise InvalidDocument(name, "rootfs.diff_ids is missing or not a list")
    if len(ids) > MAX_LAYERS:
        raise InvalidDocument(name, f"{len(ids)} diff_ids, more than {MAX_LAYERS}")
    try:
        return [Digest.parse(i) for i in ids]
    except InvalidDigest as e:
        raise InvalidDocument(name, f"rootfs.diff_ids: {e}") from e


class _Fields:
    """Typed access to one JSON object's fields, naming the document in every error."""

    def __init__(self, name: str, obj: object) -> None:
        if not isinstance(obj, dict):
            raise InvalidDocument(name, "expected a JSON object")
        self.name = name
        self.obj: dict[str, Any] = obj

    def _get(self, key: str, kind: type | tuple[type, ...], required: bool) -> Any:
        if key not in self.obj:
            if required:
                raise InvalidDocument(self.name, f"missing required field {key!r}")
            return None
        value = self.obj[key]
        # bool is an int in Python; JSON true is never a valid size or version.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidDocument(self.name, f"field {key!r} has the wrong type")
        return value

    def text(self, key: str, required: bool = False) -> str | None:
        value: str | None = self._get(key, str, required)
        return value

    def number(self, key: str, required: bool = False) -> int | None:
        value: int | None = self._get(key, int, required)
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self._get(key, list, False)
        if value is None:
            return None
        if not all(isinstance(v, str) for v in value):
            raise InvalidDocument(self.name, f"field {key!r} must be a list of strings")
        return tuple(value)

    def string_map(self, key: str) -> dict[str, str]:
        value = self._get(key, dict, False)
        if value is None:
            return {}
        if not all(isinstance(v, str) for v in value.values()):
            raise InvalidDocument(self.name, f"field {key!r} must map strings to strings")
        return dict(value)

    def objects(self, key: str, required: bool = False) -> list[object]:
        value: list[object] | None = self._get(key, list, required)
        return [] if value is None else value


@dataclass(frozen=True, slots=True, kw_only=True)
class Platform:
    """image-index.md "platform": where an image runs."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, name: str, obj: object) -> Platform:
        """Parse a platform object."""
        f = _Fields(name, obj)
        return cls(
            os=f.text("os", required=True) or "",
            architecture=f.text("architecture", required=True) or "",
            variant=f.text("variant"),
            os_version=f.text("os.version"),
            os_features=f.strings("os.features") or (),
        )

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``OS/ARCH[/VARIANT]`` as given on a command line."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {text!r} is not OS/ARCH[/VARIANT]")
        return cls(os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    """descriptor.md: a typed, sized, digested pointer to content."""

    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None
    artifact_type: str | None = None
    platform: Platform | None = None

    @classmethod
    def from_json(cls, name: str, obj: object) -> Descriptor:
        """Parse a descriptor; raises InvalidDocument or InvalidDigest for invalid ones."""
        f = _Fields(name, obj)
        media_type = f.text("mediaType", required=True) or ""
        digest_text = f.text("digest", required=True)
        try:
            digest = Digest.parse(digest_text)
        except InvalidDigest as e:
            raise InvalidDocument(name, e.message) from e
        size = f.number("size", required=True)
        assert size is not None
        if size < 0:  # descriptor.md: size is the number of bytes, never negative
            raise InvalidDocument(name, f"descriptor {digest} has negative size {size}")
        data = None
        data_text = f.text("data")
        if data_text is not None:
            try:
                data = base64.b64decode(data_text, validate=True)
            except binascii.Error as e:
                raise InvalidDocument(name, f"descriptor {digest}: data is not base64") from e
        platform_obj = f.obj.get("platform")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            urls=f.strings("urls") or (),
            annotations=f.string_map("annotations"),
            data=data,
            artifact_type=f.text("artifactType"),
            platform=None if platform_obj is None else Platform.from_json(name, platform_obj),
        )

    @property
    def ref_name(self) -> str | None:
        """The layout ref name of this descriptor (annotations.md), if any."""
        return self.annotations.get(REF_NAME)


def _descriptors(f: _Fields, key: str, required: bool = False) -> tuple[Descriptor, ...]:
    return tuple(
        Descriptor.from_json(f"{f.name} {key}[{i}]", o) for i, o in enumerate(f.objects(key, required))
    )


def _subject(f: _Fields) -> Descriptor | None:
    obj = f.obj.get("subject")
    return None if obj is None else Descriptor.from_json(f"{f.name} subject", obj)


def _schema_version(f: _Fields) -> int:
    version = f.number("schemaVersion", required=True)
    if version != 2:  # manifest.md / image-index.md: "MUST be 2"
        raise InvalidDocument(f.name, f"schemaVersion is {version}, not 2")
    return version


@dataclass(frozen=True, slots=True, kw_only=True)
class Index:
    """image-index.md: a list of manifests (and nested indexes)."""

    schema_version: int
    media_type: str | None
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None
    subject: Descriptor | None = None

    @classmethod
    def from_json(cls, name: str, obj: object) -> Index:
        """Parse an image index object."""
        f = _Fields(name, obj)
        media_type = f.text("mediaType")
        if media_type is not None and media_type not in INDEX_TYPES:
            raise InvalidDocument(name, f"mediaType {media_type!r} is not an image index")
        return cls(
            schema_version=_schema_version(f),
            media_type=media_type,
            manifests=_descriptors(f, "manifests", required=True),
            annotations=f.string_map("annotations"),
            artifact_type=f.text("artifactType"),
            subject=_subject(f),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """manifest.md: an image (or artifact) manifest."""

    schema_version: int
    media_type: str | None
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None
    subject: Descriptor | None = None

    @classmethod
    def from_json(cls, name: str, obj: object) -> Manifest:
        """Parse an image manifest object."""
        f = _Fields(name, obj)
        media_type = f.text("mediaType")
        if media_type is not None and media_type not in MANIFEST_TYPES:
            raise InvalidDocument(name, f"mediaType {media_type!r} is not an image manifest")
        config = f.obj.get("config")
        if config is None:
            raise InvalidDocument(name, "missing required field 'config'")
        return cls(
            schema_version=_schema_version(f),
            media_type=media_type,
            config=Descriptor.from_json(f"{name} config", config),
            layers=_descriptors(f, "layers"),
            annotations=f.string_map("annotations"),
            artifact_type=f.text("artifactType"),
            subject=_subject(f),
        )

    @property
    def descriptors(self) -> tuple[Descriptor, ...]:
        """Config, then layers, then subject: everything this manifest points at."""
        subject = (self.subject,) if self.subject is not None else ()
        return (self.config, *self.layers, *subject)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageConfig:
    """The subset of config.md that inspect shows."""

    os: str | None = None
    architecture: str | None = None
    variant: str | None = None
    created: str | None = None
    author: str | None = None
    user: str | None = None
    working_dir: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, name: str, obj: object) -> ImageConfig:
        """Parse the fields of an image config that inspect needs; the rest is ignored."""
        f = _Fields(name, obj)
        raw_inner = f.obj.get("config")
        inner = _Fields(f"{name} config", {} if raw_inner is None else raw_inner)
        labels = inner.obj.get("Labels")
        return cls(
            os=f.text("os"),
            architecture=f.text("architecture"),
            variant=f.text("variant"),
            created=f.text("created"),
            author=f.text("author"),
            user=inner.text("User"),
            working_dir=inner.text("WorkingDir"),
            entrypoint=inner.strings("Entrypoint"),
            cmd=inner.strings("Cmd"),
            env=inner.strings("Env") or (),
            labels={} if labels is None else inner.string_map("Labels"),
        )


def parse_document(name: str, media_type: str, data: bytes) -> Index | Manifest | None:
    """Parse an index or manifest by media type; None for media types that are neither.

    A document without a ``mediaType`` of its own is judged by the descriptor's, and a
    descriptor's media type that names neither is tolerated (descriptor.md).
    """
    obj = loads(name, data)
    own = obj.get("mediaType")
    kind = own if isinstance(own, str) else media_type
    if own is not None and media_type in INDEX_TYPES | MANIFEST_TYPES and own != media_type:
        raise InvalidDocument(name, f"mediaType {own!r} differs from the descriptor's {media_type!r}")
    if kind in INDEX_TYPES:
        return Index.from_json(name, obj)
    if kind in MANIFEST_TYPES:
        return Manifest.from_json(name, obj)
    return None
