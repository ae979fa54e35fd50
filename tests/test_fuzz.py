"""Property tests: mutated archives and mutated JSON documents never raise anything but OcifuseError.

The core (open_layout, header, index, resolve, referrers, list_blobs, iter_blob, read_blob,
document, the mount's Tree, fsck.check, inspect.summarize) is driven over byte-level mutations of
small valid archives (flips, inserts, deletes, truncation, random tar header fields) and over
structurally mutated index.json, manifests and configs stored under their true digests, so that
parsing is reached. The CI run is bounded (OCIFUSE_FUZZ_EXAMPLES, default 150 per property); set
it to thousands for a longer run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oci import LayoutBuilder
from tarbuild import file_member, layout_members, sample_builder, write_archive

from ocifuse import fsck, inspect, model, resolve
from ocifuse.digest import Digest
from ocifuse.errors import OcifuseError
from ocifuse.layout import Layout
from ocifuse.tree import Tree
from ocifuse.views import open_layout

EXAMPLES = int(os.environ.get("OCIFUSE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis directory in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# ustar header fields (offset, length) a mutation may overwrite.
FIELDS = [(0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (156, 1), (157, 100)]
FIELDS += [(257, 8), (265, 32), (297, 32), (329, 8), (337, 8), (345, 155)]

Json = Any


def _calls(layout: Layout) -> Iterator[Callable[[], object]]:
    """Every core entry point a reader of a layout may call."""
    yield layout.header
    yield layout.index
    yield lambda: resolve.resolve(layout, "v1")
    yield lambda: resolve.resolve(layout, None, model.Platform(os="linux", architecture="amd64"))
    yield lambda: resolve.refs(layout)
    yield lambda: resolve.referrers(layout, Digest.parse("sha256:" + "0" * 64))
    yield lambda: inspect.summarize(layout)
    yield lambda: list(layout.list_blobs())


def exercise(path: Path) -> None:
    """Drive the core over ``path``; only OcifuseError may come out of it."""
    try:
        layout = open_layout(path)
    except OcifuseError:
        return
    with layout:
        if hasattr(layout, "archive"):
            tree = Tree(layout.archive.table.entries)
            for inode in range(1, len(tree) + 1):
                node = tree.node(inode)
                assert node is not None
                tree.path_of(inode)
        for call in _calls(layout):
            with contextlib.suppress(OcifuseError):
                call()
        try:
            descs = list(layout.index().manifests)
        except OcifuseError:
            descs = []
        for desc in descs:
            with contextlib.suppress(OcifuseError):
                layout.document(desc)
            with contextlib.suppress(OcifuseError):
                list(resolve.walk(layout, desc))
        for name, digest in list(layout.list_blobs()):
            try:
                layout.size_of(name)
                if digest is not None:
                    for _ in layout.iter_blob(digest, 4096):
                        pass
                    desc = model.Descriptor(media_type=model.MEDIA_MANIFEST, digest=digest, size=0)
                    layout.read_blob(desc)
            except OcifuseError:
                pass
        report = fsck.check(layout)  # never raises for a bad layout
        assert all(f.code in fsck.CODES for f in report.findings)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One directory for every example's files (hypothesis reruns a test body many times)."""
    with tempfile.TemporaryDirectory(prefix="ocifuse-fuzz-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def seeds(scratch: Path) -> list[bytes]:
    """Small valid archives in three tar formats (a PAX one with a hardlink and a long name)."""
    out = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        b = LayoutBuilder()
        b.tag(b.image([b"layer\n"]), "v1")
        extra = {"x/" + "l" * 120: b"long\n"} if fmt != tarfile.USTAR_FORMAT else {}
        members = layout_members(b, extra=extra)
        path = write_archive(scratch / f"seed-{fmt}.tar", members, fmt, end=True)
        out.append(path.read_bytes())
    return out


Mutation = tuple[str, int, int, bytes]

_mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "field", "field-digits"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=0, max_value=len(FIELDS) - 1),
    st.binary(min_size=1, max_size=24),
)


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    """Apply byte-level and header-field mutations to a tar's bytes."""
    buf = bytearray(data)
    for kind, pos, field, payload in mutations:
        if not buf:
            break
        at = pos % len(buf)
        if kind == "flip":
            buf[at] ^= 1 << (payload[0] % 8)
        elif kind == "set":
            buf[at : at + len(payload)] = payload
        elif kind == "insert":
            buf[at:at] = payload
        elif kind == "delete":
            del buf[at : at + 1 + payload[0] * 4]
        elif kind == "truncate":
            del buf[at:]
        else:
            header = (at // 512) * 512
            off, length = FIELDS[field]
            if kind == "field-digits":
                value = str(int.from_bytes(payload, "big")).encode()
                value = value[:length].ljust(length, b"\0")
            else:
                value = (payload * (length // len(payload) + 1))[:length]
            buf[header + off : header + off + length] = value
    return bytes(buf)


@FUZZ
@given(seed=st.integers(min_value=0, max_value=2), mutations=st.lists(_mutation, min_size=1, max_size=6))
def test_mutated_archives(seeds: list[bytes], scratch: Path, seed: int, mutations: list[Mutation]) -> None:
    """Any mutation of a valid archive gives a usable layout or an OcifuseError, nothing else."""
    path = scratch / "mutated.tar"
    path.write_bytes(mutate(seeds[seed], mutations))
    exercise(path)


@FUZZ
@given(offset=st.integers(min_value=0, max_value=4096), data=st.binary(min_size=512, max_size=512))
def test_random_header_after_valid_members(scratch: Path, offset: int, data: bytes) -> None:
    """A random 512-byte block where a header is expected, after the valid layout's members."""
    path = scratch / "random-header.tar"
    write_archive(path, layout_members(sample_builder()), end=False)
    with open(path, "ab") as f:
        f.write(data + b"\0" * 1024)
    exercise(path)


# -- JSON documents ---------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["sha256:" + "a" * 64, "sha512:xyz", "", model.MEDIA_MANIFEST, model.MEDIA_INDEX]),
)
_json: st.SearchStrategy[Json] = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "schemaVersion",
        "mediaType",
        "manifests",
        "config",
        "layers",
        "digest",
        "size",
        "annotations",
        "platform",
        "subject",
        "artifactType",
        "urls",
        "data",
        "os",
        "architecture",
        "rootfs",
        "history",
    ]
)


