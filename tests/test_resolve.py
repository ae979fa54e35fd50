"""Resolution: refs, digests, platforms through nested indexes, and referrers, over both backends."""

from __future__ import annotations

import json
import platform
from typing import Any

import pytest
from conftest import LayoutFactory
from oci import LayoutBuilder

from ocifuse import resolve as resolve_mod
from ocifuse.digest import Digest
from ocifuse.errors import NotFound
from ocifuse.layout import Layout
from ocifuse.model import Platform
from ocifuse.resolve import host_platform, platform_matches, referrers, refs, resolve, walk

Json = dict[str, Any]
SIG = "application/vnd.example.signature"
SBOM_CONFIG = "application/vnd.example.sbom.config"


def _plat(os_: str, arch: str, variant: str | None = None) -> Json:
    p = {"os": os_, "architecture": arch}
    return p | {"variant": variant} if variant else p


def platform_image(b: LayoutBuilder, os_: str, arch: str, variant: str | None = None) -> Json:
    """An image for one platform; its descriptor carries that platform."""
    return b.image(
        [f"{os_}/{arch}/{variant}".encode()], os_=os_, arch=arch, platform=_plat(os_, arch, variant)
    )


def multi_arch(b: LayoutBuilder) -> tuple[Json, dict[str, Json]]:
    """An index over the host's platform and three others; returns its descriptor and the images."""
    host = host_platform()
    images = {
        str(host): platform_image(b, host.os, host.architecture, host.variant),
        "linux/s390x": platform_image(b, "linux", "s390x"),
        "linux/arm/v6": platform_image(b, "linux", "arm", "v6"),
        "linux/arm/v7": platform_image(b, "linux", "arm", "v7"),
    }
    return b.index(list(images.values())), images


def test_resolve_by_ref_name(any_layout: LayoutFactory) -> None:
    """A ref of index.json pointing at a manifest resolves to it directly."""
    b = LayoutBuilder()
    one = b.tag(b.image([b"1"]), "one")
    b.tag(b.image([b"2"]), "two")
    found = resolve(any_layout(b), "one")
    assert str(found.descriptor.digest) == one["digest"]
    assert found.trail == ()
    assert found.manifest.layers[0].size == 1


def test_resolve_by_digest_at_top_and_nested(any_layout: LayoutFactory) -> None:
    """A digest resolves whether it is in index.json or only inside an index it points at."""
    b = LayoutBuilder()
    top = b.tag(b.image([b"top"]), "top")
    idx, images = multi_arch(b)
    b.tag(idx, "multi")
    layout = any_layout(b)
    assert str(resolve(layout, top["digest"]).descriptor.digest) == top["digest"]
    s390x = images["linux/s390x"]["digest"]
    found = resolve(layout, s390x, Platform.parse("linux/s390x"))
    assert str(found.descriptor.digest) == s390x


def test_resolve_without_ref_takes_the_only_entry(any_layout: LayoutFactory) -> None:
    """With one entry in index.json, no ref is needed."""
    b = LayoutBuilder()
    only = b.tag(b.image([b"x"]), None)
    assert str(resolve(any_layout(b)).descriptor.digest) == only["digest"]


def test_resolve_without_ref_among_many_lists_refs(any_layout: LayoutFactory) -> None:
    """With several entries and no ref, NotFound lists the refs to choose from."""
    b = LayoutBuilder()
    b.tag(b.image([b"1"]), "beta")
    b.tag(b.image([b"2"]), "alpha")
    with pytest.raises(NotFound, match=r"2 entries.*refs: alpha, beta"):
        resolve(any_layout(b))


def test_unknown_ref_lists_refs(any_layout: LayoutFactory) -> None:
    """An unknown ref name says which refs exist."""
    b = LayoutBuilder()
    b.tag(b.image([b"1"]), "v1")
    b.tag(b.image([b"2"]), "v2")
    with pytest.raises(NotFound, match=r"no ref 'v3'.*refs: v1, v2"):
        resolve(any_layout(b), "v3")


def test_unknown_digest_is_not_found(any_layout: LayoutFactory) -> None:
    """A well-formed digest that nothing reaches is NotFound naming it."""
    b = LayoutBuilder()
    b.tag(b.image([b"1"]), "v1")
    missing = str(Digest.of(b"nothing"))
    with pytest.raises(NotFound, match=missing):
        resolve(any_layout(b), missing)


