"""`promptcast bench switch`: how long a prompt takes from the control API to a player, on the wire.

Runs the real service (`promptcast run`, preview engine) pushing RTMP to a private nginx-rtmp (or
writing HLS), reads the stream back with libavformat (what OBS's Media Source uses), and makes N
prompt switches through the control API. Each frame carries its prompt sequence number and its
encode time in an SEI message (`broadcaster/sei.py`), so the reader knows the first frame of each
switch without looking at pixels. Per switch:

- API call -> decision: the POST until the switch is handed to the engine (`decided_at`)
- decision -> encoder: until the first frame of the new prompt is encoded (`encoded_at`)
- encoder -> read back: until the reader holds that frame (demuxed, before decoding)
- total: API call -> read back
"""

from __future__ import annotations

import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from broadcaster.bench import machine
from broadcaster.nginx_rtmp import NginxRtmp, free_port, wait_until
from broadcaster.readback import Reader

# Colour words change the preview's palette, so each switch is also visible to a person watching.
_LOOKS = ("deep blue ocean", "red fire storm", "green forest", "purple galaxy", "golden desert",
          "neon city at night", "white snow", "orange sunset")


@dataclass(frozen=True)
class Switch:
    """One measured switch (seconds)."""

    api_to_decision: float
    decision_to_encoder: float
    encoder_to_readback: float
    total: float
    encoder_to_shown: float  # to the moment a real-time player shows it (`ReadFrame.shown_at`)
    total_shown: float


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def channel_config(port: int, token_file: Path, work: Path, rtmp_url: str | None, hls: bool,
                   segment_seconds: float, base: dict | None, switch_cut: bool | None = None,
                   list_size: int = 4) -> dict:
    """The benchmarked channel: the OBS preset's encoder by default, preview engine, manual steering."""
    config = dict(base or {})
    config["channel"] = config.get("channel", "bench-switch")
    engine = {"width": 832, "height": 480, "fps": 16, **config.get("engine", {})}
    config["engine"] = {**engine, "backend": "preview"}
    if switch_cut is not None:
        config["engine"]["switch_cut"] = switch_cut
    config["encoder"] = config.get("encoder") or {"keyframe_seconds": 1, "video_bitrate_kbps": 4000,
                                                  "preset": "superfast", "audio": "silent"}
    outputs: list[dict] = []
    if rtmp_url:
        outputs.append({"name": "bench-rtmp", "kind": "rtmp", "url": rtmp_url})
    if hls:
        outputs.append({"name": "bench-hls", "kind": "hls", "dir": str(work / "hls"),
                        "segment_seconds": segment_seconds, "list_size": list_size})
    config["outputs"] = outputs
    config["server"] = {"host": "127.0.0.1", "port": port, "token_file": str(token_file)}
    config["store"] = {"kind": "memory"}
    # Manual mode: a prompt from the API plays at once (queue mode would hold it for min_play_seconds).
    config["chat"] = {**config.get("chat", {}), "mode": "manual"}
    config["schedule"] = {}
    return config


