"""Mount lifecycle: check, open, build the tree, mount, background, serve, notify, unmount."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import stat
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from . import options as mount_options
from .cache import open_cache
from .errors import MountError as MountError
from .fs import Operations, requests_summary
from .journal import stderr_is_journal
from .umount import visible_mount
from .urls import DEFAULT_TIMEOUT, RemoteOptions, is_url, redact
from .views import ViewOptions, open_mount

log = logging.getLogger(__name__)

_DEV_FD = re.compile(r"/dev/fd/\d+")
# syslog priorities (sd-daemon(3)) for journald's "<N>" line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
READY_TIMEOUT = 60.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority, as journald reads it from a stream (sd-daemon(3))."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(*, foreground: bool, debug: bool, detached: bool = True) -> None:
    """Foreground: stderr (with priority prefixes under systemd); background: syslog if there is one.

    A background mount before it detaches (``detached=False``: opening the archive, at the user's
    terminal or in mount(8)) writes warnings and errors to stderr, not its INFO lines: those are
    for the log of a daemon, and the command's silence means the mount is live. Under systemd
    (stderr is the journal) and with ``debug`` every line stays.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if not foreground and not detached:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(logging.Formatter("ocifuse: %(message)s"))
            handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    elif foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s ocifuse[%(process)d] %(levelname)s: %(message)s")
            )
    else:
        from logging.handlers import SysLogHandler  # only a background mount logs to syslog

        handler = SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("ocifuse[%(process)d]: %(levelname)s: %(message)s"))
    root.addHandler(handler)


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's $NOTIFY_SOCKET (path or abstract ``@name``); False if none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def check_mountpoint(mountpoint: str, *, nonempty: bool = False) -> None:
    """Raise MountError unless ``mountpoint`` is an empty directory that is not already a mount point.

    A directory with files in it is refused unless ``nonempty`` (``-o nonempty``): the mount would
    hide them without a word, as fusermount refused it before FUSE 3.
    """
    if _DEV_FD.fullmatch(mountpoint):
        return  # mount.fuse3 already mounted; libfuse takes over the fd (drop_privileges)
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        if e.errno in _DEAD:
            raise MountError(
                f"{mountpoint} is a dead mount (its daemon is gone): run ocifuse umount {mountpoint}"
            ) from e
        raise MountError(f"mountpoint {mountpoint}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint}: not a directory")
    if os.path.ismount(mountpoint):
        if _dead(mountpoint):
            raise MountError(
                f"{mountpoint} is a dead mount (its daemon is gone): run ocifuse umount {mountpoint}"
            )
        raise MountError(f"mountpoint {mountpoint}: already a mount point")
    if not nonempty and _has_entries(mountpoint):
        raise MountError(
            f"mountpoint {mountpoint} is not empty: the mount would hide its files "
            "(mount over them anyway with -o nonempty)"
        )
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        raise MountError(f"mountpoint {mountpoint}: permission denied (you need write access to it)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist: FUSE is not available here (is the fuse module loaded?)")
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        # libfuse opens /dev/fuse itself before it hands the mount to fusermount3, and gives up here.
        raise MountError("/dev/fuse: permission denied (this user may not use FUSE)")


# A FUSE mount whose daemon died (or whose connection was aborted) answers every request that
# reaches it with ENOTCONN: the mount is there, nothing serves it.
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)
DEAD_PROBE_TIMEOUT = 2.0


def _dead(mountpoint: str) -> bool:
    """True if the FUSE mount on ``mountpoint`` has no daemon any more.

    A stat may still succeed from attributes the kernel cached while the daemon lived (ocifuse's
    last a day); statfs is never cached, so it asks the daemon. A daemon that is alive but does
    not answer is not waited for: the probe's thread is left behind (a daemon thread, killed with
    the process) and the mount counts as alive.
    """
    found = visible_mount(mountpoint)
    if found is None or not found[1].startswith("fuse"):
        return False
    import threading

    answer: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(mountpoint)
            answer.append(0)
        except OSError as e:
            answer.append(e.errno or 0)

    thread = threading.Thread(target=probe, name="dead-mount-probe", daemon=True)
    thread.start()
    thread.join(DEAD_PROBE_TIMEOUT)
    return bool(answer) and answer[0] in _DEAD


