"""A TCP proxy on 127.0.0.1 for the remote bench: counts the bytes each way, and can add latency.

It stands in front of a server on 127.0.0.1 (nginx, moto's S3 server) and forwards every connection
to it, byte for byte. It counts what the server sent (moto logs no sizes; nginx's access log does,
but the proxy counts both servers alike), and with ``delay`` it holds every chunk that long in each
direction before forwarding it: a round trip costs ``2 * delay`` more, throughput is not capped (a
chunk waits for its own time, not for the chunks before it). That is netem's delay, in user space:
``tc qdisc ... netem`` needs the sch_netem kernel module, which this machine does not have (checked
in a private network namespace: "Specified qdisc kind is unknown"). The TCP handshake itself is
not delayed (the kernel completes it before the proxy sees the connection).

Standard library only; threads (a connection's two directions, and a writer per direction when
delaying), stopped with the proxy.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator

HOST = "127.0.0.1"
CHUNK = 256 * 1024


class Proxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``target``; ``served`` counts the target's bytes."""

    def __init__(self, target: int, delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.served = 0  # bytes from the server to its clients
        self.received = 0  # bytes from the clients to the server
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._accepting = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    def url(self, path: str = "") -> str:
        """``http://127.0.0.1:PORT/PATH`` through the proxy."""
        return f"http://{HOST}:{self.port}/{path}"

    def counts(self) -> tuple[int, int, int]:
        """(bytes served, bytes received, connections) so far."""
        with self._lock:
            return self.served, self.received, self.connections

    def start(self) -> None:
        self._accepting.start()

    def stop(self) -> None:
        """Stop accepting, and cut every connection."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepting.join(5)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((HOST, self.target))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._direction, args=(src, dst, up), daemon=True).start()

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            if up:
                self.received += n
            else:
                self.served += n

    def _direction(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        """Copy ``src`` to ``dst`` until end of stream (each chunk held ``delay`` with a delay)."""
        if self.delay <= 0:
            with contextlib.suppress(OSError):
                while data := src.recv(CHUNK):
                    dst.sendall(data)
                    self._count(up, len(data))
            _half_close(dst)
            return
        held: queue.Queue[tuple[float, bytes]] = queue.Queue()
        writer = threading.Thread(target=self._delayed, args=(held, dst, up), daemon=True)
        writer.start()
        with contextlib.suppress(OSError):
            while data := src.recv(CHUNK):
                held.put((time.monotonic() + self.delay, data))
        held.put((time.monotonic() + self.delay, b""))  # end of stream, after the data before it

    def _delayed(self, held: queue.Queue[tuple[float, bytes]], dst: socket.socket, up: bool) -> None:
        while True:
            due, data = held.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                _half_close(dst)
                return
            try:
                dst.sendall(data)
            except OSError:
                return
            self._count(up, len(data))


def _half_close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def proxy(target: int, delay: float = 0.0) -> Iterator[Proxy]:
    """A proxy to 127.0.0.1:``target`` (started), stopped on the way out whatever happens."""
    p = Proxy(target, delay)
    p.start()
    try:
        yield p
    finally:
        p.stop()