class _Api:
    def __init__(self, port: int, token: str):
        self.base, self.token = f"http://127.0.0.1:{port}", token

    def call(self, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            self.base + path, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def _measure(api: _Api, reader: Reader, count: int, gap_s: float, log) -> tuple[list[Switch], int]:
    switches: list[Switch] = []
    missed = 0
    for n in range(1, count + 1):
        prompt = f"{_LOOKS[n % len(_LOOKS)]}, bench switch {n}"
        called = time.time()
        api.call("/api/prompt", {"prompt": prompt})

        def on_air(prompt=prompt):
            return next((s for s in api.call("/api/state").get("recent_switches", [])
                         if s["prompt"] == prompt), None)

        try:
            record = wait_until(on_air, 15, 0.05)
            wait_until(lambda: on_air()["applied_at"] is not None, 2, 0.05)
            record = on_air()
            seq = record["seq"]
            seen = wait_until(lambda seq=seq: reader.first_with_seq(seq) or reader.error, 15, 0.01)
        except AssertionError:
            missed += 1
            log(f"switch {n}: not seen within 15 s")
            continue
        if reader.error:
            raise RuntimeError(f"reading the stream back failed: {reader.error}")
        switch = Switch(record["decided_at"] - called, record["encoded_at"] - record["decided_at"],
                        seen.arrived_at - record["encoded_at"], seen.arrived_at - called,
                        seen.shown_at - record["encoded_at"], seen.shown_at - called)
        switches.append(switch)
        log(f"switch {n:2d}: api->decision {switch.api_to_decision:.3f}  decision->encoder "
            f"{switch.decision_to_encoder:.3f}  encoder->read back {switch.encoder_to_readback:.3f}  "
            f"total {switch.total:.3f} s (applied by the engine after "
            f"{record['applied_at'] - record['decided_at']:.3f} s)")
        # A pause that is not a whole number of blocks, so switches land all over the block cycle.
        time.sleep(gap_s + (n * 0.137) % 0.5)
    return switches, missed


def bench_switch(count: int = 24, hls: bool = False, segment_seconds: float = 1.0, config: str | None = None,
                 switch_cut: bool | None = None, list_size: int = 4, gap_s: float = 1.5,
                 verbose: bool = True) -> str:
    """Run the channel, switch `count` times through the API, report p50/p95/max of each leg."""
    def log(line: str) -> None:
        if verbose:
            print(line, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="promptcast-bench-switch-"))
    base = yaml.safe_load(Path(config).read_text()) if config else None
    load_before = os.getloadavg()
    nginx = None if hls else NginxRtmp(work).start()
    port, token = free_port(), secrets.token_urlsafe(24)
    rtmp_url = nginx.url("bench") if nginx else None
    settings = channel_config(port, work / "token", work, rtmp_url, hls, segment_seconds, base, switch_cut,
                              list_size)
    (work / "channel.yaml").write_text(yaml.safe_dump(settings))
    env = {**os.environ, "PROMPTCAST_API_TOKEN": token}
    log_file = open(work / "promptcast.log", "wb")  # noqa: SIM115 - closed below
    command = [sys.executable, "-m", "broadcaster", "run", "--config", str(work / "channel.yaml")]
    service = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=work)
    api = _Api(port, token)
    reader: Reader | None = None
    try:
        def up() -> bool:
            if service.poll() is not None:
                raise RuntimeError(f"promptcast exited with {service.returncode}; log in {work}")
            try:
                return api.call("/api/state")["engine"].get("state") == "running"
            except OSError:
                return False

        wait_until(up, 60, 0.2)
        if nginx:
            wait_until(lambda: nginx.is_publishing("bench"), 30, 0.1)
            reader = Reader(rtmp_url).start()
        else:
            playlist = f"http://127.0.0.1:{port}/hls/index.m3u8"
            # Join a running stream, as OBS does: the playlist already lists its segments.
            wait_until(lambda: _segments(work / "hls" / "index.m3u8") >= list_size, 60, 0.1)
            reader = Reader(playlist, options={}).start()  # libavformat's defaults, as OBS opens HLS
        wait_until(lambda: len(reader.snapshot()) >= 48 or reader.error, 60, 0.1)
        if reader.error:
            raise RuntimeError(f"cannot read the stream back: {reader.error}")
        counters = ("promptcast_frames_repeated_total", "promptcast_frames_output_total")
        before = [_metric(api.base, name) for name in counters]
        switches, missed = _measure(api, reader, count, gap_s, log)
        repeated, output = (_metric(api.base, name) - was for name, was in zip(counters, before, strict=True))
    finally:
        if reader is not None:
            reader.stop(2)
        service.terminate()
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
        log_file.close()
        if nginx:
            nginx.stop()
    load_after = os.getloadavg()
    if not switches:
        raise RuntimeError(f"no switch reached the reader; log in {work}")
    via = (f"HLS ({segment_seconds:g} s segments, {list_size} in the playlist) read from /hls/index.m3u8 "
           "with libavformat's defaults (as OBS's Media Source)" if hls
           else "RTMP to a local nginx-rtmp, read back from it")
    enc = settings["encoder"]
    lines = [
        f"bench switch: {len(switches)} switches ({missed} missed) through POST /api/prompt; preview engine "
        f"{settings['engine']['width']}x{settings['engine']['height']}@{settings['engine']['fps']} "
        f"({'switch_cut: dropped frames' if settings['engine'].get('switch_cut') else 'smooth switches'}), "
        f"x264 {enc.get('preset', 'default')}, keyframe {enc.get('keyframe_seconds', 2)} s; {via}",
        f"machine: {machine()}",
        f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.2f}' for x in load_after)}; while switching, frames repeated (engine late) "
        f"{repeated:.0f} of {output:.0f}",
        "",
    ]
    legs = (("API call -> decision", "api_to_decision"), ("decision -> encoder", "decision_to_encoder"),
            ("encoder -> read back", "encoder_to_readback"), ("total (API call -> read back)", "total"),
            ("encoder -> shown by a real-time player", "encoder_to_shown"),
            ("API call -> shown by a real-time player", "total_shown"))
    for name, field in legs:
        values = [getattr(s, field) for s in switches]
        lines.append(f"{name}: p50 {statistics.median(values):.3f} s, p95 {percentile(values, 0.95):.3f} s, "
                     f"max {max(values):.3f} s")
    return "\n".join(lines)


def _segments(playlist: Path) -> int:
    try:
        return playlist.read_text().count("#EXTINF")
    except OSError:
        return 0


def _metric(base: str, name: str) -> float:
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))
