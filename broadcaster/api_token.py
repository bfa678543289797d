"""The control API's bearer token: from the environment or a file, never empty, written atomically."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from broadcaster.settings import Settings

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16


class TokenError(ValueError):
    """The control-API token cannot be used; the service refuses to start (exit 2)."""


def _checked_token(token: str, origin: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        # An empty token would let `Authorization: Bearer ` through: refuse rather than run open.
        raise TokenError(f"the control API token from {origin} has {len(token)} characters; "
                         f"at least {MIN_TOKEN_CHARS} are needed")
    return token


def api_token(settings: Settings) -> str:
    """PROMPTCAST_API_TOKEN, else a token generated once and kept in `server.token_file` (mode 600)."""
    # Empty counts as unset (compose passes `${X:-}`); anything else must be a real token.
    if os.environ.get("PROMPTCAST_API_TOKEN", ""):
        return _checked_token(os.environ["PROMPTCAST_API_TOKEN"], "PROMPTCAST_API_TOKEN")
    path = Path(settings.server.token_file)
    if path.exists():
        return _checked_token(path.read_text(errors="replace"), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    write_private_file(path, token + "\n")
    log.info("control API token generated and stored in %s (set PROMPTCAST_API_TOKEN to choose one)", path)
    return token


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0600: a crash leaves the old file or none, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
