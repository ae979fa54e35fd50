"""The ``ocifuse`` command: a thin argparse front over fsck, inspect, mount and umount."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from . import __version__, journal
from .errors import OcifuseError

COMMANDS = ("fsck", "inspect", "mount", "umount", "cache", "index")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ocifuse",
        description="Mount, check and inspect oci-archives and docker-archives without extracting them.",
    )
    p.add_argument("--version", action="version", version=f"ocifuse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fsck = sub.add_parser("fsck", help="verify every blob and document of a layout")
    fsck.add_argument("path", metavar="PATH", help="an archive (a file or a URL) or an OCI layout directory")
    fsck.add_argument("--json", action="store_true", help="print the report as JSON")
    fsck.add_argument(
        "--layers", action="store_true", help="also check each image's layers as mount --rootfs reads them"
    )
    _cache_arguments(fsck)
    fsck.add_argument(
        "--index",
        metavar="FILE|URL",
        help="a portable index (ocifuse index): checked to be for PATH; fsck rebuilds all the same",
    )

    insp = sub.add_parser("inspect", help="show the refs, platforms and images of a layout")
    insp.add_argument("path", metavar="PATH", help="an archive (a file or a URL) or an OCI layout directory")
    insp.add_argument("--ref", metavar="NAME", help="ref name (org.opencontainers.image.ref.name) or digest")
    insp.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="platform to resolve (default: this machine's)"
    )
    insp.add_argument("--json", action="store_true", help="print one JSON object")
    _cache_arguments(insp)
    insp.add_argument(
        "--index",
        metavar="FILE|URL",
        help="a portable index (ocifuse index) to take the table from",
    )

    mnt = sub.add_parser(
        "mount",
        help="mount an oci-archive or docker-archive read-only as an OCI layout",
        description="Mount ARCHIVE read-only on MOUNTPOINT as the OCI image layout it holds, or "
        "(--rootfs) as the root filesystem of one of its images, without extracting anything. "
        "Returns once the mount is live; ocifuse umount MOUNTPOINT removes it. See man ocifuse.",
    )
    _mount_arguments(mnt)

    idx = sub.add_parser(
        "index",
        help="write a portable index of an archive, for machines that mount it with -o index=",
        description="Write FILE: what the index cache would hold for ARCHIVE (its entry table, gzip "
        "seek points or zstd frame table, and for every image in it each layer's index and table and "
        "the merged tree of --rootfs), so that a machine with an empty cache mounts it without "
        "decompressing anything first (mount -o index=FILE|URL). See man ocifuse.",
    )
    idx.add_argument("path", metavar="ARCHIVE", help="an archive (a file or a URL)")
    idx.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the index")

    um = sub.add_parser("umount", help="unmount an ocifuse mount (also one whose daemon died)")
    um.add_argument("mountpoint", metavar="MOUNTPOINT")
    um.add_argument("-z", "--lazy", action="store_true", help="detach now, clean up when no longer busy")

    cache = sub.add_parser(
        "cache", help="list, prune or clear the index cache (stored entry tables and indexes)"
    )
    cache.add_argument(
        "action",
        choices=("list", "prune", "clear"),
        help="list the entries (least recently used first), remove the least recently used, or all",
    )
    cache.add_argument("--cache", metavar="DIR", help="the cache directory (default: the user's)")
    cache.add_argument(
        "--max",
        metavar="SIZE",
        type=_size,
        help="the bound list shows and prune keeps to (default: the smaller of 10G and 10%% of the disk)",
    )
    cache.add_argument(
        "--older-than",
        metavar="AGE",
        type=_age,
        help="prune: also remove entries unused for AGE (30m, 12h, 7d)",
    )
    return p


def _size(text: str) -> int:
    """argparse's type for a SIZE (512M, 10G)."""
    from .units import parse_size

    return _argument(parse_size, text)


def _age(text: str) -> int:
    """argparse's type for an AGE (30m, 12h, 7d)."""
    from .units import parse_age

    return _argument(parse_age, text)


