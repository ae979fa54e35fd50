"""Remote archives with credentials and redirects, and secrets that never show.

HTTP credentials from the URL, ``-o credentials=FILE`` and ``~/.netrc`` against nginx's own
``auth_basic`` and a bearer check; S3 credentials from an AWS CLI profile against moto's server
with its authentication on; redirects resolved at open (at most a few, never https to http);
and a URL's userinfo and query kept out of /proc/mounts, ps, logs, inspect/fsck and the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RealImage
from mounting import background_mount, daemon_pids, is_mounted, mount_source, mounted, run_ocifuse
from servers import S3, Nginx, make_ca, nginx, s3_server
from tarbuild import tree_of

from ocifuse import credentials, remote
from ocifuse.cache import IndexCache
from ocifuse.errors import LayoutOpenError
from ocifuse.layout import ViewOptions
from ocifuse.options import parse
from ocifuse.urls import RemoteOptions
from ocifuse.views import open_layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

USER, PASSWORD = "reader", "s3cret-pass:word"
TOKEN = "tok-0123456789abcdef"
# nginx: /basic/ wants USER:PASSWORD, /bearer/ the token; redirects of every kind to the archive.
LOCATIONS = """
location /basic/ {{ auth_basic "ocifuse"; auth_basic_user_file {htpasswd}; }}
location /bearer/ {{ if ($http_authorization != "Bearer {token}") {{ return 401; }} }}
location = /hop/1 {{ return 302 /hop/2; }}
location = /hop/2 {{ return 301 http://127.0.0.1:{{port}}/image.tar; }}
location = /loop {{ return 302 /loop; }}
location = /down {{ return 302 http://127.0.0.1:{{port}}/image.tar; }}
location = /away/basic {{ return 302 http://localhost:{{port}}/basic/image.tar; }}
"""


def _files(root: Path) -> dict[str, bytes]:
    return tree_of(root)[0]


def private(path: Path, text: str) -> Path:
    """A file of secrets as it should be: mode 0600."""
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def www(real_image: RealImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real image's archive at /image.tar, /basic/image.tar and /bearer/image.tar."""
    root = tmp_path_factory.mktemp("www")
    for where in (root, root / "basic", root / "bearer"):
        where.mkdir(exist_ok=True)
        shutil.copy(real_image.archive, where / "image.tar")
    return root


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def web(www: Path, ca: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx over http and https with the locations above; htpasswd made with openssl."""
    directory = tmp_path_factory.mktemp("nginx")
    hashed = subprocess.run(
        ["openssl", "passwd", "-apr1", PASSWORD], capture_output=True, text=True, check=True
    ).stdout.strip()
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(f"{USER}:{hashed}\n")
    extra = LOCATIONS.format(htpasswd=htpasswd, token=TOKEN)
    with nginx(directory, www, tls=(ca[1], ca[2]), extra=extra) as server:
        yield server


def requests_for(server: Nginx) -> list[tuple[str, str, int]]:
    """(method, path, status) of each request in nginx's access log."""
    out = []
    log = server.directory / "access.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        request, status = line.split('"')[1].split(), line.split('"')[2].split()[0]
        out.append((request[0], request[1], int(status)))
    return out


# -- credentials, pure ------------------------------------------------------------------------------


def test_credentials_file_formats(tmp_path: Path) -> None:
    """One line: USER:PASSWORD (the password may hold ':') or Bearer TOKEN; anything else refused."""
    f = private(tmp_path / "c", f"{USER}:{PASSWORD}\n")
    assert credentials.read_credentials_file(str(f)) == credentials.basic(USER, PASSWORD)
    assert credentials.basic("a", "b:c") == "Basic YTpiOmM="
    private(f, f"Bearer {TOKEN}\n")
    assert credentials.read_credentials_file(str(f)) == f"Bearer {TOKEN}"
    for bad in ("", "no-colon\n", ":nouser\n", "Bearer two words\n", "a:b\nc:d\n"):
        private(f, bad)
        with pytest.raises(credentials.CredentialsError, match="one line|bearer token"):
            credentials.read_credentials_file(str(f))


def test_a_secrets_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = private(tmp_path / "c", "u:p\n")
    f.chmod(0o644)
    with pytest.raises(credentials.CredentialsError, match=r"readable by others \(mode 0644\)"):
        credentials.read_credentials_file(str(f))
    netrc = tmp_path / "netrc"
    netrc.write_text("machine h login u password p\n")
    netrc.chmod(0o640)
    with pytest.raises(credentials.CredentialsError, match="readable by others"):
        credentials.netrc_authorization("h", {"NETRC": str(netrc)})
    with pytest.raises(credentials.CredentialsError, match="No such file"):
        credentials.read_credentials_file(str(tmp_path / "missing"))


def test_netrc_machine_then_default(tmp_path: Path) -> None:
    """$NETRC, else ~/.netrc; the host's machine entry, else the default entry; none: None."""
    netrc = private(tmp_path / "n", "machine h1 login a password x\ndefault login d password y\n")
    env = {"NETRC": str(netrc)}
    assert credentials.netrc_authorization("h1", env) == credentials.basic("a", "x")
    assert credentials.netrc_authorization("other", env) == credentials.basic("d", "y")
    home = tmp_path / "home"
    home.mkdir()
    assert credentials.netrc_authorization("h1", {"HOME": str(home)}) is None
    private(home / ".netrc", "machine h1 login b password z\n")
    assert credentials.netrc_authorization("h1", {"HOME": str(home)}) == credentials.basic("b", "z")
    assert credentials.netrc_authorization("h2", {"HOME": str(home)}) is None
    private(netrc, "machine\n")
    with pytest.raises(credentials.CredentialsError, match="line"):
        credentials.netrc_authorization("h1", env)


def test_which_credentials_a_url_carries(tmp_path: Path) -> None:
    """The URL's userinfo, then the credentials file (for the named URL's origin only), then netrc."""
    f = private(tmp_path / "c", f"Bearer {TOKEN}\n")
    env = {"NETRC": str(private(tmp_path / "n", "machine other login n password m\n"))}
    named = "https://h:8443/x.tar"

    def auth(url: str, creds: str | None = str(f)) -> str | None:
        return credentials.authorization(url, credentials=creds, origin=named, env=env)

    assert auth("https://u:p%40ss@h:8443/x.tar") == credentials.basic("u", "p@ss")
    assert auth(named) == f"Bearer {TOKEN}"
    assert auth("https://h:8443/elsewhere/y.tar") == f"Bearer {TOKEN}"  # same origin
    assert auth("http://h:8443/x.tar") is None  # another scheme
    assert auth("https://h/x.tar") is None  # another port
    assert auth("https://other:8443/x.tar") == credentials.basic("n", "m")  # that host's netrc entry
    assert auth(named, None) is None


def _aws_files(home: Path, config: str, creds: str) -> dict[str, str]:
    (home / ".aws").mkdir(parents=True, exist_ok=True)
    (home / ".aws" / "config").write_text(config)
    (home / ".aws" / "credentials").write_text(creds)
    return {"HOME": str(home)}


def test_aws_profiles_as_the_aws_cli_reads_them(tmp_path: Path) -> None:
    """[profile x] in config, [x] in credentials, [default] in both; the environment's keys win."""
    config = (
        "[default]\nregion = eu-west-1\n"
        "[profile dev]\nregion = eu-north-1\nendpoint_url = http://127.0.0.1:9000\n"
        "[cfgkeys]\naws_access_key_id = IGNORED\naws_secret_access_key = ignored\n"
        "[profile cfgkeys]\naws_access_key_id = CFGKEY\naws_secret_access_key = cfgsecret\n"
        "[profile sso]\nsso_session = corp\n"
    )
    creds = (
        "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n"
        "[dev]\naws_access_key_id = DEVKEY\naws_secret_access_key = devsecret\naws_session_token = tok\n"
    )
    env = _aws_files(tmp_path / "home", config, creds)
    assert credentials.aws_settings(env) == {
        "access_key_id": "DEFKEY",
        "secret_access_key": "defsecret",
        "region": "eu-west-1",
    }
    assert credentials.aws_settings({**env, "AWS_PROFILE": "dev"}) == {
        "access_key_id": "DEVKEY",
        "secret_access_key": "devsecret",
        "session_token": "tok",
        "region": "eu-north-1",
        "endpoint": "http://127.0.0.1:9000",
    }
    # Keys in the config file's [profile NAME] count; a bare [NAME] there is not a profile.
    got = credentials.aws_settings({**env, "AWS_PROFILE": "cfgkeys"})
    assert (got["access_key_id"], got["secret_access_key"]) == ("CFGKEY", "cfgsecret")
    # The environment wins: its keys, region and endpoint are object_store's to read.
    assert (
        credentials.aws_settings(
            {
                **env,
                "AWS_PROFILE": "dev",
                "AWS_ACCESS_KEY_ID": "E",
                "AWS_SECRET_ACCESS_KEY": "e",
                "AWS_REGION": "r",
                "AWS_ENDPOINT_URL": "http://e",
            }
        )
        == {}
    )
    with pytest.raises(credentials.CredentialsError, match="'nope' is in neither"):
        credentials.aws_settings({**env, "AWS_PROFILE": "nope"})
    with pytest.raises(credentials.CredentialsError, match="sso_session, which ocifuse does not run"):
        credentials.aws_settings({**env, "AWS_PROFILE": "sso"})
    # AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE name the files; no files at all: nothing.
    moved = {
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(tmp_path / "home" / ".aws" / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "home" / ".aws" / "credentials"),
        "AWS_PROFILE": "dev",
    }
    assert credentials.aws_settings(moved)["access_key_id"] == "DEVKEY"
    assert credentials.aws_settings({"HOME": str(tmp_path / "nowhere")}) == {}


def test_credentials_is_a_mount_option(tmp_path: Path) -> None:
    opts = parse(["ro,credentials=/etc/ocifuse/creds"], fsname="x")
    assert opts.credentials == "/etc/ocifuse/creds"


# -- HTTP credentials against nginx --------------------------------------------------------------------


def test_basic_auth_from_a_credentials_file_and_netrc(
    web: Nginx, real_image: RealImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = web.url("basic/image.tar")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(LayoutOpenError, match=r"not authorized \(401\)"):
        open_layout(url, ViewOptions())
    creds = private(tmp_path / "creds", f"{USER}:{PASSWORD}\n")
    with open_layout(url, ViewOptions(remote=RemoteOptions(credentials=str(creds)))) as layout:
        assert layout.read_at("index.json", 0, 1 << 20) == (real_image.layout_dir / "index.json").read_bytes()
    private(creds, f"{USER}:wrong\n")
    with pytest.raises(LayoutOpenError, match="401"):
        open_layout(url, ViewOptions(remote=RemoteOptions(credentials=str(creds))))
    # ~/.netrc (here $NETRC) for the host, and from the command line, which has no secret.
    netrc = private(tmp_path / "netrc", f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    env = {**os.environ, "NETRC": str(netrc)}
    done = run_ocifuse("inspect", url, env=env)
    assert done.returncode == 0 and "v1" in done.stdout, done.stderr
    env["NETRC"] = str(tmp_path / "none")
    done = run_ocifuse("inspect", url, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "401" in done.stderr, done.stderr


def test_bearer_token_from_a_credentials_file(web: Nginx, tmp_path: Path) -> None:
    url = web.url("bearer/image.tar")
    creds = private(tmp_path / "creds", f"Bearer {TOKEN}\n")
    with open_layout(url, ViewOptions(remote=RemoteOptions(credentials=str(creds)))) as layout:
        assert "index.json" in set(layout.file_names())
    private(creds, "Bearer not-the-token\n")
    with pytest.raises(LayoutOpenError, match="401"):
        open_layout(url, ViewOptions(remote=RemoteOptions(credentials=str(creds))))


def test_a_credentials_file_readable_by_others_refuses_the_mount(web: Nginx, tmp_path: Path) -> None:
    creds = private(tmp_path / "creds", f"{USER}:{PASSWORD}\n")
    creds.chmod(0o644)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_ocifuse("mount", "-o", f"credentials={creds}", web.url("basic/image.tar"), mnt)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "readable by others" in done.stderr
    assert not is_mounted(mnt)


@pytest.mark.fuse
def test_mount_with_a_credentials_file(web: Nginx, real_image: RealImage, tmp_path: Path) -> None:
    """``-o credentials=FILE``: a background mount reads on with them (the forked daemon's own client)."""
    creds = private(tmp_path / "creds", f"{USER}:{PASSWORD}\n")
    mnt = tmp_path / "mnt"
    with background_mount(
        web.url("basic/image.tar"), mnt, options=[f"credentials={creds}"], args=["--no-cache"]
    ) as done:
        assert done.returncode == 0, done.stderr
        assert _files(mnt) == _files(real_image.layout_dir)
        for pid in daemon_pids(mnt):
            assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


# -- redirects --------------------------------------------------------------------------------------------


def test_redirects_are_followed_at_open_and_ranges_go_to_the_final_url(
    web: Nginx, real_image: RealImage
) -> None:
    before = len(requests_for(web))
    with open_layout(web.url("hop/1"), ViewOptions()) as layout:
        local = _files(real_image.layout_dir)
        for path, data in local.items():
            assert layout.read_at(path, 0, len(data) + 1) == data
    seen = requests_for(web)[before:]
    assert ("HEAD", "/hop/1", 302) in seen and ("HEAD", "/hop/2", 301) in seen
    gets = [(path, status) for method, path, status in seen if method == "GET"]
    assert gets and all(g == ("/image.tar", 206) for g in gets), gets  # never through the redirects again


def test_too_many_redirects_is_one_line(web: Nginx) -> None:
    done = run_ocifuse("inspect", web.url("loop"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"more than {remote.MAX_REDIRECTS} redirects" in done.stderr
    assert sum(1 for _, path, _ in requests_for(web) if path == "/loop") >= remote.MAX_REDIRECTS


def test_a_redirect_from_https_to_http_is_refused(
    web: Nginx, ca: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """nginx on https answers 302 to an http URL: refused at open with one line, nothing mounted."""
    url = web.https_url("down")
    with pytest.raises(LayoutOpenError, match="redirected from https to http, refused"):
        open_layout(url, ViewOptions(remote=RemoteOptions(cafile=str(ca[0]))))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_ocifuse("mount", "-o", f"cafile={ca[0]}", url, mnt)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "https to http" in done.stderr and not is_mounted(mnt)
    # The same path over http redirects within http: followed.
    with open_layout(web.url("down"), ViewOptions()) as layout:
        assert "index.json" in set(layout.file_names())


def test_credentials_file_not_sent_to_another_host(
    web: Nginx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """127.0.0.1 redirects to localhost: the credentials file stays behind; localhost's netrc entry counts."""
    creds = private(tmp_path / "creds", f"{USER}:{PASSWORD}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    options = ViewOptions(remote=RemoteOptions(credentials=str(creds)))
    with pytest.raises(LayoutOpenError, match="401"):
        open_layout(web.url("away/basic"), options)
    netrc = private(tmp_path / "netrc", f"machine localhost login {USER} password {PASSWORD}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    with open_layout(web.url("away/basic"), options) as layout:
        assert "index.json" in set(layout.file_names())


# -- S3 credentials the AWS CLI's way ---------------------------------------------------------------------


def _moto_auth(s3: S3, count: str) -> None:
    """moto's server checks keys and policies after ``count`` more unauthenticated requests ("inf": never)."""
    request = urllib.request.Request(
        s3.endpoint + "/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def _moto_keys(s3: S3) -> tuple[str, str]:
    """An IAM user allowed s3:*, and its access key, made before moto's authentication starts."""
    import boto3

    _moto_auth(s3, "3")  # the three IAM calls below; then every request is checked
    iam = boto3.client(
        "iam",
        endpoint_url=s3.endpoint,
        aws_access_key_id="bootstrap-key-id",
        aws_secret_access_key="bootstrap-secret-key",
        region_name="us-east-1",
    )
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.fuse
def test_s3_profile_from_aws_files_mounts_and_a_wrong_key_is_one_line(
    www: Path, real_image: RealImage, tmp_path: Path
) -> None:
    """A profile in a temp HOME's ~/.aws files (keys, region, endpoint_url) mounts; a wrong key: one line."""
    with s3_server() as s3:
        url = s3.put("images", "image.tar", www / "image.tar")
        try:
            key_id, secret = _moto_keys(s3)
            home = tmp_path / "home"
            _aws_files(
                home,
                f"[profile ci]\nregion = us-east-1\nendpoint_url = {s3.endpoint}\n"
                f"[profile wrong]\nendpoint_url = {s3.endpoint}\n",
                f"[ci]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
                f"[wrong]\naws_access_key_id = {key_id}\naws_secret_access_key = not-{secret}\n",
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(HOME=str(home), AWS_PROFILE="ci")
            with mounted(url, tmp_path / "mnt", args=["--no-cache"], env=env) as m:
                assert _files(m.mountpoint) == _files(real_image.layout_dir)
            env["AWS_PROFILE"] = "wrong"
            done = run_ocifuse("inspect", url, env=env)
            assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
            assert "permission denied (403)" in done.stderr and secret not in done.stderr
            env["AWS_PROFILE"] = "missing"
            done = run_ocifuse("inspect", url, env=env)
            assert done.returncode == 2 and "'missing' is in neither" in done.stderr, done.stderr
        finally:
            _moto_auth(s3, "inf")


# -- secrets never shown --------------------------------------------------------------------------------


SECRETS = ("hunter2", "sig-0ff1ce", "someone")


def _secret_url(server: Nginx, name: str) -> str:
    return server.url(name).replace("http://", "http://someone:hunter2@") + "?X-Amz-Signature=sig-0ff1ce"


def _assert_clean(text: str | bytes, where: str) -> None:
    data = text if isinstance(text, str) else text.decode(errors="replace")
    for secret in SECRETS:
        assert secret not in data, f"{secret!r} shown in {where}: {data[:2000]}"


def test_hide_url_secrets_rewrites_the_command_line(tmp_path: Path) -> None:
    """What ps shows of a process given a URL with secrets: the URL without them, the rest as it was."""
    script = (
        "import sys; from ocifuse import cli; hidden = cli.hide_url_secrets(); "
        "print(hidden, sys.argv[1]); sys.stdout.flush(); sys.stdin.read()"
    )
    url = "https://someone:hunter2@h:8443/x.tar?X-Amz-Signature=sig-0ff1ce"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, url, "/mnt/x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == f"True {url}\n"  # Python's own argv is unchanged
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert argv[-2:] == [b"https://h:8443/x.tar", b"/mnt/x"]
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(proc.pid)], capture_output=True, text=True)
        assert "https://h:8443/x.tar /mnt/x" in ps.stdout
        _assert_clean(ps.stdout, "ps")
    finally:
        proc.communicate("")


@pytest.mark.fuse
def test_secrets_never_shown(web: Nginx, real_image: RealImage, tmp_path: Path) -> None:
    """Userinfo and a presigned query: not in /proc/mounts, ps, logs (debug), inspect, fsck or the cache."""
    cache = tmp_path / "cache"
    url = _secret_url(web, "image.tar")
    # A foreground mount with debug logging, and a background one (the forked daemon).
    with mounted(url, tmp_path / "mnt", args=["--cache", str(cache), "--debug"]) as m:
        assert _files(m.mountpoint) == _files(real_image.layout_dir)
        assert mount_source(m.mountpoint) == web.url("image.tar")
        _assert_clean(Path("/proc/mounts").read_text(), "/proc/mounts")
        _assert_clean(Path(f"/proc/{m.pid}/cmdline").read_bytes(), "the daemon's command line")
        ps = subprocess.run(["ps", "-ww", "-eo", "args="], capture_output=True, text=True, check=True).stdout
        _assert_clean(ps, "ps")
        log = m.stderr()
        assert "DEBUG" in log, log  # every request logged
        _assert_clean(log, "the daemon's log")
    mnt = tmp_path / "bg"
    with background_mount(url, mnt, args=["--cache", str(cache)]) as done:
        assert done.returncode == 0, done.stderr
        (pid,) = daemon_pids(mnt)
        _assert_clean(Path(f"/proc/{pid}/cmdline").read_bytes(), "the background daemon's command line")
        _assert_clean(Path("/proc/mounts").read_text(), "/proc/mounts")
    for command in (["inspect"], ["inspect", "--json"], ["fsck"], ["fsck", "--json"]):
        done = run_ocifuse(*command, url, "--cache", str(cache))
        assert done.returncode == 0, done.stderr
        _assert_clean(done.stdout + done.stderr, " ".join(command))
    for command in (["inspect", "--json"], ["fsck"]):  # and their errors
        done = run_ocifuse(*command, _secret_url(web, "missing.tar"))
        assert done.returncode == 2
        _assert_clean(done.stdout + done.stderr, " ".join(command) + " of a missing URL")
    done = run_ocifuse("cache", "list", "--cache", str(cache))
    _assert_clean(done.stdout + done.stderr, "cache list")
    kept = [p for p in cache.rglob("*") if p.is_file()]
    assert {p.name.partition(".")[0] for p in kept} >= {"table", "remote-block"}  # tables and blocks
    for p in kept:
        _assert_clean(p.name, "a cache file name")
        _assert_clean(p.read_bytes(), f"cache file {p.name}")


# -- RemoteSource: close and the disk budget --------------------------------------------------------------


def test_no_read_ahead_after_close(web: Nginx) -> None:
    """A read that claimed read-ahead, then a close before the read-ahead starts: nothing fetched after."""
    obj = remote.RemoteObject(web.url("image.tar"))
    src = obj.whole
    start_ahead = src._start_ahead
    started: list[int] = []

    def close_first(parts: list[list[int]]) -> None:
        started.append(len(parts))
        src.close()  # another thread's close, between the claim and the start
        start_ahead(parts)

    src.pread(0, 4096)  # a stream starts at 0, in the block fetched at open
    fetched = src.fetched
    src._start_ahead = close_first  # type: ignore[method-assign]
    before = len(requests_for(web))
    # Sequential, in memory: claims a read-ahead window, which the close then cancels.
    assert len(src.pread(4096, 4096)) == 4096
    assert started and started[0] > 0, "the read claimed no read-ahead"
    assert src._pool is None
    assert requests_for(web)[before:] == [] and src.fetched == fetched


def test_the_disk_budget_holds_with_concurrent_fetchers(
    web: Nginx, real_image: RealImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks written to the index cache per open stay within DISK_MAX, readers in several threads."""
    monkeypatch.setattr(remote, "DISK_MAX", 4 * remote.BLOCK)
    cache = IndexCache(str(tmp_path / "cache"))
    obj = remote.RemoteObject(web.url("image.tar"), cache=cache)
    try:
        src = obj.whole
        size = obj.size
        blocks = (size + remote.BLOCK - 1) // remote.BLOCK

        def read(first: int) -> None:
            for b in range(first, blocks, 4):
                src.pread(b * remote.BLOCK, 1)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert src.fetched >= 8 * remote.BLOCK  # more was fetched than the budget allows to keep
    finally:
        obj.close()
    kept = sum(1 for b in range(blocks) if src._load_block(b) is not None)
    assert 0 < kept <= 4, kept
