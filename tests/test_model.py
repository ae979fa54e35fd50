"""Typed model: descriptors, platforms, indexes, manifests, configs (image-spec), parsed at the edge."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from ocifuse import model
from ocifuse.digest import Digest
from ocifuse.errors import InvalidDocument, OcifuseError
from ocifuse.model import Descriptor, ImageConfig, Index, Manifest, Platform

HEX = hashlib.sha256(b"blob").hexdigest()
DIGEST = f"sha256:{HEX}"


def desc(**over: Any) -> dict[str, Any]:
    """A valid descriptor object with fields overridden (None: removed)."""
    d: dict[str, Any] = {"mediaType": "application/octet-stream", "digest": DIGEST, "size": 4}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def manifest_obj(**over: Any) -> dict[str, Any]:
    """A valid image manifest object with fields overridden (None: removed)."""
    m: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": model.MEDIA_MANIFEST,
        "config": desc(mediaType=model.MEDIA_CONFIG),
        "layers": [desc(mediaType="application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def index_obj(**over: Any) -> dict[str, Any]:
    """A valid image index object with fields overridden (None: removed)."""
    i: dict[str, Any] = {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": [desc()]}
    i.update(over)
    return {k: v for k, v in i.items() if v is not None}


# -- loads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"not json", b"\xff\xfe{}", b'{"a": "\xff"}', b"[]", b"42", b'"text"', b"null"],
    ids=["empty", "unclosed", "words", "bom-ish", "bad-utf8", "array", "number", "string", "null"],
)
def test_loads_refuses_what_is_not_a_json_object(data: bytes) -> None:
    """Bad JSON, bad UTF-8 and non-objects are InvalidDocument naming the document."""
    with pytest.raises(InvalidDocument) as info:
        model.loads("doc.json", data)
    assert info.value.name == "doc.json"


@pytest.mark.parametrize(
    "data",
    [b"[" * 1_000_000 + b"]" * 1_000_000, b'{"a":' * 1_000_000 + b"1" + b"}" * 1_000_000],
    ids=["arrays", "objects"],
)
def test_deep_nesting_is_invalid_document_not_recursion_error(data: bytes) -> None:
    """A million nested arrays or objects (well-formed JSON) fail as InvalidDocument, not RecursionError."""
    with pytest.raises(InvalidDocument, match="nested too deeply"):
        model.loads("deep.json", data)


def test_moderate_nesting_in_unknown_fields_is_tolerated() -> None:
    """Unknown fields may hold nested values; they are ignored, not refused."""
    nested: Any = "leaf"
    for _ in range(200):
        nested = {"x": [nested]}
    idx = Index.from_json(
        "index.json", model.loads("index.json", json.dumps(index_obj(extra=nested)).encode())
    )
    assert len(idx.manifests) == 1


# -- descriptors -------------------------------------------------------------------------------------


def test_descriptor_all_fields() -> None:
    """Every descriptor field descriptor.md defines is parsed into its typed attribute."""
    d = Descriptor.from_json(
        "d",
        desc(
            urls=["https://example.com/blob"],
            annotations={model.REF_NAME: "v1", "other": "x"},
            data=base64.b64encode(b"blob").decode(),
            artifactType="application/x-art",
            platform={"os": "linux", "architecture": "arm", "variant": "v7"},
        ),
    )
    assert d.media_type == "application/octet-stream"
    assert d.digest == Digest("sha256", HEX)
    assert d.size == 4
    assert d.urls == ("https://example.com/blob",)
    assert d.ref_name == "v1"
    assert d.data == b"blob"
    assert d.artifact_type == "application/x-art"
    assert d.platform == Platform(os="linux", architecture="arm", variant="v7")


def test_descriptor_unknown_fields_and_media_types_are_tolerated() -> None:
    """descriptor.md: unknown fields are ignored and unknown media types are accepted."""
    d = Descriptor.from_json("d", desc(mediaType="application/x-unknown+whatever", futureField={"a": [1]}))
    assert d.media_type == "application/x-unknown+whatever"
    assert d.ref_name is None and d.platform is None and d.data is None


def test_descriptor_is_frozen() -> None:
    """Model values cannot be changed after parsing."""
    d = Descriptor.from_json("d", desc())
    with pytest.raises(AttributeError):
        d.size = 5  # type: ignore[misc]


BAD_DESCRIPTORS = {
    "missing mediaType": desc(mediaType=None),
    "missing digest": desc(digest=None),
    "missing size": desc(size=None),
    "mediaType not a string": desc(mediaType=7),
    "digest not a string": desc(digest=7),
    "digest malformed": desc(digest="sha256:XYZ"),
    "size a string": desc(size="4"),
    "size a float": desc(size=4.0),
    "size a bool": desc(size=True),
    "size negative": desc(size=-1),
    "urls a string": desc(urls="https://example.com"),
    "urls of numbers": desc(urls=[1]),
    "annotations a list": desc(annotations=["a"]),
    "annotation value a number": desc(annotations={"a": 1}),
    "data not base64": desc(data="!!!not base64!!!"),
    "data a number": desc(data=5),
    "platform a string": desc(platform="linux/amd64"),
    "platform without os": desc(platform={"architecture": "amd64"}),
    "platform os.features not strings": desc(platform={"os": "l", "architecture": "a", "os.features": [1]}),
    "artifactType a list": desc(artifactType=["x"]),
    "not an object": ["mediaType"],
}


@pytest.mark.parametrize("obj", BAD_DESCRIPTORS.values(), ids=BAD_DESCRIPTORS.keys())
def test_invalid_descriptors_are_invalid_document(obj: object) -> None:
    """Wrong types and missing required fields raise InvalidDocument naming the document."""
    with pytest.raises(InvalidDocument) as info:
        Descriptor.from_json("doc", obj)
    assert info.value.name == "doc"


# -- platforms ---------------------------------------------------------------------------------------


def test_platform_from_json_reads_dotted_fields() -> None:
    """os.version and os.features are read by their dotted JSON names."""
    p = Platform.from_json(
        "p", {"os": "windows", "architecture": "amd64", "os.version": "10.0.1", "os.features": ["win32k"]}
    )
    assert (p.os_version, p.os_features) == ("10.0.1", ("win32k",))
    assert str(p) == "windows/amd64"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", Platform(os="linux", architecture="amd64")),
        ("linux/arm64/v8", Platform(os="linux", architecture="arm64", variant="v8")),
    ],
)
def test_platform_parse_round_trips(text: str, expected: Platform) -> None:
    """OS/ARCH[/VARIANT] parses and prints back the same."""
    assert Platform.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["linux", "", "linux/", "/amd64", "linux//v7", "a/b/c/d"])
def test_platform_parse_refuses_malformed(text: str) -> None:
    """Anything but two or three non-empty parts is a ValueError (a command-line error)."""
    with pytest.raises(ValueError):
        Platform.parse(text)


# -- indexes and manifests ----------------------------------------------------------------------------


def test_index_parses_nested_descriptors() -> None:
    """An index's manifests are Descriptors; annotations, artifactType and subject are kept."""
    idx = Index.from_json(
        "index.json",
        index_obj(
            manifests=[
                desc(mediaType=model.MEDIA_MANIFEST, platform={"os": "linux", "architecture": "s390x"})
            ],
            annotations={"a": "b"},
            artifactType="application/x-art",
            subject=desc(),
        ),
    )
    assert idx.schema_version == 2 and idx.media_type == model.MEDIA_INDEX
    assert idx.manifests[0].platform == Platform(os="linux", architecture="s390x")
    assert idx.annotations == {"a": "b"} and idx.artifact_type == "application/x-art"
    assert idx.subject is not None and idx.subject.digest == Digest("sha256", HEX)


