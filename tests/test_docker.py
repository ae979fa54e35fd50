"""docker-archives served as OCI layouts: recognition, the synthesized layout, damage, fsck codes."""

from __future__ import annotations

import gzip
import json
import lzma
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from dockerbuild import DockerArchive, config_json, layer_tar, sha256, two_images
from hypothesis import given, settings
from hypothesis import strategies as st
from tarbuild import file_member, write_archive
from test_hostile import ocifuse as measured

from ocifuse import cli, dockerarchive, fsck, model
from ocifuse.archive import Archive
from ocifuse.cache import IndexCache
from ocifuse.digest import Digest
from ocifuse.dockerarchive import docker_view
from ocifuse.errors import NotAnImage
from ocifuse.layout import MAX_JSON, Layout
from ocifuse.resolve import refs, resolve
from ocifuse.views import ViewOptions, open_layout


def blob(layout: Layout, digest: str) -> bytes:
    return layout.read_small(Digest.parse(digest).path, 1 << 30)


def test_two_images_served_as_a_layout(tmp_path: Path) -> None:
    d = two_images()
    path = d.write(tmp_path / "d.tar")
    with open_layout(str(path)) as layout:
        assert layout.format == "docker-archive"
        assert layout.header().image_layout_version == "1.0.0"
        # One index.json entry per RepoTag, named as written (podman save --format oci-archive does).
        assert list(refs(layout)) == ["localhost/base:latest", "localhost/app:v1", "example.com/team/app:1.0"]
        index = layout.index()
        assert index.manifests[1].digest == index.manifests[2].digest
        for entry in d.manifest:
            found = resolve(layout, entry["RepoTags"][0])
            m = found.manifest
            assert m.config.media_type == model.MEDIA_CONFIG
            assert blob(layout, str(m.config.digest)) == d.files[entry["Config"]]
            assert str(m.config.digest) == "sha256:" + sha256(d.files[entry["Config"]])
            diff_ids = json.loads(d.files[entry["Config"]])["rootfs"]["diff_ids"]
            assert [str(x.digest) for x in m.layers] == diff_ids
            for desc, name in zip(m.layers, entry["Layers"], strict=True):
                assert desc.media_type == "application/vnd.oci.image.layer.v1.tar"
                member = name if name in d.files else d.symlinks[name].removeprefix("../")
                assert blob(layout, str(desc.digest)) == d.files[member]
                assert desc.size == len(d.files[member])
        # Only the layout is served; the docker-archive's own files and symlinks are not.
        names = set(layout.file_names())
        assert {"oci-layout", "index.json"} <= names
        assert all(n in ("oci-layout", "index.json") or n.startswith("blobs/sha256/") for n in names)
        assert layout.skipped == []
        report = fsck.check(layout)
    assert report.findings == () and report.ok
    assert report.blobs_verified == 2 + 2 + 2  # two manifests, two configs, two distinct layers


def test_manifests_are_deterministic(tmp_path: Path) -> None:
    a = two_images().write(tmp_path / "a.tar")
    b = two_images().write(tmp_path / "b.tar")
    with open_layout(str(a)) as la, open_layout(str(b)) as lb:
        assert la.read_small("index.json") == lb.read_small("index.json")
        assert sorted(la.file_names()) == sorted(lb.file_names())
        first = {n: la.read_small(n) for n in la.file_names() if n.startswith("blobs/")}
        assert first == {n: lb.read_small(n) for n in lb.file_names() if n.startswith("blobs/")}
    with open_layout(str(a)) as again:
        assert {n: again.read_small(n) for n in again.file_names() if n.startswith("blobs/")} == first