def test_default_platform_is_the_host(any_layout: LayoutFactory) -> None:
    """Without --platform, the manifest for this machine is chosen from an index."""
    b = LayoutBuilder()
    idx, images = multi_arch(b)
    b.tag(idx, "multi")
    found = resolve(any_layout(b), "multi")
    assert str(found.descriptor.digest) == images[str(host_platform())]["digest"]
    assert [str(d.digest) for d in found.trail] == [idx["digest"]]


@pytest.mark.parametrize("want", ["linux/s390x", "linux/arm/v6", "linux/arm/v7"])
def test_explicit_platform(any_layout: LayoutFactory, want: str) -> None:
    """An explicit platform (variant included) picks its manifest."""
    b = LayoutBuilder()
    idx, images = multi_arch(b)
    b.tag(idx, "multi")
    found = resolve(any_layout(b), "multi", Platform.parse(want))
    assert str(found.descriptor.digest) == images[want]["digest"]
    assert found.descriptor.platform == Platform.parse(want)


def test_platform_not_in_index(any_layout: LayoutFactory) -> None:
    """A platform the index lacks is NotFound naming the platform."""
    b = LayoutBuilder()
    idx, _ = multi_arch(b)
    b.tag(idx, "multi")
    with pytest.raises(NotFound, match="windows/amd64"):
        resolve(any_layout(b), "multi", Platform.parse("windows/amd64"))


def test_nested_indexes_depth_three(any_layout: LayoutFactory) -> None:
    """index.json -> index -> index -> index -> manifest: found, with all three indexes in the trail."""
    b = LayoutBuilder()
    s390x = platform_image(b, "linux", "s390x")
    other = platform_image(b, "linux", "ppc64le")
    inner = b.index([other, s390x])
    middle = b.index([inner])
    outer = b.index([platform_image(b, "linux", "riscv64"), middle])
    b.tag(outer, "deep")
    layout = any_layout(b)
    found = resolve(layout, "deep", Platform.parse("linux/s390x"))
    assert str(found.descriptor.digest) == s390x["digest"]
    assert [str(d.digest) for d in found.trail] == [outer["digest"], middle["digest"], inner["digest"]]
    # walk sees every document once, depth first, the start first
    seen = [str(d.digest) for d, _ in walk(layout, layout.index().manifests[0])]
    assert seen[:3] == [outer["digest"], seen[1], middle["digest"]]
    assert len(seen) == 6
    # a digest three indexes down resolves too
    assert (
        str(resolve(layout, other["digest"], Platform.parse("linux/ppc64le")).descriptor.digest)
        == (other["digest"])
    )


def test_nesting_beyond_the_limit_is_not_found(any_layout: LayoutFactory) -> None:
    """Indexes nested deeper than MAX_DEPTH are refused with NotFound, not a RecursionError."""
    b = LayoutBuilder()
    desc = platform_image(b, "linux", "s390x")
    for _ in range(resolve_mod.MAX_DEPTH + 3):
        desc = b.index([desc])
    b.tag(desc, "abyss")
    layout = any_layout(b)
    with pytest.raises(NotFound, match="nested deeper"):
        resolve(layout, "abyss", Platform.parse("linux/s390x"))
    with pytest.raises(NotFound, match="nested deeper"):
        list(walk(layout, layout.index().manifests[0]))


def test_refs_last_duplicate_wins(any_layout: LayoutFactory) -> None:
    """Two index.json entries with one ref name: the later one is the ref."""
    b = LayoutBuilder()
    b.tag(b.image([b"old"]), "v1")
    new = b.tag(b.image([b"new"]), "v1")
    b.tag(b.image([b"anon"]), None)
    layout = any_layout(b)
    names = refs(layout)
    assert list(names) == ["v1"]
    assert str(names["v1"].digest) == new["digest"]


# -- referrers -------------------------------------------------------------------------------------------


