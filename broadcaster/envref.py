"""`${VAR}` / `${VAR:-default}` references in channel files, resolved from the environment.

Kept apart from `broadcaster.settings` (pydantic) so the client commands can read a channel
file's server section without importing the whole settings model.
"""

from __future__ import annotations

import re
from typing import Any

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(node: Any, path: tuple[Any, ...], env: dict[str, str], problems: list) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; a missing variable is a problem."""
    if isinstance(node, dict):
        return {k: expand_env(v, (*path, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, (*path, i), env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append((path, f"environment variable {name} is not set"))
        return ""

    return ENV_REF.sub(substitute, node)
