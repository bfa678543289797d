"""The GPU host's self-check, service mode: engine mode, then the real channel on this host.

    scripts/gpu_check.sh            # picks this mode where PyAV and the service packages import

After `engine.gpu_check` it starts `promptcast run` with `backend: longlive`, `dtype: auto`
and the weights engine mode wrote, pushing RTMP to a local nginx-rtmp (when nginx and its
RTMP module are installed) and writing HLS; it makes prompt switches through the control
API, then reads back from the channel: the encoder it chose (NVENC or x264), engine
restarts (must be 0), switch latency on the server's clock, frames repeated by the output
clock, and the RTMP stream as ffprobe sees it. The same JSON and table, with these added.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from broadcaster.nginx_rtmp import NginxRtmp, free_port
from engine import gpu_check


def _get(url: str, token: str | None = None, data: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def service_check(weights: Path, size: str, device: str, switches: int, out: Path,
                  start_timeout_s: float = 1200.0) -> dict:
    """Run the channel on the written weights; return what it showed."""
    width, height = gpu_check.SIZES[size][3]
    work = Path(tempfile.mkdtemp(prefix="gpu-check-service-", dir=out))
    rtmp = None
    outputs = [{"kind": "hls", "dir": str(work / "hls")}]
    try:
        rtmp = NginxRtmp(work).start()
        outputs.append({"kind": "rtmp", "url": rtmp.url("gpu-check")})
    except (OSError, RuntimeError) as missing:  # no nginx, no RTMP module, or it did not come up
        print(f"service mode: RTMP skipped: {missing}")
    port, token = free_port(), secrets.token_hex(16)
    config = {"channel": "gpu-check", "server": {"host": "127.0.0.1", "port": port},
              "store": {"kind": "memory"},
              "engine": {"backend": "longlive", "weights_dir": str(weights.resolve()), "dtype": "auto",
                         "device": device, "width": width, "height": height},
              "outputs": outputs}
    (work / "channel.yaml").write_text(yaml.safe_dump(config))
    log_path = work / "promptcast.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "broadcaster", "run", "--config", str(work / "channel.yaml")]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                env={**os.environ, "PROMPTCAST_API_TOKEN": token})
        try:
            deadline = time.monotonic() + start_timeout_s
            health = {}
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    health = json.loads(_get(f"{base}/healthz"))
                    if health.get("engine", {}).get("block", 0) >= 2:
                        break
                except OSError:
                    pass
                time.sleep(1)
            else:
                raise RuntimeError(f"channel never ran two blocks; see {log_path}")
            for i in range(switches):
                block = health["engine"]["block"]
                _get(f"{base}/api/prompt", token, json.dumps({"prompt": f"gpu check scene {i}"}).encode())
                while json.loads(_get(f"{base}/healthz"))["engine"]["block"] < block + 2:
                    time.sleep(0.2)
            health, metrics = json.loads(_get(f"{base}/healthz")), _get(f"{base}/metrics").decode()
            probe = None
            if rtmp is not None and shutil.which("ffprobe"):
                probe = subprocess.run(["ffprobe", "-v", "error", "-rw_timeout", "10000000",
                                        "-show_entries", "stream=codec_name,width,height", "-of", "json",
                                        rtmp.url("gpu-check")],
                                       capture_output=True, text=True, timeout=60).stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if rtmp is not None:
                rtmp.stop()
    encoder = re.search(r"encoder: (\S+)", log_path.read_text(errors="replace"))
    count = _metric(metrics, "promptcast_switch_latency_seconds_count")
    total = _metric(metrics, "promptcast_switch_latency_seconds_sum")
    return {
        "nvenc": bool(encoder and encoder.group(1) == "h264_nvenc"),
        "engine_restarts": health["engine"]["restarts"],
        "service": (f"{health['engine']['backend']} {health['engine']['generation_fps']} FPS generated; "
                    f"{int(count)} switches, mean decision-to-encoder {total / count if count else 0:.2f} s; "
                    f"outputs {', '.join(sorted(health.get('outputs', {})))}"
                    + (f"; RTMP read back: {json.loads(probe)['streams']}" if probe else "")),
    }


def main(argv: list[str] | None = None) -> int:
    """Service mode entry point: engine mode's options plus the channel run."""
    parser = gpu_check.parser()
    parser.add_argument("--service-switches", type=int, default=5, help="switches made through the API")
    args = parser.parse_args(argv)
    report = gpu_check.run(args)
    if report is None:
        return 1
    weights = args.weights or gpu_check.default_weights(args.size)
    report.update(service_check(weights, args.size, args.device, args.service_switches, args.out))
    gpu_check.write_report(report, args.out)
    print(gpu_check.markdown(report))
    return 0 if report["engine_restarts"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