def _has_entries(directory: str) -> bool:
    """True if ``directory`` lists anything; False also when it cannot be listed (then it is not judged)."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except OSError as e:
        log.debug("cannot list %s (%s): not checked for files", directory, e.strerror or e)
        return False


def check_source(path: str, *, rootfs: bool = False) -> None:
    """Raise MountError for a directory's layout view: tools read a layout directory as it is.

    The rootfs view (``--rootfs``) of a layout directory is served: it is not the directory itself.
    A URL is the remote source's to judge when it is opened (remote.py).
    """
    if rootfs or is_url(path) or not os.path.isdir(path):
        return  # anything else is the archive scan's to judge (NotAnArchive says why)
    if os.path.isfile(os.path.join(path, "oci-layout")):
        raise MountError(
            f"{path} is a layout directory: tools read it as it is (skopeo inspect oci:{path}:TAG), "
            "so only its root filesystem needs a mount (--rootfs)"
        )
    raise MountError(f"{path} is a directory, not an oci-archive tar")


FUSE_CONF = "/etc/fuse.conf"
# fusermount3 refuses these to a user other than root without user_allow_other (fusermount.c).
_OTHERS_OPTIONS = ("allow_other", "allow_root")


def allows_others(conf: str) -> bool:
    """True if fuse.conf text turns on ``user_allow_other``, read as fusermount3 reads it.

    fusermount.c (read_conf, strip_line): ``#`` starts a comment, surrounding whitespace is
    dropped, and a line counts only when it ends with a newline.
    """
    lines = conf.split("\n")[:-1]  # the part after the last newline is not a line fusermount3 reads
    return any(line.partition("#")[0].strip() == "user_allow_other" for line in lines)


def check_allow_other(fuse_options: tuple[str, ...], *, euid: int, conf_path: str = FUSE_CONF) -> None:
    """Raise MountError when a user other than root asks for allow_other/allow_root and fuse.conf forbids it.

    Checked before libfuse is called: fusermount3's refusal and libfuse's would be two lines
    that do not say what to change.
    """
    asked = [o for o in fuse_options if o in _OTHERS_OPTIONS]
    if euid == 0 or not asked:
        return
    try:
        with open(conf_path, encoding="utf-8", errors="replace") as f:
            conf = f.read()
    except FileNotFoundError:
        conf = ""
    except OSError as e:
        log.debug("cannot read %s (%s): leaving %s to fusermount3", conf_path, e, asked[0])
        return
    if not allows_others(conf):
        raise MountError(
            f"option {asked[0]} needs a line 'user_allow_other' in {conf_path} for users other than "
            f"root (an administrator adds it), or mount without {asked[0]}"
        )


def _fsname(path: str) -> str:
    """libfuse takes options as ASCII; other characters in the archive's path become '?'.

    A URL is shown without userinfo and query string (remote.redact): /proc/mounts is for everyone.
    """
    return (redact(path) if is_url(path) else path).encode("ascii", "replace").decode("ascii")


def mount_main(args: argparse.Namespace) -> int:
    """``ocifuse mount``: returns 0 once the mount is live (foreground: once it is unmounted).

    A stop signal before the kernel has the mount ends the process by that signal, once what the
    opening wrote is removed; after, the mount is taken down first (see _Stops and docs/mount.md).
    """
    stops = _Stops()
    stops.install()
    try:
        mounted = _mount(args, stops)
    except BaseException as e:
        if stops.signum is None or stops.mounted or isinstance(e, SystemExit):
            raise  # once the kernel has the mount, the serving loop handles a stop: an error is one
        # What the signal interrupted may have said it otherwise (an error of the code it stopped).
        name = signal.Signals(stops.signum).name
        log.debug("stopped by %s: %s", name, e if not isinstance(e, _Stopped) else "while opening")
        mounted = False
    finally:
        stops.restore()
    if not mounted and stops.signum is not None:
        shown = redact(args.archive) if is_url(args.archive) else os.path.abspath(args.archive)
        log.info("%s: stopped while opening %s", signal.Signals(stops.signum).name, shown)
        return _die_of(stops.signum)
    return 0


def _mount(args: argparse.Namespace, stops: _Stops) -> bool:
    """Check, open, mount, serve until unmounted; False when a stop signal came before the kernel mount."""
    # A URL is opened as given; what is shown of it (logs, errors, fsname) is ``shown``: no secrets.
    archive_path = args.archive if is_url(args.archive) else os.path.abspath(args.archive)
    shown = redact(archive_path) if is_url(archive_path) else archive_path
    mountpoint = args.mountpoint if _DEV_FD.fullmatch(args.mountpoint) else os.path.abspath(args.mountpoint)
    stops.interrupting = True  # until the view is open: indexing a large archive takes minutes
    try:
        opts = mount_options.parse(
            [*args.options, *_rootfs_flags(args)],
            fsname=_fsname(archive_path),
            verify=args.verify,
            debug=args.debug,
            cache=args.cache,
            nocache=args.no_cache,
            cache_max=args.cache_max,
        )
        setup_logging(foreground=args.foreground, debug=opts.debug, detached=False)
        check_source(archive_path, rootfs=opts.rootfs)
        check_allow_other(opts.fuse, euid=os.geteuid())
        check_mountpoint(mountpoint, nonempty=opts.nonempty)
        # A URL's client (obstore) runs a tokio runtime whose threads do not survive a fork: a child
        # forked after the open would wait for ever on its first fetch. So a background mount of a URL
        # forks before the open, and the child keeps the terminal (progress, its one error line) until
        # the mount is made; a local archive is opened in the parent and forks once mounted.
        fork_early = not args.foreground and is_url(archive_path)
        notify_parent: Callable[[str], None] = _daemonize(stops, early=True) if fork_early else _no_parent
        # A compressed archive is indexed here, before the fork: progress shows on the TTY the user
        # waits at (or goes to the log under systemd), and a refusal is the command's one error line.
        view = open_mount(archive_path, mountpoint, view_options(opts))
    finally:
        stops.interrupting = False
    tree = view.tree
    try:
        if stops.signum is not None:
            return False  # one the opening swallowed (raised where a C library caught it)
        if opts.ignored:
            log.debug("ignored mount options: %s", ",".join(opts.ignored))
        # -o verify: the layout view hashes each blob on first read; the rootfs view hashed its layers
        # at open (image.open_rootfs), and its files are no blobs (a path like blobs/sha256/... is not one).
        verify = opts.verify and not opts.rootfs
        ops = Operations(view.reader, tree, verify=verify, xattrs=opts.rootfs, own_all=opts.rootless)
        try:
            pyfuse3.init(ops, mountpoint, set(opts.fuse))
        except RuntimeError as e:
            raise MountError(f"cannot mount {shown} on {mountpoint} ({e})") from e
        # The kernel has the mount: from here on a stop signal is the serving loop's (_watch_signals),
        # which unmounts; one that came before the loop runs is in stops.signum.
        stops.mounted = True
        # Which mount is ours, for the unmount at the end (see _still_ours).
        ours = None if _DEV_FD.fullmatch(mountpoint) else visible_mount(mountpoint)
        if fork_early:
            _detach()
        elif not args.foreground:
            notify_parent = _daemonize(stops)
        if not args.foreground:
            setup_logging(foreground=False, debug=opts.debug)
        log.info("serving %s on %s: %d files, %d bytes", shown, mountpoint, tree.files, tree.total_size)
        status = view.status
        clean = False
        try:
            trio.run(_serve, _Startup(shown, mountpoint, opts.readahead_kb, status, notify_parent, stops))
            clean = True
        except Exception as e:  # trio wraps a task's error in an ExceptionGroup: say it in one line
            log.debug("the FUSE loop failed", exc_info=True)
            raise MountError(f"serving {shown} on {mountpoint} failed: {_innermost(e)}") from e
        finally:
            pyfuse3.close(unmount=_still_ours(mountpoint, ours))
            if not clean:
                notify_parent("the daemon failed before the mount was live")
    finally:
        view.close()
    log.info("unmounted %s after %s", mountpoint, requests_summary())
    return True


class _Stopped(BaseException):
    """A stop signal while the view opens: unwinds the opening (what it wrote is removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Stops:
    """SIGTERM, SIGINT and SIGHUP from the start of ``mount`` until the serving loop takes them over.

    The first one is kept (``signum``); while ``interrupting`` (the checks and the opening, which
    indexes a large archive for minutes) it also raises _Stopped, which unwinds the opening and
    removes what it wrote; later ones change nothing. Killed by the signal's default action instead
    (systemd's stop, a start timeout), the process would leave a partial cache temp file, or once
    the kernel has the mount a dead one ("Transport endpoint is not connected"). Python runs the
    handler in the main thread whichever thread the kernel picked, so threads of the opening (layer
    workers) need no mask. A signal ignored when the command started (nohup) stays ignored.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interrupting = False
        self.mounted = False  # the kernel has the mount: the serving loop unmounts it on a stop
        self._previous: dict[int, Callable[[int, types.FrameType | None], Any] | int | None] = {}

    @property
    def watched(self) -> tuple[int, ...]:
        """The stop signals this process takes (not those it started with ignored)."""
        return tuple(self._previous)

    def install(self) -> None:
        """Take the stop signals that are not ignored."""
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give the stop signals back to the handlers they had before ``install``."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.interrupting:
            self.interrupting = False
            raise _Stopped(signum)


def _die_of(signum: int) -> int:
    """End the process by ``signum``'s default action: its exit status says the signal (128+N in a shell).

    Returns 128+N in the odd case that the process outlives it.
    """
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum


def _still_ours(mountpoint: str, ours: tuple[str, str] | None) -> bool:
    """Whether the daemon may unmount ``mountpoint`` on its way out: only while its own mount is there.

    libfuse unmounts by path (fuse_kern_unmount: umount2(MNT_DETACH) as root, else fusermount3 -u
    -z), whatever is mounted there by then; it skips that only when the kernel has already cut the
    connection. A daemon stopped (SIGTERM) after its mount was lazily detached (``ocifuse umount
    --lazy`` of a busy mount, systemd's ExecStopPost) still has its connection, and another mount
    may sit on the same path by then: unmounting by path would detach that one, and a process
    walking it would find names it had just listed gone (FileNotFoundError).
    """
    if _DEV_FD.fullmatch(mountpoint):
        return True  # mount.fuse3 made the mount; libfuse knows it by its fd
    if ours is None:
        return True  # not found right after mounting (cannot happen): keep libfuse's behaviour
    now = visible_mount(mountpoint)
    if now == ours:
        return True
    if now is not None and now[1] == ours[1]:
        log.warning("%s: another mount is there now; leaving it alone", mountpoint)
    return False


def _rootfs_flags(args: argparse.Namespace) -> list[str]:
    """The command line's --rootfs, --ref, ... as the ``-o`` options they stand for."""
    out = [flag for flag in ("rootfs", "rootless", "ignore_diff_ids") if getattr(args, flag, False)]
    for key in ("ref", "platform"):
        value = getattr(args, key, None)
        if value is not None:
            out.append(f"{key}={mount_options.escape(value)}")
    return out


def view_options(opts: mount_options.MountOptions) -> ViewOptions:
    """What a mount's ``-o`` options ask of the front door (views.py): the same view inspect would open."""
    return ViewOptions(
        cache=open_cache(opts.cache, disabled=opts.nocache, max_size=opts.cache_max),
        limits=opts.limits,
        rootfs=opts.rootfs,
        ref=opts.ref,
        platform=opts.platform,
        verify=opts.verify,
        ignore_diff_ids=opts.ignore_diff_ids,
        index=opts.index if opts.index is None or is_url(opts.index) else os.path.abspath(opts.index),
        remote=RemoteOptions(
            timeout=opts.timeout if opts.timeout is not None else DEFAULT_TIMEOUT,
            cafile=opts.cafile,
            credentials=opts.credentials,
        ),
    )


def _innermost(exc: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group, or ``exc`` itself."""
    inner = getattr(exc, "exceptions", None)  # BaseExceptionGroup (3.11+, or trio's backport on 3.10)
    while inner:
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


def _no_parent(message: str) -> None:
    """Foreground: there is no waiting parent."""


def _daemonize(stops: _Stops, *, early: bool = False) -> Callable[[str], None]:
    """Fork; the parent waits until the child reports the mount live, then exits with ``os._exit``.

    Returns the child's reporter: "ok" for live, anything else is an error line for the parent.
    ``early``: forked before the view opens; the child stays attached to the terminal until
    ``_detach``, and one that exits before it reports (a refusal, said on the shared stderr)
    makes the parent exit with its status; the parent waits as long as the open takes.
    """
    read_end, write_end = os.pipe()
    # Blocked across the fork: Python forgets in the child a signal that arrives before os.fork
    # returns there (PyOS_AfterFork_Child), and one the parent passes on at once must not be lost.
    # The waiting parent is never unwound (_Stopped); an early child goes on opening, and is.
    interrupting, stops.interrupting = stops.interrupting, False
    signal.pthread_sigmask(signal.SIG_BLOCK, stops.watched)
    try:
        pid = os.fork()
        if pid == 0:
            stops.interrupting = interrupting
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops.watched)  # a pending one is delivered now
    if pid > 0:
        os.close(write_end)
        os._exit(_wait_for_child(read_end, pid, stops, early=early))
    os.close(read_end)
    if not early:
        _detach()

    def report(message: str) -> None:
        nonlocal write_end
        if write_end >= 0:
            with contextlib.suppress(OSError):
                os.write(write_end, message.encode() + b"\n")
            os.close(write_end)
            write_end = -1

    return report


def _detach() -> None:
    """The daemon leaves the terminal and the session of the command that started it."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _wait_for_child(read_end: int, pid: int, stops: _Stops, *, early: bool = False) -> int:
    """In the parent: 0 when the child says "ok", else print its reason and return 1.

    A stop signal the parent gets before it exits (the user's Ctrl-C, a service manager) is passed
    on to the child, which unmounts and exits; then the parent dies of it. A child that does not
    answer in READY_TIMEOUT is stopped the same way: no mount stays behind that the command did
    not report. ``early``: a child forked before the open, waited for without a time limit; if it
    exits without a word, it said why on stderr itself: its exit status is returned, nothing printed.
    """
    import select
    import time

    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)  # a signal wakes the select (PEP 475 would retry it unseen)
    deadline = None if early else time.monotonic() + READY_TIMEOUT
    message: str | None = None
    timed_out = False
    while message is None and stops.signum is None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            message = f"the mount did not answer within {READY_TIMEOUT:.0f}s"
            timed_out = True
            break
        ready, _, _ = select.select([read_end, wake_read], [], [], left)
        if wake_read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 64)
        if read_end in ready:
            message = os.read(read_end, 4096).decode(errors="replace").strip()
    if message == "ok" and stops.signum is None:
        return 0
    if stops.signum is not None or timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, stops.signum or signal.SIGTERM)  # the child unmounts what it mounted
    code = _reap(pid)
    if code is None:
        message = f"the daemon (pid {pid}) did not stop when told to"
    elif stops.signum is not None:
        return _die_of(stops.signum)
    elif not message and early and code != 0:
        return code if code > 0 else 128 - code  # killed by a signal: as a shell reports it
    print(f"ocifuse: mount failed: {message or 'the daemon exited'}", file=sys.stderr)
    return 1


