"""Mount options (ocifuse/options.py): splitting, escaping, forced, own, FUSE's and ignored options."""

from __future__ import annotations

import pytest

from ocifuse import options
from ocifuse.errors import OcifuseError
from ocifuse.options import FORCED, MountOptions, OptionError, escape, parse, split
from ocifuse.streams import Limits

FSNAME = "/srv/images/app.tar"


def fuse_dict(opts: MountOptions) -> dict[str, str | None]:
    """The FUSE option list as a dict (flags map to None)."""
    out: dict[str, str | None] = {}
    for option in opts.fuse:
        key, eq, value = option.partition("=")
        out[key] = value if eq else None
    return out


# -- split and escape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("ro", ["ro"]),
        ("allow_other,verify", ["allow_other", "verify"]),
        (",,a,,b,", ["a", "b"]),
        ("fsname=a\\,b,ro", ["fsname=a,b", "ro"]),
        ("fsname=a\\\\,ro", ["fsname=a\\", "ro"]),
        ("x=\\q", ["x=q"]),
        ("trailing\\", ["trailing\\"]),
        ("k=v=w", ["k=v=w"]),
    ],
)
def test_split(text: str, expected: list[str]) -> None:
    """Commas split, empty items vanish, a backslash makes the next character literal."""
    assert split(text) == expected


@pytest.mark.parametrize("value", ["plain", "a,b", "back\\slash", "both\\,and,", ",", "\\", "ü/ä,x"])
def test_escape_round_trips_through_split(value: str) -> None:
    """Whatever escape writes, split reads back as one option with the same value."""
    assert split(f"fsname={escape(value)},ro") == [f"fsname={value}", "ro"]


def test_escape() -> None:
    """Backslashes and commas are escaped; nothing else is touched."""
    assert escape("a,b\\c d") == "a\\,b\\\\c d"


# -- parse ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    """No options: ro,nodev,nosuid,default_permissions, fsname and subtype, nothing of ocifuse's on."""
    opts = parse([], fsname=FSNAME)
    assert opts.verify is False
    assert opts.debug is False
    assert opts.readahead_kb == 1024
    assert opts.ignored == ()
    assert fuse_dict(opts) == {
        "ro": None,
        "nodev": None,
        "nosuid": None,
        "default_permissions": None,
        "fsname": FSNAME,
        "subtype": "ocifuse",
    }


@pytest.mark.parametrize("asked", ["rw", "dev", "suid", "rw,dev,suid", "ro,nodev,nosuid"])
def test_forced_options_cannot_be_undone(asked: str) -> None:
    """rw, dev and suid are accepted (mount(8) passes them) but the mount stays ro,nodev,nosuid."""
    opts = parse([asked], fsname=FSNAME)
    flags = fuse_dict(opts)
    for forced in FORCED:
        assert forced in flags
    for undone in ("rw", "dev", "suid"):
        assert undone not in flags
    assert opts.fuse.count("ro") == 1


def test_forced_options_come_first_and_once() -> None:
    """The forced flags lead the list, each once, however often they are asked for."""
    opts = parse(["ro,ro", "nodev,nosuid,default_permissions"], fsname=FSNAME)
    assert opts.fuse[: len(FORCED)] == FORCED
    assert len(opts.fuse) == len(set(opts.fuse))


@pytest.mark.parametrize(
    ("lists", "verify", "debug"),
    [
        (["verify"], True, False),
        (["debug"], False, True),
        (["allow_other,verify,debug"], True, True),
        (["verify", "debug"], True, True),
    ],
)
def test_own_flags(lists: list[str], verify: bool, debug: bool) -> None:
    """verify and debug are ocifuse's own: they set fields and never reach libfuse."""
    opts = parse(lists, fsname=FSNAME)
    assert (opts.verify, opts.debug) == (verify, debug)
    assert "verify" not in fuse_dict(opts)
    assert "debug" not in fuse_dict(opts)


def test_command_line_flags_are_kept() -> None:
    """--verify and --debug on the command line stay on whatever -o says."""
    opts = parse(["allow_other"], fsname=FSNAME, verify=True, debug=True)
    assert opts.verify and opts.debug


@pytest.mark.parametrize(("value", "kib"), [("0", 0), ("128", 128), ("4096", 4096)])
def test_readahead_kb(value: str, kib: int) -> None:
    """readahead_kb=N sets the read-ahead; it is not passed to libfuse."""
    opts = parse([f"readahead_kb={value}"], fsname=FSNAME)
    assert opts.readahead_kb == kib
    assert "readahead_kb" not in fuse_dict(opts)


@pytest.mark.parametrize("bad", ["readahead_kb=", "readahead_kb=-1", "readahead_kb=1M", "readahead_kb=0x10"])
def test_readahead_kb_wants_a_number(bad: str) -> None:
    """A read-ahead that is not a plain number of KiB is an OptionError naming it."""
    with pytest.raises(OptionError, match="readahead_kb"):
        parse([bad], fsname=FSNAME)


@pytest.mark.parametrize(
    ("value", "size"), [("0", 0), ("4096", 4096), ("64k", 64 << 10), ("512M", 512 << 20), ("2GiB", 2 << 30)]
)
def test_decompression_bounds(value: str, size: int) -> None:
    """max_size and spill_max take a size with an optional K/M/G/T suffix; not passed to libfuse."""
    opts = parse([f"max_size={value},spill_max={value}"], fsname=FSNAME)
    assert opts.limits.max_size == size and opts.limits.spill_max == size
    assert "max_size" not in fuse_dict(opts) and "spill_max" not in fuse_dict(opts)


