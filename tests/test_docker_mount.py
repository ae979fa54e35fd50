"""docker-archives written by podman, mounted: skopeo, umoci and podman read them as OCI layouts.

Images are built without network (``buildah from scratch`` + busybox-static) in a podman/buildah
store under the session's tmp directory (``--root``/``--runroot``), never the machine's storage.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerbuild import two_images
from mounting import mounted, run_ocifuse
from peers import PODMAN_RUN, busybox, isolated_store, require_tools, run
from tarbuild import tree_of

from ocifuse.compressed import open_decompressed
from ocifuse.source import FileRange, OpenFile
from ocifuse.zstdsource import ZstdFrames

pytestmark = pytest.mark.fuse

BASE = "localhost/bb:latest"
APP = "localhost/bb2:v1"
APP_FILE = b"written by the second layer\n"


@dataclass(frozen=True)
class Saved:
    """podman's docker-archives: one image, and two images in one archive (``save -m``)."""

    single: Path
    multi: Path
    work: Path
    chunked: Path  # APP pushed as an OCI layout with zstd:chunked layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    """Build two images (the second on the first) with buildah and save them with podman."""
    require_tools("podman", "buildah", "busybox", "skopeo", "umoci")
    work = tmp_path_factory.mktemp("docker")
    with isolated_store(work) as store:
        ctr = store.buildah("from", "scratch").strip()
        store.buildah("copy", ctr, busybox(), "/bin/busybox")
        store.buildah("config", "--cmd", '["/bin/busybox","echo","hello from the mount"]', ctr)
        store.buildah("commit", "-q", ctr, BASE)
        (work / "two").write_bytes(APP_FILE)
        ctr2 = store.buildah("from", BASE).strip()
        store.buildah("copy", ctr2, work / "two", "/two")
        store.buildah("commit", "-q", ctr2, APP)
        single, multi = work / "single.tar", work / "multi.tar"
        store.podman("save", "-q", "--format", "docker-archive", "-o", single, BASE)
        store.podman("save", "-q", "-m", "--format", "docker-archive", "-o", multi, BASE, APP)
        chunked = work / "chunked"
        store.podman("push", "-q", "--compression-format", "zstd:chunked", APP, f"oci:{chunked}:v1")
        yield Saved(single, multi, work, chunked)


def _files(d: Path) -> dict[str, bytes]:
    """The files of skopeo's ``dir:`` copy but its manifest.json."""
    files, _ = tree_of(d)
    del files["manifest.json"]
    return files


@pytest.mark.parametrize(("which", "tags"), [("single", [BASE]), ("multi", [BASE, APP])])
def test_skopeo_reads_the_mount_as_the_archive(
    saved: Saved, tmp_path: Path, which: str, tags: list[str]
) -> None:
    archive = saved.single if which == "single" else saved.multi
    with mounted(archive, tmp_path / "mnt") as m:
        index = json.loads((m.mountpoint / "index.json").read_bytes())
        assert [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]] == tags
        for tag in tags:
            info = json.loads(run("skopeo", "inspect", f"oci:{m.mountpoint}:{tag}"))
            assert info["Digest"] in {d["digest"] for d in index["manifests"]}
            assert info["Architecture"] and info["Os"] == "linux"
            a, b = tmp_path / f"a-{len(tag)}", tmp_path / f"b-{len(tag)}"
            run("skopeo", "copy", "--quiet", f"oci:{m.mountpoint}:{tag}", f"dir:{a}")
            run("skopeo", "copy", "--quiet", f"docker-archive:{archive}:{tag}", f"dir:{b}")
            # The same config and layer blobs, byte for byte, under the same names (their digests).
            assert _files(a) == _files(b)
            layers = json.loads((a / "manifest.json").read_bytes())["layers"]
            assert [layer["digest"] for layer in layers] == info["Layers"]
        # Nothing to warn about: the layer.tar symlinks are resolved or moot, not "not served".
        assert "WARNING" not in m.stderr(), m.stderr()


