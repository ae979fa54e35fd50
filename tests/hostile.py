"""The hostile corpus: oci-archives written by an attacker, each wrapped around a valid small image.

Every builder takes ``(directory, target)`` and returns the archive it wrote in ``directory``.
``target`` is an empty sentinel directory that traversal names, absolute names and links point
into: after any command runs on the archive, ``target`` must still be empty. Headers are written
raw (tests/tarbuild.py's ``raw_header``) where ``tarfile`` would refuse or fix them up (absurd PAX
records, GNU sparse maps, sizes running past the end of the file), and fast where the corpus is
large (100,000 members).

``CORPUS`` maps a case name to a ``HostileCase``: how to build it, what ``ocifuse fsck`` must
answer (exit status and finding codes), and whether a mount must refuse it or serve it. When
served, ``valid`` is every file of the valid part, with the bytes the mount must give.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from oci import LayoutBuilder
from tarbuild import (
    BLOCK,
    Member,
    dir_member,
    end_archive,
    file_member,
    layout_members,
    link_member,
    pax_record,
    raw_header,
    sample_builder,
    write_member,
    write_pax,
    write_raw,
)

from ocifuse import model

# Enough ``..`` components to climb from any working directory to ``/``.
UP = "../" * 24
# Sizes of the large cases.
MANY_MEMBERS = 100_000
DEPTH = 1000
BIG_INDEX_BYTES = 50 * 1000 * 1000
DEEP_JSON = 100_000


@dataclass(frozen=True)
class HostileCase:
    """One hostile archive and what each command must make of it."""

    build: Callable[[Path, Path], Path]
    fsck_exit: int  # 0: warnings only, 1: error findings, 2: not a usable archive at all
    fsck_codes: frozenset[str]  # codes the report must contain
    mount_refuses: bool = False
    # The files of the valid part, as the mount must serve them (ignored when the mount refuses).
    valid: dict[str, bytes] = field(default_factory=dict)
    ref: str | None = "v1"  # a ref skopeo must be able to inspect through the mount (None: skip)
    # Paths the mount must not serve (symlinks, devices, refused names normalized, ...).
    absent: frozenset[str] = frozenset()
    inspect_ok: bool = True  # ``ocifuse inspect --ref v1`` succeeds (exit 0)


def _valid() -> LayoutBuilder:
    return sample_builder()


def _files(builder: LayoutBuilder | None = None) -> dict[str, bytes]:
    return (builder or _valid()).layout_files()


@contextlib.contextmanager
def _writing(out: Path, members: Sequence[Member] = ()) -> Iterator[BinaryIO]:
    """Write ``out``: ``members``, then whatever the body writes to the file, then the end blocks."""
    with open(out, "wb", buffering=1 << 20) as f:
        for m in members:
            write_member(f, m)
        yield f
        end_archive(f)


def _members(out: Path, members: Sequence[Member]) -> Path:
    """``members`` as an archive at ``out``."""
    with _writing(out, members):
        pass
    return out


def _archive(directory: Path, name: str, before: list[Member], after: list[Member]) -> Path:
    """The valid image's members, with hostile members before and after them."""
    return _members(directory / name, [*before, *layout_members(_valid()), *after])


def _files_archive(directory: Path, name: str, files: dict[str, bytes]) -> Path:
    """``files`` as regular members only (no directory members), in their order."""
    return _members(directory / name, [file_member(n, data) for n, data in files.items()])


def _with_mode(m: Member, mode: int) -> Member:
    m.info.mode = mode
    return m


def _special(name: str, type_: bytes, major: int = 0, minor: int = 0) -> Member:
    m = dir_member(name) if type_ == tarfile.DIRTYPE else file_member(name, b"")
    m.info.type = type_
    m.info.devmajor, m.info.devminor = major, minor
    return m


# -- the cases -------------------------------------------------------------------------------------


def traversal(directory: Path, target: Path) -> Path:
    """Absolute names and ``..`` names aimed at ``target``, before and after the valid image."""
    rel = str(target).lstrip("/")
    evil = [
        file_member(f"{target}/absolute", b"planted by an absolute name\n"),
        file_member(f"{UP}{rel}/dotdot", b"planted by a .. name\n"),
        file_member(f"blobs/{UP}{rel}/inner-dotdot", b"planted by a .. inside blobs/\n"),
        file_member(f"./{UP}{rel}/dot-dotdot", b"planted by ./..\n"),
        dir_member(f"{target}/absolute-dir/"),
        file_member(f"blobs/sha256/../../{UP}{rel}/x", b"x\n"),
        file_member("..", b"the parent itself\n"),
        file_member("", b"an empty name\n"),
        file_member("/", b"the root itself\n"),
    ]
    return _archive(directory, "traversal.tar", evil[:3], evil[3:])