def test_decompression_bounds_default() -> None:
    assert parse([], fsname=FSNAME).limits == Limits()


@pytest.mark.parametrize("bad", ["max_size=", "max_size=-1", "max_size=1X", "spill_max=ten", "max_size=1.5G"])
def test_decompression_bounds_want_a_size(bad: str) -> None:
    with pytest.raises(OptionError, match=bad.partition("=")[0]):
        parse([bad], fsname=FSNAME)


@pytest.mark.parametrize(
    "option",
    [
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
        "loud",
        "silent",
        "x-systemd.automount",
        "x-systemd.requires=/srv",
        "x-gvfs-hide",
        "comment=systemd.automount",
        "uhelper=udisks2",
        "helper=ocifuse",
    ],
)
def test_mount8_fstab_and_systemd_options_are_ignored(option: str) -> None:
    """What mount(8), fstab and systemd hand a helper is recorded as ignored, never passed to libfuse."""
    opts = parse([f"{option},allow_other"], fsname=FSNAME)
    assert opts.ignored == (option,)
    assert option.partition("=")[0] not in fuse_dict(opts)
    assert "allow_other" in fuse_dict(opts)


@pytest.mark.parametrize("option", ["allow_other", "allow_root", "auto_unmount", "noexec", "noatime", "sync"])
def test_fuse_flags_pass_through(option: str) -> None:
    """FUSE's own flags reach libfuse as they are."""
    assert option in parse([option], fsname=FSNAME).fuse


def test_fuse_values_pass_through() -> None:
    """A FUSE option with a value keeps it; a later one wins over an earlier one."""
    opts = parse(["fsname=one", "fsname=two"], fsname=FSNAME)
    assert fuse_dict(opts)["fsname"] == "two"
    assert opts.fuse.count("fsname=two") == 1


def test_subtype_is_always_ocifuse() -> None:
    """A subtype= from mount(8) or a user is ignored: ``ocifuse umount`` knows mounts by fuse.ocifuse."""
    opts = parse(["subtype=other"], fsname=FSNAME)
    assert fuse_dict(opts)["subtype"] == "ocifuse"
    assert "subtype=other" in opts.ignored


@pytest.mark.parametrize(
    "option",
    [
        "nosuchoption",
        "verify=yes",
        "debug=1",
        "allow_other=1",
        "fsname",
        "subtype",
        "readahead_kb",
        "-o",
        "RO",
    ],
)
def test_unknown_options_are_refused(option: str) -> None:
    """An unknown option (or a flag given a value, or a value option without one) is an OptionError."""
    with pytest.raises(OptionError) as info:
        parse([f"allow_other,{option}"], fsname=FSNAME)
    assert option in str(info.value)
    assert isinstance(info.value, OcifuseError)


def test_libfuse_refusals_are_not_passed_through() -> None:
    """Every option passed to libfuse is one libfuse 3 mounts with (others would fail the mount late)."""
    # libfuse 3 (mount.c, fuse_lowlevel.c) rejects these at fuse_session_new/fuse_session_mount, and
    # pyfuse3 cannot honour max_read: passing them would make a parsed option fail the mount.
    refused = {
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "nodiratime",
        "lazytime",
        "nolazytime",
        "sync_read",
        "async_read",
        "max_read",
        "max_readahead",
        "max_background",
        "congestion_threshold",
        "blksize",
    }
    assert not refused & (options.FUSE_FLAGS | options.FUSE_VALUES)


@pytest.mark.parametrize(
    "option", ["relatime", "norelatime", "strictatime", "nostrictatime", "nodiratime", "lazytime"]
)
def test_atime_options_are_ignored(option: str) -> None:
    """atime policies (fstab often names one) mean nothing on a read-only mount: ignored, not refused."""
    opts = parse([option], fsname=FSNAME)
    assert opts.ignored == (option,)
    assert option not in fuse_dict(opts)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/srv/a,b.tar", "/srv/a\\,b.tar"),
        ("/srv/back\\slash.tar", "/srv/back\\\\slash.tar"),
        ("/srv/plain.tar", "/srv/plain.tar"),
    ],
)
def test_fsname_is_escaped(path: str, expected: str) -> None:
    """The archive path as fsname is escaped, so a comma in it cannot start a new option."""
    opts = parse([], fsname=path)
    assert f"fsname={expected}" in opts.fuse
    assert split(",".join(opts.fuse)).count(f"fsname={path}") == 1


def test_fsname_option_overrides_and_is_escaped() -> None:
    """-o fsname=... replaces the archive path, escaped the same way."""
    opts = parse(["fsname=my\\,image"], fsname=FSNAME)
    assert fuse_dict(opts)["fsname"] == "my\\,image"
    assert "fsname=my,image" in split(",".join(opts.fuse))


def test_option_lists_accumulate() -> None:
    """Several -o lists add up, as mount(8) and fuse do."""
    opts = parse(["allow_other", "verify,noexec", "nofail"], fsname=FSNAME)
    flags = fuse_dict(opts)
    assert "allow_other" in flags and "noexec" in flags
    assert opts.verify
    assert opts.ignored == ("nofail",)
