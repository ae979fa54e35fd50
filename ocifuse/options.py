"""Mount options, mount(8) style: split ``-o a,b=c`` lists and decide what each option does (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import OcifuseError
from .model import Platform
from .streams import Limits
from .units import parse_size

# Always on: an archive mount is read-only and serves no devices or setuid programs.
FORCED = ("ro", "nodev", "nosuid", "default_permissions")
# Options of ocifuse itself.
# nonempty: mount over a directory that has files in it (hidden while mounted), as fusermount did.
OWN_FLAGS = frozenset({"verify", "debug", "rootfs", "rootless", "ignore_diff_ids", "nocache", "nonempty"})
OWN_VALUES = frozenset(
    {"readahead_kb", "ref", "platform", "cache", "timeout", "cafile", "credentials", "index"}
)
# Sizes (K/M/G/T suffixes): bounds of the decompression of a compressed archive (compressed.Limits),
# and cache_max, the bound of the index cache's directory (cache.IndexCache).
OWN_SIZES = frozenset({"max_size", "spill_max", "cache_max"})
# Options that choose or shape the rootfs view, meaningless without ``rootfs``.
ROOTFS_ONLY = ("rootless", "ignore_diff_ids", "ref", "platform")
# Passed through to libfuse / the kernel: what libfuse 3's fuse_session_new and fuse_session_mount
# accept (mount.c, fuse_lowlevel.c). Others it refuses, failing the mount late and obscurely:
# relatime and kin (ignored below), sync_read/async_read, max_readahead, max_background,
# congestion_threshold (conn fields since libfuse 3), blksize (fuseblk only), and max_read (pyfuse3
# does not set conn->max_read to match, so the kernel's INIT fails).
FUSE_FLAGS = frozenset(
    {
        "allow_other",
        "allow_root",
        "auto_unmount",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "async",
        "sync",
        "dirsync",
    }
)
FUSE_VALUES = frozenset({"fsname", "context", "fscontext", "defcontext", "rootcontext"})
# What mount(8), fstab and systemd hand a helper that is not for the filesystem (mount(8), systemd.mount(5)).
IGNORED_FLAGS = frozenset(
    {
        "nofail",
        "_netdev",
        "user",
        "nouser",
        "users",
        "auto",
        "noauto",
        "defaults",
        "owner",
        "group",
        "rw",
        "dev",
        "suid",
        "loud",
        "silent",
        # atime policies: nothing is ever written, so none applies (and libfuse 3 refuses them).
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "nodiratime",
        "lazytime",
        "nolazytime",
    }
)
# subtype= too: the type is always fuse.ocifuse, which is how ``ocifuse umount`` knows its mounts.
IGNORED_PREFIXES = ("x-", "comment=", "uhelper=", "helper=", "subtype=")


class OptionError(OcifuseError):
    """An option ocifuse does not know or a value it cannot use."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MountOptions:
    """What a list of ``-o`` strings asks for, sorted into ocifuse's own and FUSE's."""

    verify: bool = False
    debug: bool = False
    readahead_kb: int = 1024
    rootfs: bool = False  # serve the image's merged root filesystem, not the layout
    ref: str | None = None  # which image (a ref name or digest), as inspect --ref
    platform: Platform | None = None  # platform=OS/ARCH[/VARIANT], as inspect --platform
    rootless: bool = False  # every owner shown as the mounting user (umoci unpack --rootless)
    ignore_diff_ids: bool = False  # serve layers whose diff_id does not match the config (logged)
    cache: str | None = None  # cache=DIR: the index cache's directory (None: the default one)
    nocache: bool = False  # nocache: neither read nor write the index cache
    cache_max: int | None = None  # cache_max=SIZE: the index cache's bound (None: its default)
    nonempty: bool = False  # mount over a directory that is not empty (its files hidden meanwhile)
    limits: Limits = field(default_factory=Limits)  # bounds of decompressing a compressed archive
    timeout: float | None = None  # timeout=SECONDS: a remote read's budget, retries included (remote.py)
    cafile: str | None = None  # cafile=PATH: CA certificates trusted for https besides the system's
    credentials: str | None = None  # credentials=PATH: a file with USER:PASSWORD or Bearer TOKEN (http)
    index: str | None = None  # index=PATH|URL: a portable index (ocifuse index), if for this archive
    fuse: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default=())


