"""Shared fixtures: a real image built by umoci and skopeo, and both backends of one layout."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import no_new_mounts
from oci import LayoutBuilder
from peers import require_tools, run
from tarbuild import tar_extract

from ocifuse.layout import DirectoryLayout, Layout
from ocifuse.views import open_layout

BACKENDS = ("archive", "directory")
LayoutFactory = Callable[[LayoutBuilder], Layout]


@pytest.fixture(autouse=True, scope="session")
def _private_index_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test (nor an ocifuse it starts) writes the real index cache: the default is a scratch one.

    $CACHE_DIRECTORY is what systemd's CacheDirectory= sets, and the default ocifuse honours first.
    """
    old = os.environ.get("CACHE_DIRECTORY")
    os.environ["CACHE_DIRECTORY"] = str(tmp_path_factory.mktemp("index-cache"))
    yield
    if old is None:
        del os.environ["CACHE_DIRECTORY"]
    else:
        os.environ["CACHE_DIRECTORY"] = old


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test fails (after cleaning up) if it leaves one of its own ocifuse mounts behind."""
    with no_new_mounts(tmp_path_factory.getbasetemp()):
        yield


@dataclass(frozen=True)
class RealImage:
    """A real image: umoci's layout (tags v1, v2), skopeo's oci-archive of v1, and that extracted."""

    umoci_dir: Path
    archive: Path
    layout_dir: Path
    files: dict[str, bytes]  # path inside the image -> content inserted by umoci


@pytest.fixture(scope="session")
def real_image(tmp_path_factory: pytest.TempPathFactory) -> RealImage:
    """Build the real image once per session with umoci and skopeo."""
    require_tools("umoci", "skopeo", "tar")
    root = tmp_path_factory.mktemp("real")
    src = root / "src"
    (src / "etc").mkdir(parents=True)
    files = {
        "/hello.txt": b"hello from umoci\n",
        "/data/big.bin": os.urandom(3 * 1024 * 1024 + 123),
        "/etc/app/app.conf": b"key = value\n",
    }
    (src / "hello.txt").write_bytes(files["/hello.txt"])
    (src / "big.bin").write_bytes(files["/data/big.bin"])
    (src / "etc" / "app.conf").write_bytes(files["/etc/app/app.conf"])
    oci_dir = root / "umoci"
    run("umoci", "init", "--layout", oci_dir)
    run("umoci", "new", "--image", f"{oci_dir}:v1")
    run("umoci", "insert", "--image", f"{oci_dir}:v1", src / "hello.txt", "/hello.txt")
    run("umoci", "insert", "--image", f"{oci_dir}:v1", src / "big.bin", "/data/big.bin")
    run("umoci", "config", "--image", f"{oci_dir}:v1", "--config.cmd", "/hello.txt")
    run("umoci", "insert", "--image", f"{oci_dir}:v1", "--tag", "v2", src / "etc", "/etc/app")
    archive = root / "image.tar"
    run("skopeo", "copy", "--quiet", f"oci:{oci_dir}:v1", f"oci-archive:{archive}:v1")
    return RealImage(
        umoci_dir=oci_dir, archive=archive, layout_dir=tar_extract(archive, root / "extracted"), files=files
    )


@pytest.fixture(scope="session")
def real_archive(real_image: RealImage) -> Path:
    """skopeo's oci-archive of the real image's tag v1."""
    return real_image.archive


@pytest.fixture(scope="session")
def real_layout_dir(real_image: RealImage) -> Path:
    """The same layout as ``real_archive``, extracted with ``tar -x``."""
    return real_image.layout_dir


@pytest.fixture(scope="session")
def real_umoci_dir(real_image: RealImage) -> Path:
    """umoci's own layout directory, with tags v1 and v2."""
    return real_image.umoci_dir


def open_backend(kind: str, path: Path) -> Layout:
    """Open ``path`` as the backend named ``kind`` (one of BACKENDS)."""
    return open_layout(str(path)) if kind == "archive" else DirectoryLayout(str(path))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: ``"archive"`` or ``"directory"``."""
    kind: str = request.param
    return kind


@pytest.fixture
def any_layout(backend: str, tmp_path: Path) -> Iterator[LayoutFactory]:
    """A factory writing a LayoutBuilder as the current backend and opening it; closed at teardown."""
    opened: list[Layout] = []

    def make(builder: LayoutBuilder) -> Layout:
        n = len(opened)
        if backend == "archive":
            path = builder.write_tar(tmp_path / f"layout-{n}.tar")
        else:
            path = builder.write_dir(tmp_path / f"layout-{n}")
        layout = open_backend(backend, path)
        opened.append(layout)
        return layout

    yield make
    for layout in opened:
        layout.close()


@pytest.fixture
def real_layout(backend: str, real_archive: Path, real_layout_dir: Path) -> Iterator[Layout]:
    """The real image, opened in each backend in turn."""
    layout = open_backend(backend, real_archive if backend == "archive" else real_layout_dir)
    yield layout
    layout.close()
