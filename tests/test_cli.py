"""The command line front: dispatch, the mount(8) helper form, and a reader that goes away."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from oci import LayoutBuilder

from ocifuse import cli

OCIFUSE = Path(sys.executable).parent / "ocifuse"


def test_closed_stdout_is_quiet(tmp_path: Path) -> None:
    """``ocifuse inspect ... | head``: a reader that closes the pipe gets no traceback, exit 128+SIGPIPE."""
    builder = LayoutBuilder()
    for n in range(200):  # enough output to overflow the pipe
        builder.tag(builder.image([bytes([n])]), f"ref{n}")
    archive = builder.write_tar(tmp_path / "a.tar")
    proc = subprocess.Popen(
        [OCIFUSE, "inspect", "--json", archive], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert "Traceback" not in err


def test_helper_form_is_a_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    """mount.fuse3 runs ``ocifuse SOURCE MOUNTPOINT -o OPTS``: that is ``ocifuse mount``."""
    seen: dict[str, object] = {}

    def fake_mount(args: object) -> int:
        seen["args"] = args
        return 0

    import ocifuse.daemon

    monkeypatch.setattr(ocifuse.daemon, "mount_main", fake_mount)
    assert cli.main(["/srv/a.tar", "/mnt/a", "-o", "ro,nofail"]) == 0
    args = seen["args"]
    assert (args.archive, args.mountpoint, args.options) == ("/srv/a.tar", "/mnt/a", ["ro,nofail"])  # type: ignore[attr-defined]


def test_core_error_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An archive that cannot be opened: one line on stderr naming it, exit 2."""
    missing = tmp_path / "missing.tar"
    assert cli.main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1


def test_mount_refused_without_access_to_dev_fuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who may not open /dev/fuse is told so in one line, before anything is tried."""
    import ocifuse.daemon as daemon

    real_access = os.access
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "access", lambda p, mode: p != "/dev/fuse" and real_access(p, mode))
    with pytest.raises(daemon.MountError, match="/dev/fuse: permission denied"):
        daemon.check_mountpoint(str(tmp_path))


@pytest.mark.parametrize("command", [["inspect"], ["fsck"], ["mount", "-f"]])
def test_a_fifo_is_refused_not_waited_on(tmp_path: Path, command: list[str]) -> None:
    """A fifo given as the archive is refused in one line; opening it never waits for a writer."""
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    (tmp_path / "mnt").mkdir()
    extra = [str(tmp_path / "mnt")] if command[0] == "mount" else []
    done = subprocess.run(
        [OCIFUSE, *command, "--no-cache", fifo, *extra], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"ocifuse: {fifo}: not a regular file"]