def test_untagged_image_has_an_unnamed_entry(tmp_path: Path) -> None:
    d = DockerArchive()
    d.add_image([layer_tar({"a": b"a"})], [])
    d.manifest[0]["RepoTags"] = None
    with open_layout(str(d.write(tmp_path / "d.tar"))) as layout:
        (desc,) = layout.index().manifests
        assert desc.ref_name is None
        assert fsck.check(layout).findings == ()


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_compressed_layers_keep_their_type_and_digest(tmp_path: Path, kind: str) -> None:
    d = DockerArchive()
    plain = layer_tar({"f": b"data\n" * 1000})
    d.add_image([plain], ["c:1"], compress=True)
    name = d.manifest[0]["Layers"][0]
    if kind == "zstd":  # the magic bytes decide (RFC 8878 3.1.1), whatever follows them
        d.files[name] = b"\x28\xb5\x2f\xfd" + d.files[name]
    stored = d.files[name]
    with open_layout(str(d.write(tmp_path / "d.tar"))) as layout:
        (desc,) = resolve(layout, "c:1").manifest.layers
        assert desc.media_type == f"application/vnd.oci.image.layer.v1.tar+{kind}"
        assert str(desc.digest) == "sha256:" + sha256(stored)
        assert blob(layout, str(desc.digest)) == stored
        assert fsck.check(layout).findings == ()
    assert gzip.decompress(stored if kind == "gzip" else stored[4:]) == plain


def test_a_compressed_layer_is_hashed_once_across_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its digest (which nothing in the archive records) is stored under the archive's identity."""
    d = DockerArchive()
    d.add_image([layer_tar({"f": b"data\n" * 1000})], ["c:1"], compress=True)
    path = str(d.write(tmp_path / "d.tar"))
    options = ViewOptions(cache=IndexCache(str(tmp_path / "cache")))
    with open_layout(path, options) as layout:
        first = resolve(layout, "c:1").manifest.layers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("hashed again")

    with monkeypatch.context() as m:
        m.setattr(dockerarchive, "hash_source", refuse)
        with open_layout(path, options) as layout:
            assert resolve(layout, "c:1").manifest.layers == first
        with pytest.raises(AssertionError, match="hashed again"):  # fsck trusts nothing stored
            open_layout(path, ViewOptions(cache=options.cache, rescan=True))


def test_docker25_archive_is_served_as_it_is(tmp_path: Path) -> None:
    """An OCI layout with a manifest.json too (Docker 25+ docker save): the layout, extra files included."""
    from tarbuild import layout_members, sample_builder

    b = sample_builder()
    path = write_archive(
        tmp_path / "d25.tar", layout_members(b, extra={"manifest.json": b'[{"Config": "x", "Layers": []}]'})
    )
    with open_layout(str(path)) as layout:
        assert layout.format == "oci-archive"
        assert docker_view(layout) is None
        assert "manifest.json" in set(layout.file_names())
        assert layout.read_small("index.json") == b.layout_files()["index.json"]


def test_symlink_table_last_member_wins(tmp_path: Path) -> None:
    d = two_images()
    link = next(iter(d.symlinks))
    members = [*d.members(), file_member(link, b"a file now")]
    archive = Archive(str(write_archive(tmp_path / "d.tar", members)))
    try:
        assert link not in archive.table.symlinks
        assert archive.table.entries[link].size == len(b"a file now")
        assert set(archive.table.symlinks) == set(d.symlinks) - {link}
    finally:
        archive.close()


def test_neither_layout_nor_docker_archive(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "rootfs.tar", [file_member("etc/hostname", b"box\n")])
    archive = Archive(str(path))
    try:
        assert dockerarchive.archive_format(archive.table) is None
    finally:
        archive.close()
    with pytest.raises(NotAnImage, match=r"not an image archive \(no oci-layout, index.json or manifest"):
        open_layout(str(path))


# -- damage: one case per docker-* finding code ----------------------------------------------------

Damage = Callable[[DockerArchive, Path], Path]


def _write(d: DockerArchive, tmp: Path) -> Path:
    return d.write(tmp / "d.tar")


def _manifest_not_json(d: DockerArchive, tmp: Path) -> Path:
    return d.write(tmp / "d.tar", manifest_bytes=b"[{not json")


def _manifest_not_a_list(d: DockerArchive, tmp: Path) -> Path:
    return d.write(tmp / "d.tar", manifest_bytes=b'{"Config": "x"}')