def split(text: str) -> list[str]:
    """Split a comma-separated option list; ``\\,`` is a literal comma (as libfuse reads it)."""
    out: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == ",":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [o for o in out if o]


def escape(value: str) -> str:
    """Escape a value for a libfuse option list (backslash and comma)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def parse(
    option_lists: Iterable[str],
    *,
    fsname: str,
    verify: bool = False,
    debug: bool = False,
    cache: str | None = None,
    nocache: bool = False,
    cache_max: int | None = None,
) -> MountOptions:
    """Sort ``-o`` lists into a MountOptions; raises OptionError for unknown options.

    ``rw``, ``dev`` and ``suid`` are accepted and ignored: the mount is always ``ro,nodev,nosuid``.
    ``nocache`` wins over any ``cache=DIR``, wherever each is given; ``-o cache=``/``cache_max=``
    over ``cache``/``cache_max`` (``--cache``, ``--cache-max``).
    """
    fuse: dict[str, str | None] = {"fsname": escape(fsname), "subtype": "ocifuse"}
    ignored: list[str] = []
    flags_set: set[str] = set()
    values: dict[str, str] = {}
    platform: Platform | None = None
    readahead_kb = 1024
    sizes: dict[str, int] = {}
    for option in (o for text in option_lists for o in split(text)):
        key, eq, value = option.partition("=")
        if option in OWN_FLAGS:
            flags_set.add(option)
        elif key == "readahead_kb" and eq:
            if not value.isdigit():
                raise OptionError(f"option {option!r} wants a number of KiB")
            readahead_kb = int(value)
        elif key in OWN_VALUES and eq:
            if not value:
                raise OptionError(f"option {key}= wants a value")
            if key == "platform":
                try:
                    platform = Platform.parse(value)
                except ValueError as e:
                    raise OptionError(str(e)) from e
            if key == "timeout" and not _positive(value):
                raise OptionError(f"option {option!r} wants a number of seconds")
            values[key] = value
        elif key in OWN_SIZES and eq:
            try:
                sizes[key] = parse_size(value)
            except ValueError as e:
                raise OptionError(f"option {option!r} wants a size in bytes (e.g. 512M, 64G)") from e
        elif option in IGNORED_FLAGS or option.startswith(IGNORED_PREFIXES):
            ignored.append(option)
        elif option in FUSE_FLAGS and not eq:
            fuse[option] = None
        elif key in FUSE_VALUES and eq:
            fuse[key] = escape(value) if key == "fsname" else value
        elif option in FORCED:
            pass
        else:
            raise OptionError(f"unknown mount option {option!r}")
    if "rootfs" not in flags_set:
        stray = [o for o in ROOTFS_ONLY if o in flags_set or o in values]
        if stray:
            raise OptionError(f"option {stray[0]!r} applies to the rootfs view only (add rootfs)")
    flags = [*FORCED, *(k if v is None else f"{k}={v}" for k, v in fuse.items())]
    bound = sizes.pop("cache_max", cache_max)  # the cache's; the other sizes are decompression Limits
    return MountOptions(
        verify=verify or "verify" in flags_set,
        debug=debug or "debug" in flags_set,
        readahead_kb=readahead_kb,
        rootfs="rootfs" in flags_set,
        ref=values.get("ref"),
        platform=platform,
        rootless="rootless" in flags_set,
        ignore_diff_ids="ignore_diff_ids" in flags_set,
        cache=values.get("cache", cache),
        nocache=nocache or "nocache" in flags_set,
        cache_max=bound,
        nonempty="nonempty" in flags_set,
        limits=Limits(**sizes),
        timeout=float(values["timeout"]) if "timeout" in values else None,
        cafile=values.get("cafile"),
        credentials=values.get("credentials"),
        index=values.get("index"),
        fuse=tuple(flags),
        ignored=tuple(ignored),
    )


def _positive(value: str) -> bool:
    try:
        return 0 < float(value) < 1e9
    except ValueError:
        return False
