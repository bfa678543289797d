"""Run a real `promptcast run` process for integration tests and read its state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.servers import free_port, wait_until


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class Channel:
    """A `promptcast run --config FILE` child process on free ports."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.tmp_path = Path(tmp_path)
        self.port = free_port()
        config = dict(config)
        config.setdefault("server", {})
        config["server"] = {"port": self.port, "token_file": str(self.tmp_path / "token"), **config["server"]}
        self.config = config
        self.config_path = self.tmp_path / "channel.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.tmp_path / "promptcast.log"
        self.env = {**os.environ, "PROMPTCAST_API_TOKEN": "test-token-0123456789", **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Channel:
        """Start and wait until /healthz answers with a ticking clock."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broadcaster", "run", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp_path,
        )
        try:
            wait_until(lambda: self._healthy(), timeout)
        except AssertionError as failure:
            self.stop()  # never leave a half-started channel running
            raise AssertionError(f"channel never healthy: {failure}\n{self.logs()}") from None
        return self

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"promptcast exited with {self.process.returncode}:\n{self.logs()}")
        try:
            return self.health()["status"] in ("ok", "degraded")  # 200: frames flow
        except OSError:
            return False

    def url(self, path: str) -> str:
        """A URL on the channel's HTTP server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 5, token: str | None = None) -> bytes:
        """GET a path (any status) and return the body."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            request = urllib.request.Request(self.url(path), headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            return exc.read()

    def health(self, timeout: float = 5) -> dict[str, Any]:
        """The /healthz document."""
        return json.loads(self.get("/healthz", timeout))

    def metrics(self) -> dict[str, float]:
        """The /metrics values."""
        return parse_metrics(self.get("/metrics").decode())

    def post_prompt(self, prompt: str) -> dict[str, Any]:
        """Switch the prompt through the control API."""
        request = urllib.request.Request(
            self.url("/api/prompt"), data=json.dumps({"prompt": prompt}).encode(), method="POST",
            headers={"Authorization": "Bearer test-token-0123456789", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def logs(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"promptcast ignored SIGTERM for {timeout}s:\n{self.logs()}") from None
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Channel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def frames_output(channel: Channel) -> float:
    """The output frame counter."""
    return channel.metrics().get("promptcast_frames_output_total", 0.0)


def small_channel(tmp_path: Path, outputs: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A config small enough for a 2-core CI machine: 320x192 at 16 fps, ultrafast, 600 kbit/s."""
    config = {
        "channel": "test",
        "engine": {"width": 320, "height": 192, "fps": 16, "prompt": "a red fire in the night"},
        "encoder": {"preset": "ultrafast", "video_bitrate_kbps": 600, "threads": 1},
        "outputs": outputs,
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def since(start: float) -> float:
    """Seconds since a time.monotonic() value."""
    return time.monotonic() - start