def test_umoci_unpacks_the_mount(saved: Saved, tmp_path: Path) -> None:
    with mounted(saved.multi, tmp_path / "mnt") as m:
        run("umoci", "unpack", "--rootless", "--image", f"{m.mountpoint}:{APP}", tmp_path / "bundle")
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "bin" / "busybox").read_bytes() == busybox().read_bytes()
    assert (rootfs / "two").read_bytes() == APP_FILE
    config = json.loads((tmp_path / "bundle" / "config.json").read_bytes())
    assert config["process"]["args"] == ["/bin/busybox", "echo", "hello from the mount"]


def test_podman_pulls_and_runs_from_the_mount(saved: Saved, tmp_path: Path) -> None:
    with isolated_store(tmp_path) as store:
        with mounted(saved.multi, tmp_path / "mnt") as m:
            store.podman("pull", "-q", f"oci:{m.mountpoint}:{APP}")
            with tarfile.open(saved.multi) as tf:
                listed = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config = next(e["Config"] for e in listed if APP in e["RepoTags"])
        # podman names an image by its config's digest: the same image as the archive's.
        (image_id,) = store.podman("images", "--no-trunc", "--format", "{{.ID}}").split()
        assert image_id.removeprefix("sha256:") == config.removesuffix(".json")
        out = store.podman(
            "run",
            "--rm",
            *PODMAN_RUN,
            image_id,
            "/bin/busybox",
            "cat",
            "/two",
        )
        assert out.encode() == APP_FILE


@pytest.mark.parametrize("which", ["single", "multi"])
def test_fsck_and_inspect_of_podman_archives(saved: Saved, which: str) -> None:
    archive = saved.single if which == "single" else saved.multi
    done = run_ocifuse("fsck", "--json", archive)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["findings"] == []
    done = run_ocifuse("inspect", "--json", archive)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"] == "docker-archive"
    assert [r["name"] for r in summary["refs"]] == ([BASE] if which == "single" else [BASE, APP])


def test_fsck_names_a_damaged_layer_of_a_podman_archive(saved: Saved, tmp_path: Path) -> None:
    """One flipped byte inside a layer: fsck says which layer no longer hashes to its diff_id."""
    damaged = tmp_path / "damaged.tar"
    shutil.copyfile(saved.single, damaged)
    with tarfile.open(damaged) as tf:
        layer = next(i for i in tf.getmembers() if i.isfile() and i.name.endswith(".tar"))
    with open(damaged, "r+b") as f:
        f.seek(layer.offset_data + layer.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    done = run_ocifuse("fsck", "--json", damaged)
    assert done.returncode == 1
    (finding,) = json.loads(done.stdout)["findings"]
    assert finding["code"] == "diffid-mismatch"
    assert finding["digest"] == "sha256:" + layer.name.removesuffix(".tar")
    # The mount serves it still (taken on trust); with verify, reading the damaged layer is EIO.
    with mounted(damaged, tmp_path / "mnt", options=["verify"]) as m:
        blob = m.mountpoint / "blobs" / "sha256" / layer.name.removesuffix(".tar")
        with pytest.raises(OSError) as err:
            blob.read_bytes()
        assert err.value.errno == 5


def test_a_tar_that_is_no_image_gets_one_refusal_from_every_command(tmp_path: Path) -> None:
    """A root filesystem tar (neither oci-layout, index.json nor manifest.json): the same line, exit 2."""
    rootfs = tmp_path / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tf:
        tf.add(busybox(), "bin/busybox")
    (tmp_path / "mnt").mkdir()
    line = f"ocifuse: {rootfs}: not an image archive (no oci-layout, index.json or manifest.json)"
    argvs: list[list[str | Path]] = [
        ["mount", "-f", rootfs, tmp_path / "mnt"],
        ["mount", "-f", "--rootfs", rootfs, tmp_path / "mnt"],
        ["inspect", rootfs],
        ["fsck", rootfs],
    ]
    for argv in argvs:
        done = run_ocifuse(*argv)
        assert (done.returncode, done.stdout, done.stderr.strip().splitlines()) == (2, "", [line]), argv
    done = run_ocifuse("fsck", "--json", rootfs)
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert [f["code"] for f in report["findings"]] == ["not-an-image"]
    assert report["compression"] == "plain"


def test_mount_serves_the_images_it_can_and_warns(tmp_path: Path) -> None:
    """One image damaged: a warning line names its problem, the other image is served."""
    d = two_images()
    d.manifest[1]["Layers"].pop()
    with mounted(d.write(tmp_path / "d.tar"), tmp_path / "mnt") as m:
        index = json.loads((m.mountpoint / "index.json").read_bytes())
        names = [e["annotations"]["org.opencontainers.image.ref.name"] for e in index["manifests"]]
        assert names == ["localhost/base:latest"]
        warnings = [line for line in m.stderr().splitlines() if "docker-archive" in line]
    assert len(warnings) == 1 and "docker-layer-count" in warnings[0]


def test_mount_refuses_a_docker_archive_with_nothing_to_serve(tmp_path: Path) -> None:
    path = two_images().write(tmp_path / "d.tar", manifest_bytes=b"[{not json")
    (tmp_path / "mnt").mkdir()
    done = run_ocifuse("mount", "-f", path, tmp_path / "mnt")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        f"ocifuse: {path}: docker-archive with no image to serve: manifest.json: not valid JSON"
    )