def links_outside(directory: Path, target: Path) -> Path:
    """Symlinks and hardlinks to /etc/passwd, ``../..`` and ``target``; a symlinked dir written through."""
    rel = str(target).lstrip("/")
    sym = tarfile.SYMTYPE
    files = _files()
    blob = next(n for n in files if n.startswith("blobs/"))
    evil = [
        link_member("passwd-abs", "/etc/passwd", sym),
        link_member("passwd-up", "../../etc/passwd", sym),
        link_member("hl-passwd-abs", "/etc/passwd"),
        link_member("hl-passwd-up", "../../etc/passwd"),
        link_member("hl-target", f"{UP}{rel}/hardlinked"),
        # The classic extraction attack: a symlinked directory, then a file written through it.
        link_member("escape", str(target), sym),
        file_member("escape/planted", b"written through a symlinked directory\n"),
        link_member("blobs/sha256/escape-rel", f"{UP}{rel}", sym),
        file_member("blobs/sha256/escape-rel/planted", b"written through a relative symlink\n"),
        # A symlink and a hardlink over a valid blob: neither replaces it.
        link_member(blob, "/etc/passwd", sym),
        link_member("hl-to-symlink", "passwd-abs"),
        link_member("hl-to-dir", "blobs"),
        link_member("hl-to-later", "not-yet-there"),
        file_member("not-yet-there", b"defined after the hardlink to it\n"),
        link_member("hl-ok", "oci-layout"),
    ]
    return _archive(directory, "links-outside.tar", [], evil)


def devices(directory: Path, target: Path) -> Path:
    """Character and block devices, fifos, and the tar types nobody should serve."""
    evil = [
        _special("dev/null", tarfile.CHRTYPE, 1, 3),
        _special("dev/sda", tarfile.BLKTYPE, 8, 0),
        _special("dev/mem", tarfile.CHRTYPE, 1, 1),
        _special("fifo", tarfile.FIFOTYPE),
        _special("blobs/sha256/fifo", tarfile.FIFOTYPE),
        _special("index.json", tarfile.FIFOTYPE),  # over the valid index.json: not served, so no effect
        _special("volume", b"V"),
        _special("multivolume", b"M"),
        _special("unknown-type", b"Z"),
    ]
    return _archive(directory, "devices.tar", [], evil)


def setuid(directory: Path, target: Path) -> Path:
    """setuid, setgid and sticky bits on files, directories and the valid image's own members."""
    members = layout_members(_valid())
    for m in members:
        m.info.mode = 0o7777 if m.info.isdir() else 0o6755
    evil = [
        _with_mode(file_member("suid-root", b"#!/bin/sh\nid\n"), 0o4755),
        _with_mode(file_member("sgid", b"#!/bin/sh\nid\n"), 0o2755),
        _with_mode(dir_member("sticky/"), 0o1777),
        _with_mode(file_member("sticky/world-writable", b"w\n"), 0o7777),
    ]
    for m in [*members, *evil]:
        m.info.uid = m.info.gid = 0
    return _members(directory / "setuid.tar", [*members, *evil])


def pax_absurd(directory: Path, target: Path) -> Path:
    """PAX records with absurd values that still leave a readable archive: every member is served."""
    out = directory / "pax-absurd.tar"
    with _writing(out) as f:
        records = [
            pax_record("mtime", "1e400"),
            pax_record("mtime", "-99999999999999999999"),
            pax_record("uid", "99999999999999999999999"),
            pax_record("atime", "nan"),
            pax_record("comment", "x" * 100_000),
            pax_record("SCHILY.xattr.security.capability", "\x01\x00\x00\x02\xff\xff\xff\xff"),
            pax_record("SCHILY.xattr.user.evil", "y"),
        ]
        for i, m in enumerate(layout_members(_valid())):
            if m.info.isreg():
                write_pax(f, records[i % len(records)])
                write_raw(f, raw_header(m.info.name, size=len(m.data)), m.data)
            else:
                write_member(f, m)
        write_pax(f, pax_record("path", f"{target}/via-pax-path"))
        write_raw(f, raw_header("innocent", size=4), b"pax\n")
        write_pax(f, pax_record("linkpath", "/etc/passwd"))
        write_raw(f, raw_header("pax-symlink", type_=tarfile.SYMTYPE, linkname="innocent"))
    return out


