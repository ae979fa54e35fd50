"""Shell completion (completion/): bash and zsh complete what the code accepts, no more, no less.

The completions keep their own lists (a shell cannot ask Python at every TAB without a pause), so
each is checked here against the code's: the commands and each command's options (cli's parser),
the ``-o`` options (options.py's sets, and each one accepted by options.parse), the cache verbs.
bash runs the completion function as bash-completion would call it (COMP_LINE, COMP_POINT,
COMP_WORDS, COMP_CWORD); zsh runs interactive in a pseudo-terminal, where TAB runs the real
completion system and every match offered is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import mounted, skip_or_fail
from oci import LayoutBuilder

from ocifuse import cli, options

ROOT = Path(__file__).resolve().parent.parent
BASH = ROOT / "completion" / "ocifuse.bash"
ZSH_DIR = ROOT / "completion"
TIMEOUT = 10.0

# What -o offers: ocifuse's own options, those passed to FUSE and those always on (not the ones it
# accepts only to ignore them: nofail, _netdev, x-*, ...); a value option with its "=".
O_FLAGS = options.OWN_FLAGS | options.FUSE_FLAGS | set(options.FORCED)
O_VALUES = options.OWN_VALUES | options.OWN_SIZES | options.FUSE_VALUES
# A value each value option accepts, to show each offered option is one options.parse takes.
SAMPLE_VALUE = {
    "readahead_kb": "512",
    "timeout": "10",
    "platform": "linux/arm64",
    "max_size": "1G",
    "spill_max": "2G",
    "cache_max": "5G",
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_offered_mount_option_is_accepted() -> None:
    """The -o list the completions offer is made of options options.parse takes (rootfs's with rootfs)."""
    for flag in O_FLAGS:
        options.parse([flag, "rootfs"], fsname="a.tar")
    for key in O_VALUES:
        options.parse([f"{key}={SAMPLE_VALUE.get(key, 'x')}", "rootfs"], fsname="a.tar")


# -- bash ------------------------------------------------------------------------------------------

_CALL = """
source "$COMPLETION"
COMP_LINE=$LINE
COMP_POINT=${#LINE}
read -r -a COMP_WORDS <<<"$LINE"
[[ $LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
_ocifuse
printf '%s\\n' "${COMPREPLY[@]}"
"""


def bash_complete(line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end), as the completion function gives it."""
    if shutil.which("bash") is None:
        skip_or_fail("bash is not installed")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COMPLETION": str(BASH), "LINE": line}
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", _CALL],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0 and "line" not in done.stderr, (
        done.stderr
    )  # no bash error, e.g. "line 3: ..."
    return [w for w in done.stdout.split("\n") if w]


def test_bash_commands_and_global_options() -> None:
    assert set(bash_complete("ocifuse ")) == set(cli.COMMANDS)
    assert bash_complete("ocifuse ins") == ["inspect"]
    assert set(bash_complete("ocifuse in")) == {"inspect", "index"}
    assert set(bash_complete("ocifuse -")) == _flags(cli._parser())


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_bash_options_of_each_command(command: str) -> None:
    assert set(bash_complete(f"ocifuse {command} -")) == _flags(_subparsers()[command])


def test_bash_mount_options() -> None:
    offered = bash_complete("ocifuse mount -o ")
    assert len(offered) == len(set(offered))
    assert set(offered) == O_FLAGS | {f"{v}=" for v in O_VALUES}
    # the item after the last comma; what came before stays
    assert set(bash_complete("ocifuse mount -o verify,no")) == {
        f"verify,{o}" for o in O_FLAGS if o.startswith("no")
    }
    assert bash_complete("ocifuse mount -o rootfs,plat") == ["rootfs,platform="]
    # bash replaces only what follows the last '=' of a word (COMP_WORDBREAKS): the replies do too
    assert "linux/arm64" in bash_complete("ocifuse mount -o rootfs,platform=linux/a")
    assert bash_complete("ocifuse /srv/a.tar /mnt/a -o verify,allow_o") == [
        "verify,allow_other"
    ]  # mount.fuse3's form


def test_bash_paths(tmp_path: Path) -> None:
    (tmp_path / "image.tar").write_bytes(b"")
    (tmp_path / "mnt").mkdir()
    assert set(bash_complete("ocifuse mount ", tmp_path)) == {
        "image.tar",
        "mnt",
    }  # ARCHIVE: a file (or directory)
    assert bash_complete("ocifuse mount image.tar ", tmp_path) == ["mnt"]  # MOUNTPOINT: directories
    assert bash_complete("ocifuse mount -o ro image.tar ", tmp_path) == [
        "mnt"
    ]  # an option's value is no argument
    assert bash_complete("ocifuse mount image.tar mnt ", tmp_path) == []
    assert bash_complete("ocifuse image.tar ", tmp_path) == ["mnt"]  # mount.fuse3's form
    assert set(bash_complete("ocifuse fsck ", tmp_path)) == {"image.tar", "mnt"}
    assert bash_complete("ocifuse inspect --cache ", tmp_path) == ["mnt"]
    assert bash_complete("ocifuse mount -o cache=m", tmp_path) == ["mnt/"]  # after the '=' (a word break)
    assert bash_complete("ocifuse fsck --cache=m", tmp_path) == ["mnt/"]


def test_bash_cache_verbs_and_platforms() -> None:
    cache = _subparsers()["cache"]
    verbs = next(a.choices for a in cache._actions if a.dest == "action")
    assert verbs is not None
    assert set(bash_complete("ocifuse cache ")) == set(verbs)
    assert bash_complete("ocifuse cache --cache /tmp c") == ["clear"]
    assert bash_complete("ocifuse cache --max 1G --older-than 7d p") == ["prune"]  # values skipped
    assert bash_complete("ocifuse cache list ") == []
    assert "linux/arm64" in bash_complete("ocifuse inspect --platform linux/")
    assert "linux/arm64" in bash_complete("ocifuse inspect --platform=linux/")


@pytest.mark.fuse
def test_bash_umount_offers_the_ocifuse_mounts(tmp_path: Path) -> None:
    b = LayoutBuilder()
    b.tag(b.image([b"layer"]), "v1")
    archive = b.write_tar(tmp_path / "a.tar")
    (tmp_path / "plain").mkdir()
    with mounted(archive, tmp_path / "mnt") as m:
        assert bash_complete(f"ocifuse umount {tmp_path}/") == [str(m.mountpoint)]
        assert bash_complete(f"ocifuse umount --lazy {tmp_path}/m") == [str(m.mountpoint)]


def test_bash_completion_is_installed_where_bash_completion_loads_it() -> None:
    """The set-up installs it: as root where bash-completion loads it on demand; else in the venv."""
    loader = Path("/usr/share/bash-completion/bash_completion")
    if os.geteuid() != 0:
        venv_copy = ROOT / ".venv/share/bash-completion/completions/ocifuse"
        assert venv_copy.is_file(), "run bash .ci/setup.sh"
        return
    if not loader.is_file():
        skip_or_fail("bash-completion is not installed")
    script = f"source {loader}; __load_completion ocifuse && complete -p ocifuse && declare -F _ocifuse"
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"bash-completion does not find it (run bash .ci/setup.sh): {done.stderr}"
    assert done.stdout.split("\n")[:2] == ["complete -F _ocifuse ocifuse", "_ocifuse"]


# -- zsh -------------------------------------------------------------------------------------------


class Zsh:
    """An interactive zsh in a pseudo-terminal with the completion system on and ours first in $fpath.

    ``complete(line)`` types ``line`` and a key bound to a completion widget that runs the real
    completion (``_main_complete``) with ``compadd`` wrapped to record every match, and returns
    the matches (the set: the completion system may add one match twice, once per group).
    """

    def __init__(self, home: Path) -> None:
        self.out = home / "matches"
        master, slave = pty.openpty()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TERM": "dumb",
            "HOME": str(home),
            "ZDOTDIR": str(home),
        }
        self.proc = subprocess.Popen(
            ["zsh", "-f", "-i"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=home,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        setup = [
            "PS1='> '",
            f"fpath=({ZSH_DIR} $fpath)",
            "autoload -Uz compinit && compinit -u -D",
            "typeset -ga _got",
            # every match the completion adds, recorded as well (-O: the matching words, not added)
            'compadd() { local -a _m; builtin compadd -O _m "$@"; _got+=("${_m[@]}");',
            '  builtin compadd "$@"; }',
            f'_record() {{ print -rl -- "${{_got[@]}}" > {self.out}.tmp;',
            f"  mv {self.out}.tmp {self.out}; _got=(); }}",
            "_recording() { _got=(); comppostfuncs=(_record); _main_complete; }",
            "zle -C recording complete-word _recording",
            "bindkey '^X' recording",
            f"print ready > {self.out}",
        ]
        self._send("\n".join(setup) + "\n")
        self._wait_for_out()

    def _send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def _drain(self) -> None:
        while select.select([self.master], [], [], 0.02)[0]:
            try:
                if not os.read(self.master, 65536):
                    return
            except OSError:
                return

    def _wait_for_out(self) -> str:
        deadline = time.monotonic() + TIMEOUT
        while not self.out.exists():
            self._drain()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"zsh did not answer (exit {self.proc.poll()})")
        text = self.out.read_text()
        self.out.unlink()
        return text

    def complete(self, line: str) -> set[str]:
        """The matches zsh offers for ``line``, the cursor at its end."""
        self._send(line + "\x18")  # ^X: the recording completion widget
        matches = {w for w in self._wait_for_out().split("\n") if w}
        self._send("\x15")  # ^U: clear the line for the next one
        return matches

    def close(self) -> None:
        """End the shell (killed if it does not exit)."""
        with contextlib.suppress(OSError):
            self._send("\x15exit\n")
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        os.close(self.master)


@pytest.fixture
def zsh(tmp_path: Path) -> Iterator[Zsh]:
    if shutil.which("zsh") is None:
        skip_or_fail("zsh is not installed (bash .ci/setup.sh test installs it)")
    shell = Zsh(tmp_path)
    try:
        yield shell
    finally:
        shell.close()


def test_zsh_commands_options_and_verbs(zsh: Zsh) -> None:
    assert zsh.complete("ocifuse ") == set(cli.COMMANDS)
    assert zsh.complete("ocifuse -") == _flags(cli._parser())
    for command, parser in _subparsers().items():
        assert zsh.complete(f"ocifuse {command} -") == _flags(parser), command
    assert zsh.complete("ocifuse cache ") == {"list", "prune", "clear"}


def test_zsh_mount_options(zsh: Zsh) -> None:
    assert zsh.complete("ocifuse mount -o ") == O_FLAGS | O_VALUES
    assert zsh.complete("ocifuse mount -o verify,no") == {o for o in O_FLAGS if o.startswith("no")}
    assert "linux/arm64" in zsh.complete("ocifuse mount -o rootfs,platform=linux/")
    assert "linux/arm64" in zsh.complete("ocifuse inspect --platform linux/")
    assert zsh.complete("ocifuse /srv/a.tar /mnt/a -o allow_o") == {"allow_other"}  # mount.fuse3's form


def test_zsh_paths(zsh: Zsh, tmp_path: Path) -> None:
    (tmp_path / "image.tar").write_bytes(b"")
    (tmp_path / "mnt").mkdir()
    assert {"image.tar", "mnt"} <= zsh.complete("ocifuse mount ")
    assert zsh.complete("ocifuse mount image.tar ") == {"mnt"}
    assert zsh.complete("ocifuse mount -o cache=m") == {"mnt"}
