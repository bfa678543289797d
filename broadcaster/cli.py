"""The `promptcast` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_CONFIG = 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _load(path: str | None):
    from broadcaster.settings import ConfigError, load_settings

    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"{exc.source}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    """Run the channel."""
    import asyncio

    from broadcaster.service import Service
    from engine.backends import BackendUnavailable

    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    try:
        asyncio.run(Service(settings, config_path=args.config).run())
    except BackendUnavailable as exc:
        print(f"{args.config or '<default>'}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:  # an unusable audio file and the like, found at start-up
        print(f"cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a channel file."""
    settings = _load(args.file)
    if settings is None:
        return EXIT_CONFIG
    outputs = ", ".join(o.kind for o in settings.outputs) or "no outputs"
    print(f"{args.file}: OK (channel {settings.channel}; engine {settings.engine.backend} "
          f"{settings.engine.width}x{settings.engine.height}@{settings.engine.fps:g}; {outputs})")
    return 0


DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN_FILE = "./out/api-token"


def control_target(args: argparse.Namespace) -> tuple[str, str]:
    """The control API's URL and token: flags, else the channel file's `server:`, else the defaults.

    The token: --token, else PROMPTCAST_API_TOKEN, else the token file (--token-file, else the
    channel's `server.token_file`, relative to the current directory as the service reads it).
    Only YAML is read here, not the settings model: a client call stays well under a second.
    """
    url, token_file = DEFAULT_URL, DEFAULT_TOKEN_FILE
    if args.config:
        import yaml

        from broadcaster.envref import expand_env

        with open(args.config, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        server = expand_env((data.get("server") or {}) if isinstance(data, dict) else {}, ("server",),
                            dict(os.environ), [])
        host = str(server.get("host", "127.0.0.1"))
        # A server bound to every interface is reached on the loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{server.get('port', 8080)}"
        token_file = str(server.get("token_file", DEFAULT_TOKEN_FILE))
    url = args.url or url
    token = args.token or os.environ.get("PROMPTCAST_API_TOKEN", "").strip()
    path = Path(args.token_file or token_file)
    if not token and path.exists():
        token = path.read_text().strip()
    return url, token


def _call(url: str, token: str, path: str, body: dict | None) -> int:
    """One control-API request; prints the answer. 0, or 1 when refused or unreachable."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url.rstrip("/") + path, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"refused ({exc.code}): {exc.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"cannot reach {url}: {exc.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    """Send a prompt to a running channel's control API."""
    url, token = control_target(args)
    if not token:
        print("no API token: set PROMPTCAST_API_TOKEN, pass --token, or --config with the channel's "
              "server.token_file", file=sys.stderr)
        return 1
    return _call(url, token, "/api/prompt", {"prompt": args.text})


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark."""
    from broadcaster.bench import bench_output

    if args.what == "output":
        print(bench_output(frames=args.frames))
        return 0
    if args.what == "chat":
        from broadcaster.bench import bench_chat

        print(bench_chat(redis_url=args.redis))
        return 0
    if args.what == "soak":
        from broadcaster.bench_soak import bench_soak

        print(bench_soak(minutes=args.minutes, config=args.config, rtmp=args.rtmp,
                         planned_reconnect_s=args.planned_reconnect_seconds, sample_s=args.sample_seconds,
                         switch_s=args.switch_seconds, out_dir=args.out, faults=args.faults))
        return 0
    if args.what == "switch":
        from broadcaster.bench_switch import bench_switch

        print(bench_switch(count=args.switches, hls=args.hls, segment_seconds=args.segment_seconds,
                           config=args.config, switch_cut=args.switch_cut or None,
                           list_size=args.list_size))
        return 0
    if args.what == "webrtc":
        from broadcaster.bench_webrtc import bench_webrtc

        print(bench_webrtc(viewers=[int(n) for n in args.viewers.split(",")], seconds=args.seconds))
        return 0
    import torch

    from engine.bench import bench_engine

    dtype = args.dtype or ("bf16" if torch.cuda.is_available() and args.device != "cpu" else "fp32")
    if args.model == "longlive2":
        from engine.longlive2.bench import bench_longlive2

        print(bench_longlive2(size=args.size, blocks=args.blocks, steps=args.steps, dtype=dtype,
                              compile_model=args.compile, device=args.device, width=args.width,
                              height=args.height))
        return 0
    if args.size not in ("tiny", "small", "1.3b"):
        raise SystemExit(f"--size {args.size} is a longlive2 preset; add --model longlive2")
    print(bench_engine(size=args.size, blocks=args.blocks, steps=args.steps, dtype=dtype,
                       compile_model=args.compile, device=args.device, width=args.width, height=args.height))
    return 0


def cmd_download_weights(args: argparse.Namespace) -> int:
    """Fetch the LongLive + Wan2.1 files."""
    from engine.weights import download_weights

    return download_weights(args.dir, model=args.model)


def cmd_check_weights(args: argparse.Namespace) -> int:
    """Verify a weights directory without loading it onto a GPU."""
    from engine.weights import check_weights

    problems = check_weights(args.dir, args.model)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.dir}: OK (every file present; keys and shapes match)")
    return 0


def cmd_chapters(args: argparse.Namespace) -> int:
    """Chapters for a VOD from a recording's prompt timeline."""
    from broadcaster.timeline import ffmetadata_chapters, read_timeline, youtube_chapters

    try:
        chapters = read_timeline(args.timeline)
    except OSError as exc:
        print(f"{args.timeline}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    if args.format == "youtube":
        sys.stdout.write(youtube_chapters(chapters, min_seconds=args.min_seconds))
    elif args.format == "ffmetadata":
        sys.stdout.write(ffmetadata_chapters(chapters, duration_s=args.duration))
    else:
        listing = [{"start_s": c.start_s, "title": c.title} for c in chapters]
        json.dump(listing, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="promptcast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the channel")
    run.add_argument("--config", help="channel YAML (default: the embedded demo)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a channel YAML; exit 2 on errors")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    prompt = sub.add_parser("prompt", help="switch a running channel to a new prompt")
    prompt.add_argument("text")
    prompt.add_argument("--config", help="the channel's YAML: URL and token file from its server section")
    prompt.add_argument("--url", default=None,
                        help=f"the control API (default: from --config, else {DEFAULT_URL})")
    prompt.add_argument("--token", default="")
    prompt.add_argument("--token-file", default=None,
                        help=f"default: the channel's server.token_file, else {DEFAULT_TOKEN_FILE}")
    prompt.set_defaults(func=cmd_prompt)

    chapters = sub.add_parser("chapters", help="chapters for a VOD from a recording's .timeline.jsonl")
    chapters.add_argument("timeline", help="the <recording>.timeline.jsonl written beside a recording")
    chapters.add_argument("--format", choices=["youtube", "ffmetadata", "json"], default="youtube",
                          help="youtube: '00:00 title' lines; ffmetadata: for ffmpeg -map_metadata")
    chapters.add_argument("--min-seconds", type=float, default=10.0,
                          help="youtube: drop chapters shorter than this (YouTube's minimum is 10 s)")
    chapters.add_argument("--duration", type=float, default=None, help="ffmetadata: the recording's length")
    chapters.set_defaults(func=cmd_chapters)

    download = sub.add_parser("download-weights", help="fetch LongLive + Wan2.1 weights (resumable)")
    download.add_argument("--dir", default="./weights")
    download.add_argument("--model", choices=["longlive", "longlive2"], default="longlive",
                          help="longlive: LongLive-1.3B + Wan2.1; longlive2: LongLive-2.0-5B + Wan2.2-5B")
    download.set_defaults(func=cmd_download_weights)

    check_w = sub.add_parser("check-weights", help="verify a weights directory (layout, keys, shapes)")
    check_w.add_argument("dir", nargs="?", default="./weights")
    check_w.add_argument("--model", choices=["longlive", "longlive2"], default="longlive")
    check_w.set_defaults(func=cmd_check_weights)

    bench = sub.add_parser("bench", help="measure speed")
    bench.add_argument("what", choices=["output", "engine", "chat", "webrtc", "soak", "switch"])
    bench.add_argument("--switches", type=int, default=24, help="switch: prompt switches to measure (>= 20)")
    bench.add_argument("--hls", action="store_true",
                       help="switch: read the HLS playlist (as OBS's Media Source would) instead of RTMP")
    bench.add_argument("--switch-cut", action="store_true",
                       help="switch: measure with engine.switch_cut (queued frames dropped at a switch)")
    bench.add_argument("--list-size", type=int, default=4, help="switch --hls: segments in the playlist")
    bench.add_argument("--segment-seconds", type=float, default=1.0, help="switch --hls: HLS segment length")
    bench.add_argument("--minutes", type=float, default=10.0, help="soak: how long to run")
    bench.add_argument("--config", default=None,
                       help="soak, switch: a channel file (default: the demo / OBS encoder, preview engine)")
    bench.add_argument("--rtmp", default=None, help="soak: also push to this RTMP URL")
    bench.add_argument("--planned-reconnect-seconds", type=float, default=None,
                       help="soak: planned RTMP reconnect interval (exercises the 48 h-cap reconnect)")
    bench.add_argument("--sample-seconds", type=float, default=10.0, help="soak: sampling interval")
    bench.add_argument("--switch-seconds", type=float, default=30.0, help="soak: prompt switch interval")
    bench.add_argument("--faults", action="store_true",
                       help="soak: inject faults in turn (engine/muxer kills, fd exhaustion), measure each")
    bench.add_argument("--out", default=None, help="soak: directory for outputs and the samples CSV")
    bench.add_argument("--redis", default=None, help="chat: a Redis URL (default: the in-process store)")
    bench.add_argument("--frames", type=int, default=320, help="output: frames per configuration")
    bench.add_argument("--viewers", default="0,1,5,10", help="webrtc: WHEP viewer counts, comma-separated")
    bench.add_argument("--seconds", type=float, default=10.0, help="webrtc: measured seconds per count")
    bench.add_argument("--model", choices=["longlive", "longlive2"], default="longlive",
                       help="engine: LongLive 1.0 (Wan2.1 1.3B) or 2.0 (Wan2.2-TI2V-5B)")
    bench.add_argument("--size", choices=["tiny", "small", "1.3b", "5b"], default="tiny",
                       help="engine: preset (longlive: tiny, small, 1.3b; longlive2: tiny, 5b)")
    bench.add_argument("--blocks", type=int, default=8, help="engine: blocks to generate")
    bench.add_argument("--steps", type=int, choices=[1, 2, 3, 4], default=4, help="engine: denoising steps")
    bench.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="engine: default bf16 on CUDA, fp32 on CPU")
    bench.add_argument("--compile", action="store_true", help="engine: torch.compile the DiT")
    bench.add_argument("--device", default=None, help="engine: cuda or cpu (default: cuda if present)")
    bench.add_argument("--width", type=int, default=None,
                       help="engine: frame width in pixels, multiple of 16 (longlive2: 32)")
    bench.add_argument("--height", type=int, default=None,
                       help="engine: frame height in pixels, multiple of 16 (longlive2: 32)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)