def _absurd(name: str, before: Callable[[BinaryIO], None]) -> Callable[[Path, Path], Path]:
    def build(directory: Path, target: Path) -> Path:
        out = directory / f"{name}.tar"
        with _writing(out) as f:
            before(f)
            write_raw(f, raw_header("victim", size=8), b"victim!\n")
            for m in layout_members(_valid()):
                write_member(f, m)
        return out

    build.__doc__ = f"A valid image after a hostile header: {name}."
    return build


def _pax_size(value: str) -> Callable[[BinaryIO], None]:
    return lambda f: write_pax(f, pax_record("size", value))


def _pax_huge_header(f: BinaryIO) -> None:
    write_pax(f, pax_record("path", "x"), size=(1 << 33) - 1)


def _pax_record_overlong(f: BinaryIO) -> None:
    write_pax(f, b"99999999999999999999 path=overlong\n")


def _pax_record_garbage(f: BinaryIO) -> None:
    write_pax(f, b"12 path=x\n\x00\xff garbage \xfe\n" + b"-5 size=1\n")


def _strict_pax_records() -> bool:
    """True when this Python's tarfile refuses a PAX record that does not end where its length says.

    CPython's fix for CVE-2024-6232 (3.11.10, 3.12.6, 3.13, and distributions' backports: Debian 12's
    /usr/bin/python3 3.11.2 has it, pyenv's 3.11.7 does not) checks each record's framing; older
    tarfiles stop at the first record that does not parse and ignore the rest.
    """
    buf = io.BytesIO()
    _pax_record_garbage(buf)
    write_raw(buf, raw_header("victim", size=8), b"victim!\n")
    end_archive(buf)
    buf.seek(0)
    try:
        with tarfile.open(fileobj=buf, mode="r:") as tf:
            tf.getmembers()
    except tarfile.TarError:
        return True
    return False


def _size_field_base256(f: BinaryIO) -> None:
    # GNU base-256: the top bit set, then a 2**88 - 1 byte size.
    write_raw(f, raw_header("base256", size_field=b"\x80" + b"\xff" * 11, gnu=True))


def _size_field_garbage(f: BinaryIO) -> None:
    write_raw(f, raw_header("garbage-size", size_field=b"zzzzzzzzzzz\x00"))


def _size_base256_negative(f: BinaryIO) -> None:
    write_raw(f, raw_header("negative", size_field=b"\xff" * 12, gnu=True))


def _unknown_type_huge(f: BinaryIO) -> None:
    # An unknown type's data is skipped like a file's: 2**80 bytes of it.
    write_raw(
        f, raw_header("unknown", type_=b"Q", size_field=b"\x80" + b"\x00" + b"\x01" + b"\x00" * 9, gnu=True)
    )


def _longname_huge(f: BinaryIO) -> None:
    write_raw(f, raw_header("././@LongLink", size=1 << 40, type_=b"L", gnu=True), b"x" * BLOCK)


def sparse_encodings(directory: Path, target: Path) -> Path:
    """GNU sparse members in every encoding (old 'S', PAX 0.0, 0.1, 1.0), some with absurd maps."""
    out = directory / "gnu-sparse.tar"
    with _writing(out, layout_members(_valid())) as f:
        # Old GNU 'S': sparse map at 386 (4 x offset, numbytes), realsize at 483.
        smap = b"%011o\x00%011o\x00" % (1 << 40, 5) + b"%011o\x00%011o\x00" % (0, 0)
        extra = {386: smap, 483: b"%011o\x00" % ((1 << 40) + 5)}
        write_raw(f, raw_header("sparse-old", size=5, type_=b"S", gnu=True, extra=extra), b"hello")
        # PAX 0.0: repeated offset/numbytes records.
        recs = pax_record("GNU.sparse.size", str(1 << 50))
        recs += pax_record("GNU.sparse.numblocks", "1")
        recs += pax_record("GNU.sparse.offset", str(1 << 49)) + pax_record("GNU.sparse.numbytes", "5")
        write_pax(f, recs)
        write_raw(f, raw_header("sparse-00", size=5), b"hello")
        # PAX 0.1: the map in one record.
        recs = pax_record("GNU.sparse.size", "10") + pax_record("GNU.sparse.numblocks", "1")
        recs += pax_record("GNU.sparse.map", "0,5")
        write_pax(f, recs)
        write_raw(f, raw_header("sparse-01", size=5), b"hello")
        # PAX 1.0: the map at the start of the data; this one claims a billion entries.
        recs = pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
        recs += pax_record("GNU.sparse.name", "sparse-10") + pax_record("GNU.sparse.realsize", "10")
        write_pax(f, recs)
        data = b"1\n0\n5\n".ljust(BLOCK, b"\0") + b"hello"
        write_raw(f, raw_header("GNUSparseFile.0/sparse-10", size=len(data)), data)
    return out