def _with_referrers(b: LayoutBuilder) -> tuple[Json, Json, Json, Json]:
    image = b.tag(b.image([b"app"]), "app")
    subject = {k: image[k] for k in ("mediaType", "digest", "size")}
    sig = b.tag(b.image([b"signature"], subject=subject, artifact_type=SIG), None)
    sbom_cfg = {"spdx": "2.3"}
    sbom_m = b.image([b"sbom"], config=sbom_cfg, subject=subject)
    # LayoutBuilder gives every config the image config type: rewrite this one's as an SBOM config.
    sbom = b.tag(_retype_config(b, sbom_m, SBOM_CONFIG), None)
    unrelated = b.tag(b.image([b"u"], subject=sig, artifact_type=SIG), None)
    return image, sig, sbom, unrelated


def _retype_config(b: LayoutBuilder, manifest_desc: Json, media_type: str) -> Json:
    path = "blobs/sha256/" + manifest_desc["digest"].split(":", 1)[1]
    doc = json.loads(b.files.pop(path))
    doc["config"]["mediaType"] = media_type
    return b.json_blob(doc, manifest_desc["mediaType"])


def test_referrers_of_an_image(any_layout: LayoutFactory) -> None:
    """Every manifest whose subject is the image is a referrer; others are not."""
    b = LayoutBuilder()
    image, sig, sbom, _ = _with_referrers(b)
    found = referrers(any_layout(b), Digest.parse(image["digest"]))
    assert sorted(str(d.digest) for d in found) == sorted([sig["digest"], sbom["digest"]])


def test_referrers_filtered_by_artifact_type(any_layout: LayoutFactory) -> None:
    """The filter matches artifactType, or the config media type when artifactType is absent."""
    b = LayoutBuilder()
    image, sig, sbom, _ = _with_referrers(b)
    layout = any_layout(b)
    subject = Digest.parse(image["digest"])
    assert [str(d.digest) for d in referrers(layout, subject, SIG)] == [sig["digest"]]
    assert [str(d.digest) for d in referrers(layout, subject, SBOM_CONFIG)] == [sbom["digest"]]
    assert referrers(layout, subject, "application/x-none") == []


def test_referrers_inside_an_index_and_none(any_layout: LayoutFactory) -> None:
    """A referrer reachable only through an index is found once; a digest with no referrers has none."""
    b = LayoutBuilder()
    image = b.tag(b.image([b"app"]), "app")
    subject = {k: image[k] for k in ("mediaType", "digest", "size")}
    sig = b.image([b"sig"], subject=subject, artifact_type=SIG)
    b.tag(b.index([sig]), "sigs")
    b.tag(b.index([sig]), "sigs-again")
    layout = any_layout(b)
    assert [str(d.digest) for d in referrers(layout, Digest.parse(image["digest"]))] == [sig["digest"]]
    assert referrers(layout, Digest.parse(sig["digest"])) == []


# -- platforms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("want", "have", "ok"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/amd64", "linux/arm64", False),
        ("linux/amd64", "windows/amd64", False),
        ("linux/arm", "linux/arm/v7", True),
        ("linux/arm/v7", "linux/arm/v6", False),
        ("linux/arm/v7", "linux/arm", False),
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/arm64/v8", "linux/arm64", True),
        ("linux/arm/v8", "linux/arm", False),
        ("linux/amd64", None, False),
    ],
)
def test_platform_matches(want: str, have: str | None, ok: bool) -> None:
    """A wanted variant must match; arm64's v8 is its default variant."""
    assert platform_matches(Platform.parse(want), None if have is None else Platform.parse(have)) is ok


@pytest.mark.parametrize(
    ("machine", "arch", "variant"),
    [
        ("x86_64", "amd64", None),
        ("aarch64", "arm64", "v8"),
        ("armv7l", "arm", "v7"),
        ("s390x", "s390x", None),
    ],
)
def test_host_platform_uses_go_names(
    monkeypatch: pytest.MonkeyPatch, machine: str, arch: str, variant: str | None
) -> None:
    """The machine name is mapped to image-index.md's (Go's) architecture names."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    p = host_platform()
    assert (p.architecture, p.variant) == (arch, variant)


def test_real_image_resolves(real_layout: Layout) -> None:
    """The umoci+skopeo image resolves by ref and by digest in both backends."""
    found = resolve(real_layout, "v1")
    assert resolve(real_layout, str(found.descriptor.digest)).manifest == found.manifest
    assert resolve(real_layout).descriptor == found.descriptor