def test_index_without_media_type_and_with_empty_manifests() -> None:
    """mediaType is optional in an index, and an empty manifests list is valid."""
    idx = Index.from_json("index.json", index_obj(mediaType=None, manifests=[]))
    assert idx.media_type is None and idx.manifests == ()


def test_docker_list_is_an_index() -> None:
    """A Docker manifest list parses as an index (tolerated media type)."""
    assert Index.from_json("i", index_obj(mediaType=model.DOCKER_LIST)).media_type == model.DOCKER_LIST


BAD_INDEXES = {
    "schemaVersion missing": index_obj(schemaVersion=None),
    "schemaVersion 1": index_obj(schemaVersion=1),
    "schemaVersion a string": index_obj(schemaVersion="2"),
    "schemaVersion a float": index_obj(schemaVersion=2.0),
    "schemaVersion true": index_obj(schemaVersion=True),
    "manifests missing": index_obj(manifests=None),
    "manifests an object": index_obj(manifests={}),
    "manifest entry a string": index_obj(manifests=["sha256:abc"]),
    "mediaType a manifest": index_obj(mediaType=model.MEDIA_MANIFEST),
    "annotations a string": index_obj(annotations="x"),
    "subject a string": index_obj(subject=DIGEST),
}


@pytest.mark.parametrize("obj", BAD_INDEXES.values(), ids=BAD_INDEXES.keys())
def test_invalid_indexes(obj: object) -> None:
    """Index documents that break image-index.md raise InvalidDocument."""
    with pytest.raises(InvalidDocument):
        Index.from_json("index.json", obj)


