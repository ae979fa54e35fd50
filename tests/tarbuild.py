"""Odd-format oci-archives for tests: tar formats, names and member types the scan must handle.

Every builder takes a directory and returns the path of the archive it wrote there. The layout
content comes from ``sample_builder`` (tests/oci.py's LayoutBuilder); the tar is written with
``tarfile.TarInfo.tobuf`` member by member, so cases that ``TarFile.add`` would refuse or fix up
(unsafe names, duplicates, huge sizes, garbage) can be written as they are.

- ``ODD_FORMATS``: valid archives whose content is all servable, and which GNU ``tar -x`` extracts
  with exit status 0 to exactly what the archive backend serves (the mount suite compares them).
- ``HUGE``: a member larger than 8 GiB (sparse, so it costs no disk); not extracted by tests.
- ``SKIPPING``: valid layouts plus members the name policy skips; ``SKIPPED_NAMES`` says which.
- ``BROKEN``: files that are not (whole) tar archives, with the error the scan must raise.

``raw_header``, ``pax_record``, ``write_raw``, ``write_pax`` and ``end_archive`` write headers field
by field, for what ``tobuf`` would not write (tests/hostile.py's corpus) or writes too slowly.
"""

from __future__ import annotations

import gzip
import lzma
import os
import random
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from oci import LayoutBuilder, parents_first

from ocifuse.errors import CompressedDataError, LayoutOpenError, NotAnArchive, TruncatedArchive

# tarfile.USTAR_FORMAT, GNU_FORMAT, PAX_FORMAT
TarFormat = Literal[0, 1, 2]
BLOCK = 512
RECORD = 20 * BLOCK
MTIME = 1_700_000_000
# A member just over 8 GiB: too large for the 11 octal digits of a ustar size field.
HUGE_SIZE = 8 * 1024**3 + 4097
HUGE_NAME = "big/huge.bin"
HUGE_MARKER = b"<<end of the huge member>>"
# Extra files with long paths (>100 bytes, and >255 bytes in total, every component <= 255).
LONG_DIR = "long/" + "/".join(["d" * 60] * 5)
LONG_NAME = f"{LONG_DIR}/{'f' * 120}.txt"
UTF8_NAME = "notes/café-ünïcode.txt"


@dataclass
class Member:
    """One tar member to write: a TarInfo, its data, and (for huge members) a sparse size."""

    info: tarfile.TarInfo
    data: bytes = b""
    sparse_size: int | None = None  # write the header with this size and extend sparsely


def sample_builder(algorithm: str = "sha256") -> LayoutBuilder:
    """A small layout: one image tagged ``v1`` with a text layer and a 100 KiB random layer."""
    b = LayoutBuilder(algorithm=algorithm)
    noise = random.Random(0).randbytes(100 * 1024)
    b.tag(b.image([b"layer one\n", noise]), "v1")
    return b