def sparse_map_bomb(directory: Path, target: Path) -> Path:
    """A PAX 1.0 sparse map of 10**9 entries in 8 MB of data: the scan must stop early, not allocate."""
    out = directory / "sparse-map-bomb.tar"
    with _writing(out, layout_members(_valid())) as f:
        recs = pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
        recs += pax_record("GNU.sparse.name", "bomb") + pax_record("GNU.sparse.realsize", "10")
        write_pax(f, recs)
        data = b"1000000000\n" + b"1099511627776\n" * (600_000)
        write_raw(f, raw_header("GNUSparseFile.0/bomb", size=len(data)), data)
    return out


def past_end(directory: Path, target: Path) -> Path:
    """The valid image, then a member whose size runs 1 GiB past the end of the file."""
    out = directory / "past-end.tar"
    with _writing(out, layout_members(_valid())) as f:
        write_raw(f, raw_header("runs-past-the-end", size=1 << 30), b"only this much\n")
    return out


def member_flood(directory: Path, target: Path) -> Path:
    """The valid image, then MANY_MEMBERS tiny regular members under ``many/`` (written raw, fast)."""
    out = directory / "many-members.tar"
    with _writing(out, layout_members(_valid())) as f:
        pad = b"\0" * (BLOCK - 8)
        for i in range(MANY_MEMBERS):
            f.write(raw_header(f"many/{i // 1000:03d}/{i % 1000:03d}", size=7))
            f.write(b"%06d\n" % i + b"\0" + pad)
    return out


def flood_member(i: int) -> tuple[str, bytes]:
    """The path and bytes of member ``i`` of ``member_flood``."""
    return f"many/{i // 1000:03d}/{i % 1000:03d}", b"%06d\n" % i


def deep_dirs(directory: Path, target: Path) -> Path:
    """DEPTH nested directories (a 5,000-byte path, longer than PATH_MAX) and a file at the bottom."""
    out = directory / "deep-dirs.tar"
    with _writing(out, layout_members(_valid())) as f:
        path = "deep"
        for _ in range(DEPTH - 1):
            write_member(f, dir_member(path + "/"))
            path += "/deep"
        write_member(f, dir_member(path + "/"))
        write_member(f, file_member(path + "/bottom", b"at the bottom\n"))
    return out


DEEP_BOTTOM = "/".join(["deep"] * DEPTH) + "/bottom"


def long_names(directory: Path, target: Path) -> Path:
    """300-byte components (not served), 255-byte ones (served), and a 300-byte hardlink target."""
    long300, long255 = "n" * 300, "m" * 255
    evil = [
        file_member(long300, b"300-byte name\n"),
        file_member(f"dir/{long300}/file", b"300-byte directory name\n"),
        file_member(f"{long255}/{long255}/{long255}", b"255-byte components\n"),
        link_member("hl-long", long300),
        file_member("é" * 128, b"256 bytes of UTF-8 in 128 characters\n"),
    ]
    return _archive(directory, "long-names.tar", [], evil)


def nul_names(directory: Path, target: Path) -> Path:
    """PAX paths with a NUL byte, one aliasing index.json (readdir would show it as "index.json")."""
    out = directory / "nul-names.tar"
    with _writing(out, layout_members(_valid())) as f:
        for name, data in (("index.json\0evil", b'{"evil": true}'), ("evil\0name", b"nul\n")):
            write_pax(f, pax_record("path", name))
            write_raw(f, raw_header("placeholder", size=len(data)), data)
    return out


