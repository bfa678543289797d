"""Keep secrets out of logs: stream keys, passwords and query tokens in URLs."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """The URL with its password, query and last path segment (an ingest's stream key) masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if not parts.scheme or not parts.netloc:
        return MASK
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    if parts.username:
        netloc = f"{parts.username}:{MASK}@{netloc}" if parts.password else f"{MASK}@{netloc}"
    path = parts.path
    head, _, last = path.rstrip("/").rpartition("/")
    if last:
        path = f"{head}/{MASK}"
    return urlunsplit((parts.scheme, netloc, path, MASK if parts.query else "", ""))