def test_bad_nested_descriptor_names_its_place() -> None:
    """An error in manifests[1] says so, so fsck and inspect can point at it."""
    with pytest.raises(InvalidDocument) as info:
        Index.from_json("index.json", index_obj(manifests=[desc(), desc(size=-3)]))
    assert "manifests[1]" in info.value.name


def test_manifest_parses_and_lists_its_descriptors() -> None:
    """Config, layers and subject are parsed; ``descriptors`` lists them in that order."""
    subject = desc(mediaType=model.MEDIA_MANIFEST, size=9)
    m = Manifest.from_json("m", manifest_obj(subject=subject, artifactType="application/x-sig", unknown=1))
    assert m.config.media_type == model.MEDIA_CONFIG
    assert len(m.layers) == 1
    assert m.artifact_type == "application/x-sig"
    assert [d.size for d in m.descriptors] == [4, 4, 9]


def test_manifest_layers_are_optional() -> None:
    """An artifact manifest may have no layers field at all."""
    assert Manifest.from_json("m", manifest_obj(layers=None)).layers == ()


BAD_MANIFESTS = {
    "config missing": manifest_obj(config=None),
    "config a string": manifest_obj(config=DIGEST),
    "config without digest": manifest_obj(config=desc(digest=None)),
    "layers an object": manifest_obj(layers={}),
    "layer with bad size": manifest_obj(layers=[desc(size="big")]),
    "schemaVersion 3": manifest_obj(schemaVersion=3),
    "mediaType an index": manifest_obj(mediaType=model.MEDIA_INDEX),
    "not an object": [manifest_obj()],
}