def duplicate_types(directory: Path, target: Path) -> Path:
    """One path as a file, then a directory, then a file again; valid names shadowed and restored."""
    files = _files()
    blob = next(n for n in files if n.startswith("blobs/"))
    before = [
        dir_member("oci-layout/"),  # replaced by the valid file after it
        file_member("blobs/sha256", b"a file where a directory must be\n"),  # has children later: a dir
        file_member(blob, b"stale blob bytes\n"),  # the valid blob comes later and wins
    ]
    after = [
        file_member("x", b"x as a file\n"),
        dir_member("x/"),
        file_member("x", b"x as a file again: the last one wins\n"),
        dir_member("y/"),
        file_member("y", b"y is a file at last\n"),
        file_member("z", b"z has children later\n"),
        file_member("z/child", b"so z is a directory\n"),
        file_member("w/child", b"w is a directory first\n"),
        file_member("w", b"then a file at w (not served: w has children)\n"),
        link_member("hl-x", "x"),
    ]
    return _archive(directory, "duplicate-types.tar", before, after)


DUPLICATE_TYPES_SERVED = {
    "x": b"x as a file again: the last one wins\n",
    "y": b"y is a file at last\n",
    "z/child": b"so z is a directory\n",
    "w/child": b"w is a directory first\n",
    "hl-x": b"x as a file again: the last one wins\n",
}