def _manifest_no_config(d: DockerArchive, tmp: Path) -> Path:
    del d.manifest[1]["Config"]
    return _write(d, tmp)


def _manifest_huge(d: DockerArchive, tmp: Path) -> Path:
    text = json.dumps(d.manifest).encode()
    pad = b" " * (dockerarchive.MAX_MANIFEST_JSON + 1 - len(text))
    return d.write(tmp / "d.tar", manifest_bytes=text + pad)


def _missing_layer(d: DockerArchive, tmp: Path) -> Path:
    d.manifest[1]["Layers"][1] = "nowhere.tar"
    return _write(d, tmp)


def _missing_config(d: DockerArchive, tmp: Path) -> Path:
    del d.files[d.manifest[1]["Config"]]
    return _write(d, tmp)


def _dotdot_layer(d: DockerArchive, tmp: Path) -> Path:
    d.manifest[1]["Layers"][1] = "../" + d.manifest[0]["Layers"][0]
    return _write(d, tmp)


def _absolute_layer(d: DockerArchive, tmp: Path) -> Path:
    d.manifest[1]["Layers"][1] = "/etc/passwd"
    return _write(d, tmp)


def _symlink_out(d: DockerArchive, tmp: Path) -> Path:
    link = d.manifest[1]["Layers"][1]
    d.symlinks[link] = "../../../../etc/passwd"
    return _write(d, tmp)


def _symlink_absolute(d: DockerArchive, tmp: Path) -> Path:
    link = d.manifest[1]["Layers"][1]
    d.symlinks[link] = "/etc/passwd"
    return _write(d, tmp)


def _symlink_loop(d: DockerArchive, tmp: Path) -> Path:
    link = d.manifest[1]["Layers"][1]
    d.symlinks[link] = "../loop/a"
    d.symlinks["loop/a"] = "b"
    d.symlinks["loop/b"] = "./a"
    return _write(d, tmp)


def _config_not_json(d: DockerArchive, tmp: Path) -> Path:
    # Renamed to its own new sha256, so only the content is wrong.
    old = d.manifest[1]["Config"]
    del d.files[old]
    data = b"{not json"
    d.manifest[1]["Config"] = f"{sha256(data)}.json"
    d.files[d.manifest[1]["Config"]] = data
    return _write(d, tmp)


def _config_digest(d: DockerArchive, tmp: Path) -> Path:
    name = d.manifest[1]["Config"]
    d.files[name] = d.files[name].replace(b'"Cmd":["/bin/sh"]', b'"Cmd":["/bin/evil"]')
    return _write(d, tmp)


def _layer_count(d: DockerArchive, tmp: Path) -> Path:
    d.manifest[1]["Layers"].pop()
    return _write(d, tmp)


def _xz_layer(d: DockerArchive, tmp: Path) -> Path:
    name = d.manifest[0]["Layers"][0]
    d.files[name] = lzma.compress(d.files[name])
    return _write(d, tmp)


def _diff_id(d: DockerArchive, tmp: Path) -> Path:
    name = d.manifest[0]["Layers"][0]
    data = bytearray(d.files[name])
    data[600] ^= 0x01  # a byte of the first file's content
    d.files[name] = bytes(data)
    return _write(d, tmp)


