"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import NginxRtmp, find_rtmp_module


@pytest.fixture
def nginx_rtmp(tmp_path: Path) -> Iterator[NginxRtmp]:
    """A started nginx-rtmp server on free ports, stopped after the test."""
    # Skip rather than fail on machines without the Debian packages (nginx, libnginx-mod-rtmp).
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed")
    try:
        find_rtmp_module()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with NginxRtmp(tmp_path) as server:
        yield server
