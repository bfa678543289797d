"""A virtual camera (v4l2loopback) output: OBS and video-call apps see the channel as a webcam.

Needs the optional `pyvirtualcam` package and a v4l2loopback device; where either is
missing the output says exactly what is missing, once, and stays out of the way.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import numpy as np

from broadcaster.backoff import Backoff
from broadcaster.metrics import Metrics
from broadcaster.packets import EncodedPacket

log = logging.getLogger(__name__)

SYSFS = Path("/sys/class/video4linux")


def loopback_devices(sysfs: Path = SYSFS) -> list[str]:
    """The /dev/videoN nodes that are v4l2loopback devices."""
    found = []
    for entry in sorted(sysfs.glob("video*")) if sysfs.is_dir() else []:
        try:
            name = (entry / "name").read_text().strip().lower()
        except OSError:
            continue
        if "loopback" in name or "dummy" in name or "virtual" in name:
            found.append(f"/dev/{entry.name}")
    return found


def availability(device: str | None, sysfs: Path = SYSFS) -> tuple[str | None, str]:
    """(device to use, "") or (None, why not)."""
    try:
        import pyvirtualcam  # noqa: F401
    except ImportError:
        return None, "pyvirtualcam is not installed (pip install 'promptcast[virtualcam]')"
    devices = loopback_devices(sysfs)
    if device:
        if device not in devices:
            return None, f"{device} is not a v4l2loopback device (have: {', '.join(devices) or 'none'})"
        return device, ""
    if not devices:
        return None, ("no v4l2loopback device "
                      "(sudo modprobe v4l2loopback exclusive_caps=1 card_label=promptcast)")
    return devices[0], ""


class VirtualCamOutput:
    """Sends raw frames to a v4l2loopback device from its own thread; never blocks the clock."""

    def __init__(self, name: str, device: str | None, width: int, height: int, fps: float, metrics: Metrics,
                 sysfs: Path = SYSFS):
        self.name = name
        self.width, self.height, self.fps = width, height, fps
        self.metrics = metrics
        self.device, self.reason = availability(device, sysfs)
        self.connected = False
        self.reconnects = 0
        self.frames = 0
        self.last_error = ""
        self._latest: np.ndarray | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        metrics.output_connected.labels(name).set(0)

    def submit(self, packet: EncodedPacket) -> None:
        """Encoded packets are not used: a camera takes raw frames (see `submit_frame`)."""

    def submit_frame(self, frame: np.ndarray) -> None:
        """Keep the newest I420 frame (as the ring has it); the camera thread takes it at its own rate."""
        if self.device is not None:
            with self._lock:
                self._latest = frame.copy()

    async def run(self) -> None:
        """Run the camera thread until `close()`; a clean no-op when no device is usable."""
        if self.device is None:
            log.warning("output %s: virtual camera unavailable: %s", self.name, self.reason)
            return
        await asyncio.to_thread(self._loop)

    def _loop(self) -> None:
        import pyvirtualcam

        backoff = Backoff(1.0, 30.0)
        while not self._stop.is_set():
            try:
                with pyvirtualcam.Camera(self.width, self.height, self.fps, device=self.device,
                                         fmt=pyvirtualcam.PixelFormat.I420) as camera:
                    self._set_connected(True)
                    log.info("output %s: virtual camera on %s", self.name, camera.device)
                    backoff.reset()
                    while not self._stop.is_set():
                        with self._lock:
                            frame = self._latest
                        if frame is not None:
                            camera.send(frame)
                            self.frames += 1
                        camera.sleep_until_next_frame()
            except Exception as exc:  # the device went away or refused us: retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._set_connected(False)
                self.reconnects += 1
                self.metrics.output_reconnects.labels(self.name).inc()
                delay = backoff.next_delay()
                log.warning("output %s: virtual camera failed (%s); retrying in %.1fs", self.name,
                            self.last_error, delay)
                time.sleep(delay)
        self._set_connected(False)

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.metrics.output_connected.labels(self.name).set(1 if value else 0)

    def status(self) -> dict:
        """Status for /healthz."""
        return {"kind": "virtualcam", "destination": self.device or "", "available": self.device is not None,
                "reason": self.reason, "connected": self.connected, "frames": self.frames,
                "reconnects": self.reconnects, "last_error": self.last_error}

    async def close(self) -> None:
        """Stop the camera thread."""
        self._stop.set()
