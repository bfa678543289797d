"""The virtual camera output: device detection and a clean skip where there is none."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from broadcaster.metrics import Metrics
from broadcaster.outputs import virtualcam
from broadcaster.outputs.virtualcam import VirtualCamOutput, availability, loopback_devices


def _sysfs(tmp_path, **devices: str):
    for node, name in devices.items():
        (tmp_path / node).mkdir()
        (tmp_path / node / "name").write_text(name + "\n")
    return tmp_path


def test_only_loopback_nodes_count_as_virtual_cameras(tmp_path):
    sysfs = _sysfs(tmp_path, video0="Integrated Webcam", video10="promptcast", video11="Dummy video device")
    (tmp_path / "video10" / "name").write_text("v4l2 loopback promptcast\n")
    assert loopback_devices(sysfs) == ["/dev/video10", "/dev/video11"]


def test_missing_pyvirtualcam_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # import fails
    device, reason = availability(None, tmp_path)
    assert device is None and "pip install" in reason


def test_no_loopback_device_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", types.ModuleType("pyvirtualcam"))
    device, reason = availability(None, tmp_path)
    assert device is None and "modprobe v4l2loopback" in reason


def test_a_named_device_must_be_a_loopback_device(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", types.ModuleType("pyvirtualcam"))
    sysfs = _sysfs(tmp_path, video3="loopback cam")
    assert availability("/dev/video3", sysfs) == ("/dev/video3", "")
    device, reason = availability("/dev/video0", sysfs)
    assert device is None and "/dev/video3" in reason


async def test_an_unavailable_camera_skips_cleanly_and_reports_why(tmp_path):
    output = VirtualCamOutput("cam", None, 64, 48, 16, Metrics(), sysfs=tmp_path)
    output.submit_frame(np.zeros((72, 64), np.uint8))
    await output.run()  # returns at once instead of failing the service
    status = output.status()
    assert status["available"] is False and status["reason"]
    assert status["connected"] is False


@pytest.mark.skipif(not virtualcam.loopback_devices(), reason="no v4l2loopback device on this machine")
def test_a_real_loopback_device_is_found():
    assert virtualcam.loopback_devices()[0].startswith("/dev/video")


@pytest.mark.servers
def test_a_channel_with_an_unusable_virtual_camera_streams_on_and_says_why(tmp_path):
    from tests.channel import Channel, frames_output, small_channel
    from tests.servers import wait_until

    config = small_channel(tmp_path, [{"kind": "virtualcam", "name": "cam"},
                                      {"kind": "hls", "dir": str(tmp_path / "hls")}])
    with Channel(tmp_path, config) as channel:
        before = frames_output(channel)
        wait_until(lambda: frames_output(channel) > before + 16, 10)
        cam = channel.health()["outputs"]["cam"]
    expected_reason = virtualcam.availability(None)[1]
    assert cam["available"] is (expected_reason == "") and cam["reason"] == expected_reason