def _reap(pid: int) -> int | None:
    """Wait up to READY_TIMEOUT for the child ``pid`` to exit: its exit code (-N: signal N), or None."""
    import time

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # already reaped: nothing more is known
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


@dataclass(frozen=True, slots=True)
class _Startup:
    """What the serving loop announces once the mount is live, and to whom."""

    archive_path: str
    mountpoint: str
    readahead_kb: int
    status: str  # systemd's STATUS= line
    notify_parent: Callable[[str], None]  # the waiting parent of a background mount
    stops: _Stops  # the stop signal that came before the loop, if any


async def _serve(startup: _Startup) -> None:
    """Run the FUSE loop; report readiness once the mount answers; SIGTERM/SIGINT end it cleanly."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, startup)
        nursery.start_soon(_announce_ready, startup)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _watch_signals(startup: _Startup) -> None:
    """Unmount on the first stop signal, also one that came before the loop took them (startup.stops)."""
    stops = startup.stops
    if not stops.watched:
        return  # every one ignored since the command started: only an unmount ends the mount
    with trio.open_signal_receiver(*stops.watched) as signals:
        signum = stops.signum
        if signum is None:
            async for received in signals:
                signum = received
                break
        if signum is None:
            return
        name = signal.Signals(signum).name
        log.info("%s: unmounting", name)
        startup.notify_parent(f"stopped by {name} before the mount was live")
        sd_notify("STOPPING=1")
        pyfuse3.terminate()


async def _announce_ready(startup: _Startup) -> None:
    """Wait until the kernel has the mount (its root answers stat), then tell the parent and systemd."""
    if not _DEV_FD.fullmatch(startup.mountpoint):
        # Abandoned, not awaited, when SIGTERM ends the loop first: the stat would wait for an answer
        # that never comes, and the unmount that would end it runs only after this nursery exits.
        dev = await trio.to_thread.run_sync(_probe, startup.mountpoint, abandon_on_cancel=True)
        if startup.readahead_kb:
            await trio.to_thread.run_sync(_set_readahead, dev, startup.readahead_kb)
    log.info("mounted %s on %s", startup.archive_path, startup.mountpoint)
    startup.notify_parent("ok")
    sd_notify(f"READY=1\nSTATUS={startup.status}")


# A child that stats the mount's root and prints its st_dev: isolated (-I), no site (-S): ~10 ms.
_PROBE = "import os, sys; print(os.stat(sys.argv[1]).st_dev)"


_PROBE_TRIES = 3


def _probe(mountpoint: str) -> int:
    """Stat the mount's root from a child process (blocking); its st_dev once the mount answers.

    Not from this process: a thread of the daemon waiting in a FUSE request to its own mount
    cannot be killed (the kernel waits out a request the daemon has read), and a daemon killed
    (SIGKILL, the OOM killer) at that moment would keep the connection open for ever, a zombie
    that only an abort in /sys/fs/fuse/connections ends. The child holds no /dev/fuse fd
    (close_fds), so the connection aborts with the daemon and the child's stat fails at once.

    The child has a session of its own: Ctrl-C at the terminal of a foreground mount is the
    daemon's to handle (it unmounts), not a failed probe's. A child killed by a signal all the
    same (systemd stops a unit by signalling every process of its cgroup) is asked again, a few
    times: the daemon got the signal too, and its stop abandons this probe.
    """
    import subprocess

    argv = [sys.executable, "-I", "-S", "-c", _PROBE, mountpoint]
    for _ in range(_PROBE_TRIES):
        done = subprocess.run(argv, capture_output=True, text=True, check=False, start_new_session=True)
        if done.returncode >= 0:
            break
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit {done.returncode}"
        raise MountError(f"the mount on {mountpoint} does not answer ({why})")
    return int(done.stdout)


def _set_readahead(dev: int, kib: int) -> None:
    """Raise the mount's read-ahead (sysfs, root only), so the kernel sends larger reads."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
        log.debug("read_ahead_kb=%d for %s", kib, path)
    except OSError as e:
        log.debug("cannot set %s: %s (reads stay at the kernel's default size)", path, e)