def _argument(parse: Callable[[str], int], text: str) -> int:
    """``parse(text)``, its ValueError as argparse's one-line usage error."""
    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR", help="index cache directory (default: the user's; man ocifuse)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the index cache")
    p.add_argument(
        "--cache-max",
        metavar="SIZE",
        type=_size,
        help="bound of the index cache, least recently used out first (default: 10G or 10%% of the disk)",
    )


# What ``mount`` takes as ARCHIVE: told in full by ``ocifuse mount --help`` (and the man page).
ARCHIVE_HELP = (
    "what to mount: an oci-archive (a tar of an OCI image layout: skopeo copy oci-archive:, podman save "
    "--format oci-archive) or a docker-archive (docker save, podman save), either one plain or "
    "compressed as a whole with gzip or zstd (.tar.gz, .tar.zst: found by their magic bytes, not "
    "their name), as a path or a URL (http://, https://, s3://BUCKET/KEY: read by range); with "
    "--rootfs, also an OCI image layout directory"
)


def _mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", metavar="ARCHIVE", help=ARCHIVE_HELP)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory, or /dev/fd/N")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached; log to stderr")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="comma-separated mount options (verify, nonempty, rootfs, ref=NAME, ...; see man ocifuse)",
    )
    p.add_argument("--verify", action="store_true", help="check each blob against its digest when read")
    p.add_argument(
        "--rootfs", action="store_true", help="serve the image's root filesystem (its layers merged)"
    )
    p.add_argument("--ref", metavar="NAME", help="with --rootfs: the image's ref name or digest")
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="with --rootfs: the platform (default: this machine's)",
    )
    p.add_argument(
        "--rootless", action="store_true", help="with --rootfs: show every file as the mounting user's"
    )
    p.add_argument(
        "--ignore-diff-ids",
        action="store_true",
        help="with --rootfs: serve layers whose content differs from the config's diff_ids (logged)",
    )
    p.add_argument("-d", "--debug", action="store_true", help="log every request")
    _cache_arguments(p)


def _helper_parser() -> argparse.ArgumentParser:
    """mount.fuse3's form: ``ocifuse SOURCE MOUNTPOINT -o OPTS`` (options last)."""
    p = argparse.ArgumentParser(prog="ocifuse", description="mount(8) helper form of ocifuse mount")
    _mount_arguments(p)
    return p