# code -> (damage, how many images are still served of the two)
CASES: dict[str, list[tuple[Damage, int]]] = {
    "docker-manifest-invalid": [
        (_manifest_not_json, 0),
        (_manifest_not_a_list, 0),
        (_manifest_no_config, 1),
        (_manifest_huge, 0),
    ],
    "docker-member-missing": [(_missing_layer, 1), (_missing_config, 1)],
    "docker-path-invalid": [(_dotdot_layer, 1), (_absolute_layer, 1)],
    "docker-symlink-escape": [(_symlink_out, 1), (_symlink_absolute, 1)],
    "docker-symlink-loop": [(_symlink_loop, 1)],
    "docker-config-invalid": [(_config_not_json, 1)],
    "docker-config-digest": [(_config_digest, 2)],
    "docker-layer-count": [(_layer_count, 1)],
    "docker-layer-compression": [(_xz_layer, 0)],
}
# Not a docker-* code: the one code for a layer whose content is not its diff_id (fsck --layers too).
DIFF_ID_CASES = [pytest.param("diffid-mismatch", _diff_id, 2, id="diffid-mismatch")]
PARAMS = [
    pytest.param(code, damage, served, id=f"{code}-{damage.__name__.strip('_')}")
    for code, cases in CASES.items()
    for damage, served in cases
] + DIFF_ID_CASES


def test_every_docker_code_has_a_case() -> None:
    assert set(CASES) == {c for c in fsck.CODES if c.startswith("docker-")}


@pytest.mark.parametrize(("code", "damage", "served"), PARAMS)
def test_damage_is_named_by_fsck(tmp_path: Path, code: str, damage: Damage, served: int) -> None:
    path = damage(two_images(), tmp_path)
    with open_layout(str(path)) as layout:
        assert layout.format == "docker-archive"
        docker = docker_view(layout)
        assert docker is not None
        assert len(docker.images) == served
        report = fsck.check(layout)
        # Nothing of the damaged archive is served from outside it: every blob is a member's bytes.
        for name in layout.file_names():
            assert name in ("oci-layout", "index.json") or name.startswith("blobs/sha256/")
    assert code in report.codes
    assert not report.ok
    assert {f.code for f in report.findings} <= {code, "blob-unreferenced"}
    for f in report.findings:
        assert f.message and "\n" not in f.message
        assert f.severity is fsck.CODES[f.code]


