"""fsck's per-document checks, without a walk (ocifuse.validate): bytes in, findings and children out."""

from __future__ import annotations

import json

from ocifuse import model, validate
from ocifuse.digest import Digest

LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(Digest.of(b"l")), "size": 1}


def _codes(checked: validate.Checked) -> list[str]:
    return [f.code for f in checked.findings]


def test_layout_header() -> None:
    assert validate.layout_header(b'{"imageLayoutVersion": "1.0.0"}') == []
    assert [f.code for f in validate.layout_header(b'{"imageLayoutVersion": "2.0.0"}')] == ["layout-version"]
    assert [f.code for f in validate.layout_header(b"{}")] == ["layout-invalid"]
    assert [f.code for f in validate.layout_header(b"[")] == ["layout-invalid"]


def test_index_json_children_in_order_and_duplicate_refs() -> None:
    """Each entry is a child in document order; an invalid one is a finding, the rest still walked."""
    entry = {**LAYER, "mediaType": model.MEDIA_MANIFEST}
    tagged = {**entry, "annotations": {model.REF_NAME: "v1"}}
    index = {"schemaVersion": 2, "manifests": [tagged, {"size": 1}, tagged, entry]}
    checked = validate.index_json(json.dumps(index).encode())
    assert checked.complete
    assert _codes(checked) == ["invalid-descriptor", "ref-duplicate"]
    assert [c.where for c in checked.children] == ["index.json manifests[0]", "index.json manifests[2]"] + [
        "index.json manifests[3]"
    ]
    assert not validate.index_json(b'{"schemaVersion": 2}').complete
    broken = validate.index_json(b"\xff")
    assert not broken.complete and _codes(broken) == ["index-invalid"]


def test_blob_judges_by_media_type() -> None:
    """A manifest's descriptors are its children; bad JSON of a document leaves the walk incomplete."""
    config = {"mediaType": model.MEDIA_CONFIG, "digest": str(Digest.of(b"{}")), "size": 2}
    manifest = {"schemaVersion": 2, "config": config, "layers": [LAYER]}
    data = json.dumps(manifest).encode()
    desc = model.Descriptor(media_type=model.MEDIA_MANIFEST, digest=Digest.of(data), size=len(data))
    checked = validate.blob(desc, data)
    assert checked.complete and not checked.findings
    assert [c.role for c in checked.children] == ["config", "layer"]
    bad = validate.blob(desc, b"[1]")
    assert not bad.complete and _codes(bad) == ["invalid-document"]
    other = model.Descriptor(media_type="application/x+json", digest=Digest.of(b"{"), size=1)
    odd = validate.blob(other, b"{")
    assert odd.complete and _codes(odd) == ["invalid-json"]  # not a document: the walk stays complete


def test_embedded_data() -> None:
    desc = model.Descriptor(media_type="text/plain", digest=Digest.of(b"hi"), size=2, data=b"ho")
    found = validate.embedded_data(validate.Child(desc, "here", "layer"))
    assert found is not None and found.code == "data-mismatch"
    good = model.Descriptor(media_type="text/plain", digest=Digest.of(b"hi"), size=2, data=b"hi")
    assert validate.embedded_data(validate.Child(good, "here", "layer")) is None