@pytest.mark.parametrize("obj", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_invalid_manifests(obj: object) -> None:
    """Manifests that break manifest.md raise InvalidDocument."""
    with pytest.raises(InvalidDocument):
        Manifest.from_json("m", obj)


# -- parse_document ------------------------------------------------------------------------------------


def _bytes(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_parse_document_by_media_type() -> None:
    """An index or manifest is chosen by the descriptor's media type when the document has none."""
    idx = model.parse_document("d", model.MEDIA_INDEX, _bytes(index_obj(mediaType=None)))
    man = model.parse_document("d", model.MEDIA_MANIFEST, _bytes(manifest_obj(mediaType=None)))
    assert isinstance(idx, Index) and isinstance(man, Manifest)


def test_parse_document_own_media_type_wins_over_unknown_descriptor_type() -> None:
    """A document's own mediaType decides when the descriptor's media type is unknown."""
    doc = model.parse_document("d", "application/x-unknown", _bytes(manifest_obj()))
    assert isinstance(doc, Manifest)


def test_parse_document_unknown_media_type_is_none() -> None:
    """A JSON blob of an unknown media type is tolerated and is neither index nor manifest."""
    assert model.parse_document("d", "application/x-unknown", b'{"a": 1}') is None


def test_parse_document_media_type_disagreement_is_invalid() -> None:
    """A manifest whose descriptor says it is an index is InvalidDocument."""
    with pytest.raises(InvalidDocument, match="differs"):
        model.parse_document("d", model.MEDIA_INDEX, _bytes(manifest_obj()))


def test_parse_document_wrong_shape_for_media_type_is_invalid() -> None:
    """A manifest-typed document without config is InvalidDocument, an OcifuseError."""
    with pytest.raises(OcifuseError):
        model.parse_document("d", model.MEDIA_MANIFEST, _bytes({"schemaVersion": 2}))


# -- image config ---------------------------------------------------------------------------------------


def test_image_config_fields() -> None:
    """The fields inspect shows are read; the rest of config.md is ignored."""
    cfg = ImageConfig.from_json(
        "c",
        {
            "os": "linux",
            "architecture": "arm",
            "variant": "v7",
            "created": "2024-01-01T00:00:00Z",
            "author": "me",
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [{"created_by": "x"}],
            "config": {
                "User": "1000",
                "WorkingDir": "/w",
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["true"],
                "Env": ["A=1"],
                "Labels": {"k": "v"},
                "ExposedPorts": {"80/tcp": {}},
            },
        },
    )
    assert (cfg.os, cfg.architecture, cfg.variant, cfg.author) == ("linux", "arm", "v7", "me")
    assert (cfg.user, cfg.working_dir) == ("1000", "/w")
    assert cfg.entrypoint == ("/bin/sh", "-c") and cfg.cmd == ("true",)
    assert cfg.env == ("A=1",) and cfg.labels == {"k": "v"}


def test_image_config_minimal_and_null_labels() -> None:
    """A config without ``config`` parses; null Labels (as Docker writes) is no labels."""
    assert ImageConfig.from_json("c", {}) == ImageConfig()
    assert ImageConfig.from_json("c", {"config": {"Labels": None}}).labels == {}


@pytest.mark.parametrize(
    "obj",
    [{"config": []}, {"config": {"Env": "A=1"}}, {"config": {"Cmd": [1]}}, {"os": 1}, []],
    ids=["config-list", "env-string", "cmd-numbers", "os-number", "not-object"],
)
def test_image_config_wrong_types(obj: object) -> None:
    """Wrong types in the fields inspect reads raise InvalidDocument."""
    with pytest.raises(InvalidDocument):
        ImageConfig.from_json("c", obj)


def test_parse_diff_ids() -> None:
    """config.md rootfs.diff_ids: a list of valid digests, at most MAX_LAYERS of them."""
    d = "sha256:" + "a" * 64
    config = {"rootfs": {"type": "layers", "diff_ids": [d, d]}}
    assert model.parse_diff_ids("c", config) == [Digest.parse(d)] * 2
    for bad, why in [
        ([], "missing or not a list"),
        ({"rootfs": {}}, "missing or not a list"),
        ({"rootfs": {"diff_ids": "x"}}, "missing or not a list"),
        ({"rootfs": {"diff_ids": [d, 1]}}, "rootfs.diff_ids: "),
        ({"rootfs": {"diff_ids": ["sha256:short"]}}, "rootfs.diff_ids: "),
        ({"rootfs": {"diff_ids": [d] * (model.MAX_LAYERS + 1)}}, "more than"),
    ]:
        with pytest.raises(InvalidDocument, match=why):
            model.parse_diff_ids("c", bad)


def test_load_value_takes_any_json() -> None:
    """load_value parses any JSON value; loads only an object."""
    assert model.load_value("x", b"[1]") == [1]
    with pytest.raises(InvalidDocument, match="not an object"):
        model.loads("x", b"[1]")
    with pytest.raises(InvalidDocument, match="not valid JSON"):
        model.load_value("x", b"\xff")