def _replace(doc: Json, path: list[int], key: str, value: Json) -> Json:
    """``doc`` with the value at a pseudo-random path (chosen by ``path``) replaced or ``key`` set."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        if isinstance(doc, dict):
            return {**doc, key: value}
        return value
    if isinstance(doc, dict):
        k = sorted(doc)[path[0] % len(doc)]
        return {**doc, k: _replace(doc[k], path[1:], key, value)}
    i = path[0] % len(doc)
    return [*doc[:i], _replace(doc[i], path[1:], key, value), *doc[i + 1 :]]


_edit = st.tuples(st.lists(st.integers(min_value=0, max_value=8), max_size=5), _keys, _json)
_text_edit = st.one_of(st.none(), st.tuples(st.integers(min_value=0, max_value=4096), st.binary(max_size=8)))


def _encode(doc: Json, text_edit: tuple[int, bytes] | None) -> bytes:
    data = json.dumps(doc).encode()
    if text_edit is not None:
        at = text_edit[0] % (len(data) + 1)
        data = data[:at] + text_edit[1] + data[at + len(text_edit[1]) :]
    return data


@FUZZ
@given(
    target=st.sampled_from(["index", "manifest", "config", "nested", "oci-layout"]),
    edits=st.lists(_edit, min_size=1, max_size=3),
    text_edit=_text_edit,
    as_dir=st.booleans(),
)
def test_mutated_documents(
    scratch: Path, target: str, edits: list[tuple[list[int], str, Json]], text_edit: Any, as_dir: bool
) -> None:
    """Mutated index.json, manifests, configs and nested indexes, stored under their true digests."""
    b = LayoutBuilder()
    cfg: Json = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    layer = b.blob(b"layer\n", "application/vnd.oci.image.layer.v1.tar")
    if target == "config":
        for where, key, value in edits:
            cfg = _replace(cfg, where, key, value)
        config = b.blob(_encode(cfg, text_edit), model.MEDIA_CONFIG)
    else:
        config = b.json_blob(cfg, model.MEDIA_CONFIG)
    manifest: Json = {
        "schemaVersion": 2,
        "mediaType": model.MEDIA_MANIFEST,
        "config": config,
        "layers": [layer],
    }
    if target == "manifest":
        for where, key, value in edits:
            manifest = _replace(manifest, where, key, value)
        top = b.blob(_encode(manifest, text_edit), model.MEDIA_MANIFEST)
    else:
        top = b.json_blob(manifest, model.MEDIA_MANIFEST)
    if target == "nested":
        nested: Json = {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": [top]}
        for where, key, value in edits:
            nested = _replace(nested, where, key, value)
        top = b.blob(_encode(nested, text_edit), model.MEDIA_INDEX)
    b.tag(top, "v1")
    files = b.layout_files()
    if target == "index":
        doc = json.loads(files["index.json"])
        for where, key, value in edits:
            doc = _replace(doc, where, key, value)
        files["index.json"] = _encode(doc, text_edit)
    elif target == "oci-layout":
        doc = json.loads(files["oci-layout"])
        for where, key, value in edits:
            doc = _replace(doc, where, key, value)
        files["oci-layout"] = _encode(doc, text_edit)
    if as_dir:
        root = Path(tempfile.mkdtemp(dir=scratch))
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        exercise(root)
    else:
        exercise(write_archive(scratch / "documents.tar", [file_member(n, d) for n, d in files.items()]))