def test_rootfs_of_a_docker_archive_image(saved: Saved, tmp_path: Path) -> None:
    """mount --rootfs reads the docker-archive through the same OCI view: the image's merged tree."""
    with mounted(saved.multi, tmp_path / "mnt", args=["--rootfs", "--ref", APP]) as m:
        assert (m.mountpoint / "two").read_bytes() == APP_FILE
        assert (m.mountpoint / "bin" / "busybox").read_bytes() == busybox().read_bytes()


def test_gzipped_docker_archive(saved: Saved, tmp_path: Path) -> None:
    """``docker save | gzip``: the compressed archive is served as the same OCI layout."""
    gz = tmp_path / "multi.tar.gz"
    with open(saved.multi, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with mounted(saved.multi, tmp_path / "plain") as plain, mounted(gz, tmp_path / "gz") as m:
        for name in ("index.json", "oci-layout"):
            assert (m.mountpoint / name).read_bytes() == (plain.mountpoint / name).read_bytes()
        info = json.loads(run("skopeo", "inspect", f"oci:{m.mountpoint}:{APP}"))
        assert (
            info["Layers"] == json.loads(run("skopeo", "inspect", f"oci:{plain.mountpoint}:{APP}"))["Layers"]
        )
    done = run_ocifuse("fsck", "--json", gz)
    assert done.returncode == 0 and json.loads(done.stdout)["findings"] == []


def test_zstd_chunked_layers_are_read_in_place(saved: Saved, tmp_path: Path) -> None:
    """podman's zstd:chunked layers (containers/storage pkg/chunked): frames read in place, no spill;
    their diff_id is the config's; the root filesystem through the mount holds the files put in it."""
    manifest_digest = json.loads((saved.chunked / "index.json").read_bytes())["manifests"][0]["digest"]
    manifest = json.loads((saved.chunked / "blobs/sha256" / manifest_digest[7:]).read_bytes())
    layers = manifest["layers"]
    assert layers and all("io.containers.zstd-chunked.manifest-position" in d["annotations"] for d in layers)
    config = json.loads((saved.chunked / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    for desc, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
        file = OpenFile(str(saved.chunked / "blobs/sha256" / desc["digest"][7:]))
        try:
            source = open_decompressed(FileRange(file), key=None, cache=None, name=desc["digest"])
            assert isinstance(source, ZstdFrames)  # the frame table: no spill file
            assert str(source.uncompressed_digest) == diff_id
            source.close()
        finally:
            file.close()
    with mounted(saved.chunked, tmp_path / "mnt", args=["--rootfs"]) as m:
        assert (m.mountpoint / "bin/busybox").read_bytes() == busybox().read_bytes()
        assert (m.mountpoint / "two").read_bytes() == APP_FILE