def _big_index(builder: LayoutBuilder) -> bytes:
    """A valid index.json of BIG_INDEX_BYTES: the valid image's entries and one huge annotation."""
    doc = {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": builder.index_manifests}
    head = json.dumps(doc)[:-1] + ', "annotations": {"padding": "'
    tail = '"}}'
    return (head + "p" * (BIG_INDEX_BYTES - len(head) - len(tail)) + tail).encode()


def big_index(directory: Path, target: Path) -> Path:
    """A 50 MB index.json (valid JSON, tagging the valid image), written in one pass."""
    b = _valid()
    files = b.layout_files()
    files["index.json"] = _big_index(b)
    return _files_archive(directory, "big-index.tar", files)


def _big_index_files() -> dict[str, bytes]:
    b = _valid()
    files = b.layout_files()
    files["index.json"] = _big_index(b)
    return files


def _deep_doc() -> bytes:
    return b"[" * DEEP_JSON + b"]" * DEEP_JSON


def deep_json_index(directory: Path, target: Path) -> Path:
    """index.json is 100,000 nested arrays (the valid blobs are all there)."""
    b = _valid()
    files = {**b.layout_files(), "index.json": _deep_doc()}
    return _files_archive(directory, "deep-json-index.tar", files)


def _deep_manifest_builder() -> LayoutBuilder:
    b = _valid()
    deep = {"mediaType": model.MEDIA_MANIFEST, "digest": "", "size": 0}
    deep.update(b.blob(_deep_doc(), model.MEDIA_MANIFEST))
    b.tag(deep, "deep-manifest")
    deep_obj = b'{"schemaVersion": 2, "x": ' + b"[" * DEEP_JSON + b"]" * DEEP_JSON + b"}"
    cfg = b.blob(deep_obj, model.MEDIA_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": model.MEDIA_MANIFEST, "config": cfg, "layers": []}
    b.tag(b.json_blob(manifest, model.MEDIA_MANIFEST), "deep-config")
    return b


def deep_json_blobs(directory: Path, target: Path) -> Path:
    """A manifest blob of 100,000 nested arrays, and a manifest whose config nests 100,000 deep."""
    return _members(directory / "deep-json-blobs.tar", layout_members(_deep_manifest_builder()))


def _random_garbage_index(directory: Path, target: Path) -> Path:
    """index.json is 64 KiB of random bytes."""
    b = _valid()
    files = {**b.layout_files(), "index.json": random.Random(6).randbytes(1 << 16)}
    return _files_archive(directory, "garbage-index.tar", files)


def _without(files: dict[str, bytes], *names: str) -> dict[str, bytes]:
    return {n: d for n, d in files.items() if n not in names}


_SKIP = frozenset({"member-skipped"})
_CORRUPT = frozenset({"archive-corrupt"})
_TRUNCATED = frozenset({"archive-truncated"})

CORPUS: dict[str, HostileCase] = {
    "traversal": HostileCase(traversal, 0, _SKIP, valid=_files(), absent=frozenset({"tmp", "dotdot", "x"})),
    "links_outside": HostileCase(
        links_outside,
        0,
        frozenset({"member-skipped", "blob-invalid-path"}),
        valid={
            **_files(),
            "escape/planted": b"written through a symlinked directory\n",
            "not-yet-there": b"defined after the hardlink to it\n",
            "hl-ok": _files()["oci-layout"],
        },
        absent=frozenset(
            {"passwd-abs", "passwd-up", "hl-passwd-abs", "hl-passwd-up", "hl-target", "hl-to-symlink"}
            | {"hl-to-dir", "hl-to-later"}
        ),
    ),
    "devices": HostileCase(
        devices,
        0,
        _SKIP,
        valid=_files(),
        absent=frozenset({"dev", "fifo", "blobs/sha256/fifo", "volume", "multivolume", "unknown-type"}),
    ),
    "setuid": HostileCase(setuid, 0, frozenset(), valid={**_files(), "suid-root": b"#!/bin/sh\nid\n"}),
    "pax_absurd": HostileCase(
        pax_absurd, 0, _SKIP, valid=_files(), absent=frozenset({"pax-symlink", "innocent", "tmp"})
    ),
    "pax_size_huge": HostileCase(_absurd("pax-size-huge", _pax_size(str(1 << 62))), 2, _TRUNCATED, True),
    "pax_size_negative": HostileCase(_absurd("pax-size-negative", _pax_size("-512")), 2, _CORRUPT, True),
    "pax_size_garbage": HostileCase(_absurd("pax-size-garbage", _pax_size("0x10")), 2, _CORRUPT, True),
    "pax_header_huge": HostileCase(_absurd("pax-header-huge", _pax_huge_header), 2, _CORRUPT, True),
    "pax_record_overlong": HostileCase(
        _absurd("pax-record-overlong", _pax_record_overlong), 2, _CORRUPT, True
    ),
    # A tarfile with the CVE-2024-6232 fix refuses the archive (one line, exit 2); an older one
    # stops at the first record that does not parse and ignores the rest.
    "pax_record_garbage": (
        HostileCase(_absurd("pax-record-garbage", _pax_record_garbage), 2, _CORRUPT, True)
        if _strict_pax_records()
        else HostileCase(_absurd("pax-record-garbage", _pax_record_garbage), 0, frozenset(), valid=_files())
    ),
    "size_base256_huge": HostileCase(_absurd("size-base256", _size_field_base256), 2, _TRUNCATED, True),
    "size_base256_negative": HostileCase(
        _absurd("size-base256-negative", _size_base256_negative), 2, _CORRUPT, True
    ),
    "unknown_type_huge": HostileCase(_absurd("unknown-type-huge", _unknown_type_huge), 2, _TRUNCATED, True),
    "size_field_garbage": HostileCase(_absurd("size-garbage", _size_field_garbage), 2, _CORRUPT, True),
    "gnu_longname_huge": HostileCase(_absurd("longname-huge", _longname_huge), 2, _CORRUPT, True),
    "gnu_sparse": HostileCase(
        sparse_encodings,
        0,
        _SKIP,
        valid=_files(),
        absent=frozenset({"sparse-old", "sparse-00", "sparse-01", "sparse-10", "GNUSparseFile.0"}),
    ),
    "sparse_map_bomb": HostileCase(sparse_map_bomb, 2, _CORRUPT, True),
    "past_end": HostileCase(past_end, 2, _TRUNCATED, True),
    "many_members": HostileCase(member_flood, 0, frozenset(), valid=_files()),
    "deep_dirs": HostileCase(deep_dirs, 0, frozenset(), valid={**_files(), DEEP_BOTTOM: b"at the bottom\n"}),
    "long_names": HostileCase(
        long_names,
        0,
        _SKIP,
        valid={**_files(), "/".join(["m" * 255] * 3): b"255-byte components\n"},
        absent=frozenset({"n" * 300, "dir", "hl-long"}),
    ),
    "nul_names": HostileCase(nul_names, 0, _SKIP, valid=_files(), absent=frozenset({"evil", "placeholder"})),
    "duplicate_types": HostileCase(
        duplicate_types, 0, _SKIP, valid={**_files(), **DUPLICATE_TYPES_SERVED}, absent=frozenset({"x/child"})
    ),
    "big_index": HostileCase(
        big_index, 1, frozenset({"index-invalid"}), valid=_big_index_files(), inspect_ok=False
    ),
    "deep_json_index": HostileCase(
        deep_json_index,
        1,
        frozenset({"index-invalid"}),
        valid={**_files(), "index.json": _deep_doc()},
        ref=None,
        inspect_ok=False,
    ),
    "deep_json_blobs": HostileCase(
        deep_json_blobs,
        1,
        frozenset({"invalid-json"}),
        valid=_deep_manifest_builder().layout_files(),
    ),
    "garbage_index": HostileCase(
        _random_garbage_index,
        1,
        frozenset({"index-invalid"}),
        valid={**_files(), "index.json": random.Random(6).randbytes(1 << 16)},
        ref=None,
        inspect_ok=False,
    ),
}