def unknown_command(args: Sequence[str]) -> str | None:
    """The error line for a first word that is no command and no path, or None when there is none.

    mount.fuse3 runs ``ocifuse SOURCE MOUNTPOINT -o OPTS``: a first word that is not a command is
    the archive of that form. It is taken for a mistyped command instead when no such path exists
    and it is close to a command's name (``inpsect``), or when it is the only word (``ocifuse
    mnt``): either way a mount could only fail, and with a line about the mountpoint.
    """
    words = [a for a in args if not a.startswith("-")]
    if not words or words[0] in COMMANDS or os.path.lexists(words[0]):
        return None
    import difflib  # only on this path: every command pays for its imports

    close = difflib.get_close_matches(words[0], COMMANDS, n=1)
    if close:
        return f"unknown command {words[0]!r} (did you mean {close[0]}?)"
    if len(words) == 1:
        return f"unknown command {words[0]!r} (the commands: {', '.join(COMMANDS)}; see ocifuse --help)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 findings or failure, 2 unusable input)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C at any point, the parsing of the arguments too: no traceback
        return 128 + signal.SIGINT


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if argv is None:
        hide_url_secrets()
    first = next((a for a in args_list if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS and "--version" not in args_list:
        unknown = unknown_command(args_list)
        if unknown is not None:
            print(f"ocifuse: {unknown}", file=sys.stderr)
            return 2  # as argparse's own usage errors
        args = _helper_parser().parse_args(args_list)
        args.command = "mount"
    else:
        args = _parser().parse_args(args_list)
    try:
        return _run(args)
    except OcifuseError as e:
        # Under systemd the one error line is the one journald must keep at priority err (sd-daemon(3)).
        print(f"{journal.prefix(journal.ERR)}ocifuse: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``ocifuse inspect ... | head``): stop quietly, as SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def hide_url_secrets() -> bool:
    """Show this process's URL arguments without userinfo or query in ``ps`` (/proc/PID/cmdline).

    The kernel shows the argument strings in the process's own memory, [arg_start, arg_end)
    (proc(5), /proc/PID/stat fields 48 and 49), to every user; a mount's daemon lives on with
    them. They are overwritten in place, each URL by what ``redact`` shows of it, the rest padded
    with NULs (as setproctitle does; Python keeps its own copy of argv, which is unchanged). True
    when something was hidden. Linux only; elsewhere, or if anything is unexpected, nothing happens.
    """
    import ctypes

    from .urls import is_url, redact

    try:
        with open("/proc/self/cmdline", "rb") as f:
            old = f.read()
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49; the list starts at field 3
    except (OSError, IndexError, ValueError):
        return False
    args = old.split(b"\0")[:-1]
    shown = [
        redact(text).encode() if is_url(text := a.decode(errors="surrogateescape")) else a for a in args
    ]
    if shown == args or len(old) != end - start:
        return False
    new = b"\0".join(shown) + b"\0"
    new += b"\0" * (end - start - len(new))
    if len(new) != end - start:
        return False
    ctypes.memmove(start, new, len(new))
    return True


def _log_to_stderr() -> None:
    """Warnings of fsck, inspect and cache as one ``ocifuse: ...`` line each on stderr.

    (A mount sets up its own logging: daemon.setup_logging.) Under systemd each line carries its
    syslog priority, as the error line does. Without this, Python's last-resort handler would print
    bare messages that do not say which program wrote them.
    """
    import logging

    class _Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            level = journal.ERR if record.levelno >= logging.ERROR else journal.WARNING
            try:
                print(f"{journal.prefix(level)}ocifuse: {record.getMessage()}", file=sys.stderr)
            except Exception:
                self.handleError(record)

    root = logging.getLogger()
    if not any(h.get_name() == "ocifuse-stderr" for h in root.handlers):  # main() may run again
        handler = _Lines(logging.WARNING)
        handler.set_name("ocifuse-stderr")
        root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    if args.command in ("fsck", "inspect", "cache", "index"):
        _log_to_stderr()
    if args.command == "fsck":
        from .cache import open_cache
        from .fsck import main as fsck_main

        return fsck_main(
            args.path,
            as_json=args.json,
            layers=args.layers,
            cache=open_cache(args.cache, disabled=args.no_cache, max_size=args.cache_max),
            index=args.index,
        )
    if args.command == "inspect":
        from .cache import open_cache
        from .inspect import main as inspect_main

        return inspect_main(
            args.path,
            ref=args.ref,
            platform=args.platform,
            as_json=args.json,
            cache=open_cache(args.cache, disabled=args.no_cache, max_size=args.cache_max),
            index=args.index,
        )
    if args.command == "index":
        from .makeindex import main as index_main

        return index_main(args.path, args.output)
    if args.command == "cache":
        from .cache import cache_main

        # --max is the bound list shows and prune keeps to; --older-than is prune's alone.
        stray = "--older-than" if args.older_than is not None and args.action != "prune" else None
        if args.max is not None and args.action == "clear":
            stray = "--max"
        if stray:
            print(f"ocifuse: cache {args.action} takes no {stray}", file=sys.stderr)
            return 2  # as argparse's own usage errors
        return cache_main(args.action, args.cache, max_size=args.max, older_than=args.older_than)
    if args.command == "mount":
        from .daemon import mount_main

        return mount_main(args)
    from .umount import umount_main  # neither trio nor pyfuse3: unmounting stays cheap

    return umount_main(args.mountpoint, lazy=args.lazy)


if __name__ == "__main__":
    sys.exit(main())