@pytest.mark.parametrize(("code", "damage", "served"), PARAMS)
def test_damage_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], code: str, damage: Damage, served: int
) -> None:
    path = str(damage(two_images(), tmp_path))
    assert cli.main(["fsck", "--json", path]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert code in {f["code"] for f in doc["findings"]}
    assert cli.main(["inspect", "--json", path]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "docker-archive"
    assert len({r["digest"] for r in summary["refs"]}) == served
    if code != "diffid-mismatch":  # taken on trust until fsck hashes the layer
        assert any(p.startswith(f"{code}: ") for p in summary["problems"])
    assert cli.main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith("(docker-archive, served as oci-layout 1.0.0)")


def test_symlink_escape_never_reads_outside(tmp_path: Path) -> None:
    """A layer symlink to a file that exists outside the archive is refused, not followed."""
    outside = tmp_path / "secret.tar"
    outside.write_bytes(b"secret" * 100)
    d = two_images()
    link = d.manifest[1]["Layers"][1]
    d.symlinks[link] = f"../../{outside.name}"
    (tmp_path / "in").mkdir()
    with open_layout(d.write(tmp_path / "in" / "d.tar")) as layout:
        for name in layout.file_names():
            assert b"secret" not in layout.read_small(name, 1 << 30)
        docker = docker_view(layout)
        assert docker is not None
        assert [p.code for p in docker.problems] == ["docker-symlink-escape"]


# -- bounds: what a small manifest.json can make ocifuse hold and do --------------------------------


def _amplifying(tmp_path: Path, images: int, layers: int, tags: int) -> Path:
    """``images`` images of ``layers`` layers and ``tags`` tags each, all one short path or tag."""
    layer = layer_tar({"f": b"x"})
    config = config_json([f"sha256:{sha256(layer)}"] * layers)
    config_name = f"{sha256(config)}.json"
    listed = [{"Config": config_name, "RepoTags": ["a"] * tags, "Layers": ["a.tar"] * layers}] * images
    members = [
        file_member("a.tar", layer),
        file_member(config_name, config),
        file_member("manifest.json", json.dumps(listed, separators=(",", ":")).encode()),
    ]
    return write_archive(tmp_path / "amplify.tar", members)


@pytest.mark.parametrize(
    ("images", "layers", "tags"),
    [(120, dockerarchive.MAX_LAYERS, 1), (1, 1, 800_000)],
    ids=["layers", "tags"],
)
def test_amplification_is_bounded(tmp_path: Path, images: int, layers: int, tags: int) -> None:
    """A 4 MB manifest.json that would make gigabytes of manifests (or index.json) is cut short."""
    path = _amplifying(tmp_path, images, layers, tags)
    assert path.stat().st_size < dockerarchive.MAX_MANIFEST_JSON + (1 << 20)
    with open_layout(str(path)) as layout:
        docker = docker_view(layout)
        assert docker is not None
        (problem,) = docker.problems
        assert problem.code == "docker-manifest-invalid" and "not served" in problem.message
        made = sum(len(d) for d in docker.documents)
        assert made <= dockerarchive.MAX_DOCUMENTS + 2 * MAX_JSON  # the manifests, index.json, oci-layout
        assert 0 < len(layout.index().manifests) <= dockerarchive.MAX_REFS
    work = tmp_path / "cwd"
    work.mkdir()
    # The installed command, its peak RSS measured against the hostile corpus's bound.
    done = measured(work, "fsck", path)
    assert done.returncode == 1 and "docker-manifest-invalid" in done.stdout
    done = measured(work, "inspect", path)
    assert done.returncode == 0 and "not served from the docker-archive" in done.stdout


def test_compressed_layer_diff_id_is_checked_by_fsck_layers(tmp_path: Path) -> None:
    """A gzip layer is served under its own digest; its diff_id needs decompressing: fsck --layers."""
    d = DockerArchive()
    d.add_image([layer_tar({"f": b"data\n"})], ["c:1"], compress=True)
    name = d.manifest[0]["Layers"][0]
    d.files[name] = gzip.compress(layer_tar({"f": b"DATA\n"}), mtime=0)  # not what diff_ids says
    with open_layout(str(d.write(tmp_path / "d.tar"))) as layout:
        assert fsck.check(layout).findings == ()
        report = fsck.check(layout, layers=True)
    assert [f.code for f in report.findings] == ["diffid-mismatch"]
    assert report.findings[0].digest == "sha256:" + sha256(d.files[name])


# -- properties: any manifest.json, any symlink graph ----------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_NAMES = st.sampled_from(["a.tar", "d/layer.tar", "d/e/l", "cfg.json", "..", "/x", "d", "missing", ""])


@settings(max_examples=150, deadline=None, database=None)
@given(
    images=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "Config": _NAMES | _JSON,
                "Layers": st.lists(_NAMES, max_size=3) | _JSON,
                "RepoTags": st.lists(st.text(max_size=6), max_size=2) | _JSON,
            },
        ),
        max_size=3,
    )
    | _JSON,
    links=st.dictionaries(
        _NAMES, st.sampled_from(["a.tar", "../a.tar", "e/l", "../../x", "/a.tar", "layer.tar"])
    ),
)
def test_any_manifest_json_and_symlinks(images: object, links: dict[str, str]) -> None:
    """Never an exception: every problem has a docker-* code, every blob is an archive member's bytes."""
    layer = layer_tar({"f": b"x"})
    config = config_json([f"sha256:{sha256(layer)}"])
    d = DockerArchive(
        files={"a.tar": layer, "cfg.json": config}, symlinks={k: v for k, v in links.items() if k}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = d.write(Path(tmp) / "d.tar", manifest_bytes=json.dumps(images).encode())
        with open_layout(str(path)) as layout:
            docker = docker_view(layout)
            assert docker is not None
            for p in docker.problems:
                assert p.code in fsck.CODES and p.code.startswith("docker-")
                assert "\n" not in str(p)
            served = {layout.read_small(n, 1 << 20) for n in layout.file_names() if n.startswith("blobs/")}
            members = {layer, config}
            documents = set(docker.documents)
            assert served <= members | documents
            report = fsck.check(layout)
            assert all(f.code in fsck.CODES for f in report.findings)
