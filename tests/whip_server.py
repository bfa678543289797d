"""A local WHIP ingest for tests: aiohttp + aiortc, answers offers and counts what arrives.

Run as a child process (`python -m tests.whip_server --port N [--token T]`) so a test can
SIGKILL it (no goodbye: no DTLS close, no RTCP BYE, like a crashed server) and start it
again on the same port. `GET /stats` reports what it received:

    {"sessions": 1, "active": 1, "deleted": 0, "video_frames": 83, "audio_frames": 250,
     "video_codecs": ["video/H264"], "audio_codecs": ["audio/opus"], "unauthorised": 0}

Video frames are counted after aiortc decoded them, so the count proves the H.264 plays.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.servers import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]


def make_app(token: str | None):
    """The ingest's aiohttp application (imported lazily: the test process only needs WhipServer)."""
    from aiohttp import web
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    stats: dict[str, Any] = {"sessions": 0, "active": 0, "deleted": 0, "video_frames": 0,
                             "audio_frames": 0, "video_codecs": [], "audio_codecs": [], "unauthorised": 0}
    sessions: dict[str, RTCPeerConnection] = {}
    tasks: set[asyncio.Task] = set()

    def authorised(request: web.Request) -> bool:
        return token is None or request.headers.get("Authorization") == f"Bearer {token}"

    async def consume(track) -> None:
        key = f"{track.kind}_frames"
        try:
            while True:
                await track.recv()
                stats[key] += 1
        except MediaStreamError:
            return

    async def post(request: web.Request) -> web.Response:
        if not authorised(request):
            stats["unauthorised"] += 1
            return web.Response(status=401, text="bad token")
        if request.content_type != "application/sdp":
            return web.Response(status=415, text="application/sdp please")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session = uuid.uuid4().hex

        @pc.on("track")
        def on_track(track) -> None:
            task = asyncio.ensure_future(consume(track))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and sessions.pop(session, None) is not None:
                stats["active"] = len(sessions)
                await pc.close()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=await request.text(), type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        for transceiver in pc.getTransceivers():
            # What was negotiated (aiortc has no public accessor for it).
            names = {c.mimeType for c in transceiver._codecs if "rtx" not in c.mimeType}
            if names:
                stats[f"{transceiver.kind}_codecs"] = sorted(names)
        sessions[session] = pc
        stats["sessions"] += 1
        stats["active"] = len(sessions)
        return web.Response(status=201, body=pc.localDescription.sdp.encode(),
                            headers={"Content-Type": "application/sdp", "Location": f"/whip/{session}"})

    async def delete(request: web.Request) -> web.Response:
        if not authorised(request):
            return web.Response(status=401, text="bad token")
        pc = sessions.pop(request.match_info["id"], None)
        if pc is None:
            return web.Response(status=404, text="no such session")
        stats["deleted"] += 1
        stats["active"] = len(sessions)
        await pc.close()
        return web.Response(status=200)

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.router.add_post("/whip", post)
    app.router.add_delete("/whip/{id}", delete)
    app.router.add_get("/stats", get_stats)
    return app


def main() -> None:
    """Child-process entry point."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()

    import aioice.ice
    from aiohttp import web

    # aioice leaves 127.0.0.1 out of its host candidates; this ingest lives on loopback only.
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []
    web.run_app(make_app(args.token), host="127.0.0.1", port=args.port, print=None,
                reuse_address=True, handle_signals=True)


class WhipServer:
    """A `tests.whip_server` child process on a fixed free port; kill() and restart() keep the port."""

    def __init__(self, token: str | None = None, log_path: Path | None = None):
        self.port = free_port()
        self.token = token
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The WHIP endpoint."""
        return f"http://127.0.0.1:{self.port}/whip"

    def start(self, timeout: float = 15) -> WhipServer:
        """Start and wait until it answers."""
        args = [sys.executable, "-m", "tests.whip_server", "--port", str(self.port)]
        if self.token:
            args += ["--token", self.token]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(REPO)})
        if out is not subprocess.DEVNULL:
            out.close()
        wait_until(self._up, timeout, message="WHIP server did not start")
        return self

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"WHIP server exited with {self.process.returncode}")
        try:
            self.stats()
            return True
        except OSError:
            return False

    def stats(self) -> dict[str, Any]:
        """What it received so far (this process's life only)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=2) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        """SIGKILL: the ingest vanishes without a word."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def restart(self) -> WhipServer:
        """Start again on the same port."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """SIGTERM (clean), then SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> WhipServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