def _info(name: str, type_: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.size = size
    info.linkname = linkname
    info.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    info.mtime = MTIME
    info.uname = info.gname = "root"
    return info


def file_member(name: str, data: bytes) -> Member:
    """A regular member."""
    return Member(_info(name, size=len(data)), data)


def dir_member(name: str) -> Member:
    """A directory member."""
    return Member(_info(name, tarfile.DIRTYPE))


def link_member(name: str, target: str, type_: bytes = tarfile.LNKTYPE) -> Member:
    """A hardlink (or, with ``type_=SYMTYPE``, a symlink) member."""
    return Member(_info(name, type_, linkname=target))


def layout_members(
    builder: LayoutBuilder, *, prefix: str = "", dirs: bool = True, extra: dict[str, bytes] | None = None
) -> list[Member]:
    """The members of a layout archive: directories (unless ``dirs`` is false) before their files."""
    files = {**builder.layout_files(), **(extra or {})}
    return [
        dir_member(prefix + name + "/") if is_dir else file_member(prefix + name, files[name])
        for name, is_dir in parents_first(files, dirs=dirs)
    ]


def write_archive(
    path: Path, members: Iterable[Member], fmt: TarFormat = tarfile.PAX_FORMAT, end: bool = True
) -> Path:
    """Write ``members`` as a tar; ``end`` adds the two zero blocks and pads to a record like tar."""
    with open(path, "wb") as f:
        for m in members:
            write_member(f, m, fmt)
        if end:
            end_archive(f)
    return path


def write_member(f: BinaryIO, m: Member, fmt: TarFormat = tarfile.PAX_FORMAT) -> None:
    """Write one member's header(s) and data at the file's position."""
    if m.sparse_size is not None:
        m.info.size = m.sparse_size
        f.write(m.info.tobuf(fmt, "utf-8", "surrogateescape"))
        start = f.tell()
        # Seek over the hole (no disk used), then the data ends with ``m.data`` as a marker.
        f.seek(start + m.sparse_size - len(m.data))
        f.write(m.data)
        f.write(b"\0" * (-m.sparse_size % BLOCK))
        return
    write_raw(f, m.info.tobuf(fmt, "utf-8", "surrogateescape"), m.data)


# -- raw headers: written field by field, nothing checked or fixed up ---------------------------------


def raw_header(
    name: str | bytes,
    *,
    size: int = 0,
    type_: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    linkname: str | bytes = b"",
    size_field: bytes | None = None,
    gnu: bool = False,
    extra: dict[int, bytes] | None = None,
) -> bytes:
    """A ustar (or GNU, ``gnu=True``) header written field by field: nothing is checked or fixed up.

    ``size_field`` replaces the 12 bytes of the size field; ``extra`` writes bytes at offsets.
    """
    hdr = bytearray(BLOCK)
    raw = name.encode() if isinstance(name, str) else name
    hdr[0 : len(raw[:100])] = raw[:100]
    hdr[100:124] = b"%07o\x00" % mode + b"0000000\x000000000\x00"
    hdr[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    hdr[136:148] = b"%011o\x00" % MTIME
    hdr[156:157] = type_
    link = linkname.encode() if isinstance(linkname, str) else linkname
    hdr[157 : 157 + len(link[:100])] = link[:100]
    hdr[257:265] = b"ustar  \x00" if gnu else b"ustar\x0000"
    for offset, data in (extra or {}).items():
        hdr[offset : offset + len(data)] = data
    hdr[148:156] = b" " * 8  # the checksum counts its own field as spaces
    hdr[148:156] = b"%06o\x00 " % sum(hdr)
    return bytes(hdr)


def pax_record(key: str, value: str) -> bytes:
    """One well-formed PAX record ``"LEN key=value\\n"`` (LEN counts itself)."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def write_raw(f: BinaryIO, header: bytes, data: bytes = b"") -> None:
    """A header and its data, padded to a block."""
    f.write(header)
    f.write(data)
    f.write(b"\0" * (-len(data) % BLOCK))


def write_pax(f: BinaryIO, records: bytes, *, size: int | None = None) -> None:
    """A PAX extended header member carrying ``records`` (its size field says ``size`` if given)."""
    write_raw(f, raw_header("PaxHeader", size=len(records) if size is None else size, type_=b"x"), records)


def end_archive(f: BinaryIO) -> None:
    """The two zero blocks, padded to a record, as tar ends an archive."""
    pos = f.tell() + 2 * BLOCK
    f.write(b"\0" * (2 * BLOCK + (-pos % RECORD)))


def _sample(directory: Path, name: str, fmt: TarFormat, *, dirs: bool = True) -> Path:
    return write_archive(directory / name, layout_members(sample_builder(), dirs=dirs), fmt)


# -- valid archives, all content servable ------------------------------------------------------------


def ustar(directory: Path) -> Path:
    """POSIX ustar (names split into prefix + name where needed)."""
    return _sample(directory, "ustar.tar", tarfile.USTAR_FORMAT)


def gnu(directory: Path) -> Path:
    """GNU format."""
    return _sample(directory, "gnu.tar", tarfile.GNU_FORMAT)


def pax(directory: Path) -> Path:
    """POSIX.1-2001 (PAX) format."""
    return _sample(directory, "pax.tar", tarfile.PAX_FORMAT)


def _long(directory: Path, name: str, fmt: TarFormat) -> Path:
    # sha512 blob paths are 141 bytes: every blob needs a long name.
    extra = {LONG_NAME: b"a file with a long name\n", UTF8_NAME: "ünïcode\n".encode()}
    return write_archive(directory / name, layout_members(sample_builder("sha512"), extra=extra), fmt)


def gnu_longname(directory: Path) -> Path:
    """GNU ``././@LongLink`` names: a sha512 layout plus a >255-byte path."""
    return _long(directory, "gnu-longname.tar", tarfile.GNU_FORMAT)


def pax_longname(directory: Path) -> Path:
    """PAX ``path`` records: a sha512 layout, a >255-byte path and a UTF-8 name."""
    return _long(directory, "pax-longname.tar", tarfile.PAX_FORMAT)


def dot_prefix(directory: Path) -> Path:
    """Every name starts with ``./`` and the first member is ``./`` itself, as ``tar -C dir .`` writes."""
    members = [dir_member("./"), *layout_members(sample_builder(), prefix="./")]
    return write_archive(directory / "dot-prefix.tar", members, tarfile.GNU_FORMAT)


def gnu_tar_dot(directory: Path) -> Path:
    """The sample layout archived by real GNU ``tar -C dir -cf x.tar .``."""
    src = sample_builder().write_dir(directory / "gnu-tar-dot-src")
    out = directory / "gnu-tar-dot.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(out), "."], check=True)
    return out


def implied_dirs(directory: Path) -> Path:
    """No directory members at all: ``blobs/`` and ``blobs/sha256/`` are only implied."""
    return _sample(directory, "implied-dirs.tar", tarfile.PAX_FORMAT, dirs=False)


def duplicates(directory: Path) -> Path:
    """``index.json`` and a blob appear twice: first wrong, then right; the last one wins."""
    b = sample_builder()
    files = b.layout_files()
    blob = next(n for n in files if n.startswith("blobs/"))
    stale = [
        file_member("index.json", b"{}"),
        file_member(blob, b"stale bytes that the last member replaces"),
    ]
    return write_archive(directory / "duplicates.tar", [*stale, *layout_members(b)])


def hardlinks(directory: Path) -> Path:
    """Every blob is a hardlink to a regular member under ``payload/`` (served as the target's bytes)."""
    b = sample_builder()
    members = []
    for m in layout_members(b):
        name = m.info.name
        if name.startswith("blobs/") and m.info.isreg():
            target = "payload/" + name.rsplit("/", 1)[1]
            members.append(file_member(target, m.data))
            members.append(link_member(name, target))
        else:
            members.append(m)
    return write_archive(directory / "hardlinks.tar", [dir_member("payload/"), *members])


ODD_FORMATS: dict[str, Callable[[Path], Path]] = {
    "ustar": ustar,
    "gnu": gnu,
    "pax": pax,
    "gnu_longname": gnu_longname,
    "pax_longname": pax_longname,
    "dot_prefix": dot_prefix,
    "gnu_tar_dot": gnu_tar_dot,
    "implied_dirs": implied_dirs,
    "duplicates": duplicates,
    "hardlinks": hardlinks,
}


# -- a member over 8 GiB -----------------------------------------------------------------------------


def _huge(directory: Path, name: str, fmt: TarFormat) -> Path:
    huge = Member(_info(HUGE_NAME), HUGE_MARKER, sparse_size=HUGE_SIZE)
    tail = file_member("after-huge.txt", b"a member after the huge one\n")
    return write_archive(directory / name, [*layout_members(sample_builder()), huge, tail], fmt)


def huge_pax(directory: Path) -> Path:
    """A member of HUGE_SIZE bytes whose size is a PAX ``size`` record; it ends with HUGE_MARKER."""
    return _huge(directory, "huge-pax.tar", tarfile.PAX_FORMAT)


def huge_gnu(directory: Path) -> Path:
    """A member of HUGE_SIZE bytes whose size is GNU base-256; it ends with HUGE_MARKER."""
    return _huge(directory, "huge-gnu.tar", tarfile.GNU_FORMAT)


HUGE: dict[str, Callable[[Path], Path]] = {"huge_pax": huge_pax, "huge_gnu": huge_gnu}


# -- valid layouts with members the name policy skips ----------------------------------------------

UNSAFE_NAMES = ("/abs/evil", "../evil", "blobs/../../evil", "", "x/" + "c" * 256 + "/f")


def unsafe_names(directory: Path) -> Path:
    """Absolute, ``..``, empty and over-NAME_MAX names after a valid layout (none may be served)."""
    members = [*layout_members(sample_builder()), *(file_member(n, b"evil\n") for n in UNSAFE_NAMES)]
    return write_archive(directory / "unsafe-names.tar", members)


def specials(directory: Path) -> Path:
    """A symlink, character and block devices, a fifo and a hardlink to nothing (none served)."""
    chr_ = Member(_info("dev/chr", tarfile.CHRTYPE))
    blk = Member(_info("dev/blk", tarfile.BLKTYPE))
    chr_.info.devmajor, chr_.info.devminor = 1, 3
    blk.info.devmajor, blk.info.devminor = 7, 0
    members = [
        *layout_members(sample_builder()),
        link_member("blobs/sha256/passwd", "/etc/passwd", tarfile.SYMTYPE),
        chr_,
        blk,
        Member(_info("dev/fifo", tarfile.FIFOTYPE)),
        link_member("dangling-hardlink", "no/such/member"),
    ]
    return write_archive(directory / "specials.tar", members)


def _sparse(directory: Path, name: str, fmt: str) -> Path:
    src = sample_builder().write_dir(directory / f"{name}-src")
    with open(src / "sparse.bin", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data after a hole\n")
    out = directory / f"{name}.tar"
    names = ["oci-layout", "index.json", "blobs", "sparse.bin"]
    subprocess.run(
        ["tar", "-C", str(src), "--sparse", f"--format={fmt}", "-cf", str(out), *names], check=True
    )
    return out


def gnu_sparse(directory: Path) -> Path:
    """Real GNU ``tar --sparse`` in GNU format: ``sparse.bin`` is a type-S member (not served)."""
    return _sparse(directory, "gnu-sparse", "gnu")


def pax_sparse(directory: Path) -> Path:
    """Real GNU ``tar --sparse --format=posix``: ``sparse.bin`` is a PAX sparse member (not served)."""
    return _sparse(directory, "pax-sparse", "posix")


SKIPPING: dict[str, Callable[[Path], Path]] = {
    "unsafe_names": unsafe_names,
    "specials": specials,
    "gnu_sparse": gnu_sparse,
    "pax_sparse": pax_sparse,
}
SKIPPED_NAMES: dict[str, frozenset[str]] = {
    "gnu_sparse": frozenset({"sparse.bin"}),
    "pax_sparse": frozenset({"sparse.bin"}),
    "unsafe_names": frozenset(UNSAFE_NAMES),
    "specials": frozenset({"blobs/sha256/passwd", "dev/chr", "dev/blk", "dev/fifo", "dangling-hardlink"}),
}


# -- broken archives -----------------------------------------------------------------------------------


def _cut(src: Path, out: Path, at: int) -> Path:
    out.write_bytes(src.read_bytes()[:at])
    return out


def truncated_mid_member(directory: Path) -> Path:
    """The sample archive cut in the middle of its largest member's data."""
    src = pax(directory)
    with tarfile.open(src) as tf:
        big = max(tf.getmembers(), key=lambda m: m.size)
    return _cut(src, directory / "truncated-member.tar", big.offset_data + big.size // 2)


def truncated_mid_header(directory: Path) -> Path:
    """The sample archive cut 100 bytes into the header of its last member."""
    src = pax(directory)
    with tarfile.open(src) as tf:
        last = tf.getmembers()[-1]
    return _cut(src, directory / "truncated-header.tar", last.offset + 100)


def not_a_tar(directory: Path) -> Path:
    """A text file."""
    out = directory / "not-a-tar.txt"
    out.write_text("this is not a tar archive\n" * 100)
    return out


def empty_file(directory: Path) -> Path:
    """A zero-byte file."""
    out = directory / "empty.tar"
    out.write_bytes(b"")
    return out


def gzipped(directory: Path) -> Path:
    """A gzip-compressed oci-archive (``docker save | gzip``): served as the plain one."""
    out = directory / "gzipped.tar.gz"
    out.write_bytes(gzip.compress(pax(directory).read_bytes()))
    return out


def gzipped_not_a_tar(directory: Path) -> Path:
    """Good gzip around bytes that are no tar."""
    out = directory / "text.tar.gz"
    out.write_bytes(gzip.compress(b"not a tar\n" * 100))
    return out


def xz_compressed(directory: Path) -> Path:
    """An xz-compressed oci-archive: a compression ocifuse names but does not read."""
    out = directory / "xz.tar.xz"
    out.write_bytes(lzma.compress(pax(directory).read_bytes()))
    return out


def garbage_after_member(directory: Path) -> Path:
    """A valid first member, then a block of garbage where the next header should be, then more members."""
    members = layout_members(sample_builder())
    out = directory / "garbage.tar"
    with open(out, "wb") as f:
        write_member(f, members[0])
        f.write(bytes(random.Random(1).randrange(1, 256) for _ in range(BLOCK)))
        for m in members[1:]:
            write_member(f, m)
        f.write(b"\0" * RECORD)
    return out


def pax_absurd_header(directory: Path) -> Path:
    """A PAX extended header member that claims 4 GiB of header records."""
    info = _info("PaxHeaders/oci-layout", tarfile.XHDTYPE, size=1 << 32)
    out = directory / "pax-absurd-header.tar"
    with open(out, "wb") as f:
        f.write(info.tobuf(tarfile.USTAR_FORMAT))
        f.write(b"30 path=this-is-a-pax-header\n".ljust(BLOCK, b"\0"))
        for m in layout_members(sample_builder()):
            write_member(f, m)
        f.write(b"\0" * RECORD)
    return out


def pax_absurd_size(directory: Path) -> Path:
    """A PAX ``size`` record saying a small member holds 2**62 bytes."""
    members = layout_members(sample_builder())
    first = next(m for m in members if m.info.isreg())
    first.info.pax_headers = {"size": str(1 << 62)}
    return write_archive(directory / "pax-absurd-size.tar", members, tarfile.PAX_FORMAT)


BROKEN: dict[str, tuple[Callable[[Path], Path], type[LayoutOpenError]]] = {
    "truncated_mid_member": (truncated_mid_member, TruncatedArchive),
    "truncated_mid_header": (truncated_mid_header, TruncatedArchive),
    "not_a_tar": (not_a_tar, NotAnArchive),
    "empty_file": (empty_file, NotAnArchive),
    "gzipped_not_a_tar": (gzipped_not_a_tar, NotAnArchive),
    "xz_compressed": (xz_compressed, CompressedDataError),
    "garbage_after_member": (garbage_after_member, NotAnArchive),
    "pax_absurd_header": (pax_absurd_header, NotAnArchive),
    "pax_absurd_size": (pax_absurd_size, TruncatedArchive),
}


# -- scale -----------------------------------------------------------------------------------------------


def many_members(directory: Path, count: int = 100_000) -> Path:
    """``count`` small regular members ``files/<i>`` (no directory members), written fast."""
    out = directory / f"many-{count}.tar"
    with open(out, "wb", buffering=1 << 20) as f:
        for i in range(count):
            data = b"%d\n" % i
            f.write(raw_header(f"files/{i:06d}", size=len(data)))
            f.write(data.ljust(BLOCK, b"\0"))
        f.write(b"\0" * RECORD)
    return out


@dataclass(frozen=True)
class BlobCorpus:
    """An oci-archive of one image with thousands of layers: every file of its layout, and its blobs."""

    archive: Path
    files: dict[str, bytes]  # layout path -> bytes, oci-layout and index.json included
    blobs: dict[str, bytes]  # only blobs/...


def blob_corpus(
    path: Path, *, seed: int, count: int, max_size: int, big: int = 0, big_size: int = 0
) -> BlobCorpus:
    """One image (tag ``v1``) of ``count`` random layers of 0 to ``max_size`` bytes, then ``big``
    random layers of ``big_size + i`` bytes, as an archive at ``path`` (equal layers share one blob).
    """
    rng = random.Random(seed)
    layers = [rng.randbytes(rng.randrange(0, max_size)) for _ in range(count)]
    layers += [rng.randbytes(big_size + i) for i in range(big)]
    b = LayoutBuilder()
    b.tag(b.image(layers), "v1")
    write_archive(path, layout_members(b))
    files = b.layout_files()
    return BlobCorpus(path, files, {n: d for n, d in files.items() if n.startswith("blobs/")})


def tar_extract(archive: Path, dest: Path) -> Path:
    """GNU ``tar -x`` of ``archive`` into ``dest``; raises CalledProcessError if tar fails."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True, capture_output=True)
    return dest


def tree_of(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Every regular file (name -> bytes) and directory under ``root``, as relative paths."""
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    for top, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(top, root)
        for d in dirnames:
            dirs.add(os.path.normpath(os.path.join(rel, d)))
        for name in filenames:
            path = os.path.join(top, name)
            if os.path.isfile(path) and not os.path.islink(path):
                files[os.path.normpath(os.path.join(rel, name))] = Path(path).read_bytes()
    return files, dirs
