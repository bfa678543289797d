"""`promptcast prompt --config FILE`: the control API's URL and token come from the channel file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.channel import Channel, small_channel
from tests.servers import wait_until

pytestmark = pytest.mark.servers
HEAVY = ("torch", "pydantic", "numpy", "av", "aiohttp", "asyncio", "broadcaster.settings", "engine")


def _client(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROMPTCAST_API_TOKEN"}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "broadcaster", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_prompt_with_config_finds_port_and_generated_token_and_imports_nothing_heavy(tmp_path):
    # The channel file names a free port and an absolute token file; with no token in the
    # environment the service generates one there.
    with Channel(tmp_path, small_channel(tmp_path, []), env={"PROMPTCAST_API_TOKEN": ""}) as channel:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        done = _client("prompt", "a green forest at dawn", "--config", str(channel.config_path),
                       cwd=elsewhere)
        token = (tmp_path / "token").read_text().strip()
        state = wait_until(lambda: json.loads(channel.get("/api/state", token=token)), 10)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["accepted"] is True
    assert state["prompt_requested"] == "a green forest at dawn"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time")}
    assert not {name for name in imported if name.split(".")[0] in HEAVY or name in HEAVY}


def test_prompt_without_a_token_anywhere_says_where_one_comes_from(tmp_path):
    path = tmp_path / "channel.yaml"
    path.write_text("server: {port: 1, token_file: ./nowhere/token}\n")
    done = _client("prompt", "x", "--config", str(path), cwd=tmp_path)

    assert done.returncode == 1
    assert "server.token_file" in done.stderr
