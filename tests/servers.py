"""Real servers on 127.0.0.1 for the remote tests: nginx, moto's S3 server, python3 -m http.server.

Each is started by the test that needs it and always stopped (context managers); nothing but the
loopback interface is used. The remote bench (bench/remote.py) starts the same servers from here:
nothing of pytest is imported unless a server is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 15.0


def _missing(message: str) -> None:
    """A server's program is not installed: skip the test (fail with ``CI=true``); in the bench, stop."""
    from mounting import skip_or_fail  # imports pytest: only when something is missing

    skip_or_fail(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (now)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, what: str = "server") -> None:
    """Wait until something accepts connections on ``port`` (fail if ``proc`` exits first)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not listening on {port} after {START_TIMEOUT:.0f}s")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass(frozen=True, slots=True)
class Served:
    """One request of nginx's access log: method, status, body bytes, and bytes sent with headers."""

    method: str
    status: int
    body_bytes: int
    bytes_sent: int


_NGINX_CONF = """\
daemon off;
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  log_format bytes '$remote_addr [$time_local] "$request" $status $body_bytes_sent $bytes_sent';
  access_log {d}/access.log bytes;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  types {{ }}
  default_type application/octet-stream;
  server {{ listen {host}:{port}; root {www}; {extra} }}
  {tls}
}}
"""
_TLS_SERVER = (
    "server {{ listen {host}:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key}; root {www};"
    " {extra} }}"
)


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "cert.pem", directory / "key.pem", directory / "cert.csr"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ocifuse test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


class Nginx:
    """An nginx of the test's own (``nginx -p DIR -c CONF``, ``daemon off``) serving ``www`` on a port."""

    def __init__(
        self, directory: Path, www: Path, tls: tuple[Path, Path] | None = None, extra: str = ""
    ) -> None:
        """``extra``: nginx directives added to each server block (``locations`` with auth, redirects)."""
        if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
            _missing("nginx is not installed (apt-get install nginx; .ci/setup.sh test does)")
        self.directory = directory
        self.www = www
        self.port = free_port()
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        www.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "nginx.conf"
        # As root, nginx's worker would be "nobody", who cannot enter pytest's private temp directories.
        user = "user root root;" if os.geteuid() == 0 else ""
        # With ``tls`` (cert, key): https on a second port as well.
        self.tls_port = free_port() if tls else 0
        # ``{port}`` and ``{tls_port}`` in ``extra`` name the server's own ports (for redirects).
        extra = extra.replace("{port}", str(self.port)).replace("{tls_port}", str(self.tls_port))
        server = (
            _TLS_SERVER.format(host=HOST, port=self.tls_port, cert=tls[0], key=tls[1], www=www, extra=extra)
            if tls
            else ""
        )
        self.conf.write_text(
            _NGINX_CONF.format(
                d=directory, host=HOST, port=self.port, www=www, user=user, tls=server, extra=extra
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.port}/{name}"

    def https_url(self, name: str) -> str:
        return f"https://{HOST}:{self.tls_port}/{name}"

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [nginx, "-e", str(self.directory / "error.log"), "-p", str(self.directory), "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.proc, "nginx")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def served(self) -> list[Served]:
        """Every request nginx has answered so far, in order, from its access log."""
        log = self.directory / "access.log"
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            fields = line.split('"')  # address [time] "request" status body_bytes_sent bytes_sent
            if len(fields) == 3 and len(counts := fields[2].split()) == 3 and all(map(str.isdigit, counts)):
                out.append(Served(fields[1].split(" ", 1)[0], int(counts[0]), int(counts[1]), int(counts[2])))
        return out

    def served_bytes(self) -> int:
        """Body bytes nginx has sent so far (headers not counted: a HEAD is 0)."""
        return sum(s.body_bytes for s in self.served())


@contextlib.contextmanager
def nginx(
    directory: Path, www: Path, tls: tuple[Path, Path] | None = None, extra: str = ""
) -> Iterator[Nginx]:
    """An nginx serving ``www`` (and over https with ``tls``), stopped on the way out whatever happens."""
    server = Nginx(directory, www, tls, extra)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def http_server(www: Path) -> Iterator[str]:
    """``python3 -m http.server`` (which ignores Range: 200 and the whole body) on 127.0.0.1; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", HOST, "--directory", str(www), str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc, "http.server")
        yield f"http://{HOST}:{port}"
    finally:
        _stop(proc)


# Fake credentials for moto: any values are accepted. Long enough for stores that check (14+).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-0123456789",
    "AWS_REGION": "us-east-1",
}


class S3:
    """moto's ThreadedMotoServer on 127.0.0.1 (in this process) and a boto3 client of it."""

    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            _missing("moto[server] is not installed (pip install -e '.[test]')")
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
        self.endpoint = f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """An environment for an ocifuse subprocess that reaches this server as AWS tools would."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**env, **S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def use_in(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Reach this server from this process as AWS tools would (undone with ``monkeypatch``)."""
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(name)
        for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}.items():
            monkeypatch.setenv(name, value)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def put(self, bucket: str, key: str, path: Path) -> str:
        """Upload ``path`` as s3://bucket/key (the bucket made if missing); its URL."""
        client = self.client()
        with contextlib.suppress(Exception):
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{key}"


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """moto's S3 server, stopped on the way out."""
    s3 = S3()
    s3.server.start()
    try:
        wait_listening(s3.port, None, "moto")
        yield s3
    finally:
        s3.server.stop()
