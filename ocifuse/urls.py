"""URLs of remote archives, without the client: which texts are URLs, how one is shown, how it is reached.

Kept apart from remote.py (the client, its threads and obstore) so that every mount, local or not,
can tell a URL from a path and show one without secrets at no import cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("http", "https", "s3")
DEFAULT_TIMEOUT = 30.0
# The in-memory block cache's bound (LRU); at least one full read-ahead window fits.
MEMORY = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteOptions:
    """How remote objects are reached (mount ``-o timeout=``, ``-o cafile=``, ``-o credentials=``)."""

    timeout: float = DEFAULT_TIMEOUT  # seconds a read may take, retries included, before EIO
    cafile: str | None = None  # a PEM file of CA certificates trusted besides the system's
    credentials: str | None = None  # a file with USER:PASSWORD or Bearer TOKEN for http(s) (credentials.py)
    memory: int = MEMORY  # bytes of fetched blocks kept in memory


def is_url(text: str) -> bool:
    """True when ``text`` names a remote object (http://, https://, s3://) rather than a path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def redact(url: str) -> str:
    """``url`` without userinfo, query string or fragment: what may be shown, logged and stored."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
