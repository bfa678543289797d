"""`promptcast bench ...`: speed measured, with the machine it ran on."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np

from broadcaster.encoder import StreamEncoder
from broadcaster.metrics import Metrics
from broadcaster.outputs.muxer_process import MuxTarget, _Destination
from broadcaster.pacer import Pacer
from broadcaster.settings import EncoderSettings
from broadcaster.switches import SwitchTracker
from engine.preview import PreviewEngine
from engine.ring import FrameRing


def machine() -> str:
    """CPU model, cores, Python, PyAV/FFmpeg and the date: the line every result carries."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ffmpeg = av.library_versions.get("libavcodec", ())
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, PyAV {av.__version__} "
            f"(libavcodec {'.'.join(map(str, ffmpeg))}), {datetime.now(UTC):%Y-%m-%d}")


def _source_frames(width: int, height: int, count: int) -> np.ndarray:
    """Real preview-engine content (motion + caption), so x264 sees what a channel sends."""
    engine = PreviewEngine(width, height)
    engine.start("a neon city in the rain at night, fast traffic", seed=1)
    frames = []
    while len(frames) < count:
        frames.extend(engine.next_block())
    return np.stack(frames[:count])


def _run_pipeline(src: np.ndarray, out_size: tuple[int, int], preset: str, kbps: int,
                  frames: int) -> tuple[float, float]:
    """Ring -> pacer -> encode -> FLV mux for `frames` frames; returns (cpu ms, wall ms) per frame."""
    height, width = src.shape[1:3]
    settings = EncoderSettings(preset=preset, video_bitrate_kbps=kbps, threads=1, codec="libx264")
    encoder = StreamEncoder(settings, out_size[0], out_size[1], 16)
    ring = FrameRing.create(width, height, 12)
    metrics = Metrics()
    with tempfile.TemporaryDirectory() as tmp:
        target = MuxTarget(name="bench", kind="rtmp", format="flv", destination=str(Path(tmp) / "b.flv"))
        dest = _Destination(target, encoder.template, (encoder.video_time_base, encoder.audio_time_base))
        tbs = dest.time_bases
        pacer = Pacer(ring, encoder, [lambda p: dest.write(p, tbs[p.stream])], metrics,
                      SwitchTracker(metrics), engine_fps=16)
        for i in range(16):  # warm-up: encoder lookahead and allocations
            ring.try_write(src[i % len(src)], 0, 0)
            pacer.step(i)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(16, 16 + frames):
            ring.try_write(src[i % len(src)], 0, 0)
            pacer.step(i)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        dest.close()
    encoder.close()
    ring.close()
    return cpu / frames * 1000, wall / frames * 1000


def bench_output(frames: int = 320) -> str:
    """Frames through pacer + encode + mux at 832x480 and 1280x720 (scaled): CPU ms/frame, fps on one core."""
    src = _source_frames(832, 480, 48)
    rows = [
        f"bench output: {frames} frames each, x264 threads=1, FLV mux to a file",
        f"machine: {machine()}",
        "",
        "| engine frame | output | preset | kbit/s | CPU ms/frame | wall ms/frame | max fps on one core | "
        "share of a core at 16 fps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for out_size, kbps in (((832, 480), 3000), ((1280, 720), 4500)):
        for preset in ("ultrafast", "veryfast"):
            cpu_ms, wall_ms = _run_pipeline(src, out_size, preset, kbps, frames)
            rows.append(
                f"| 832x480 | {out_size[0]}x{out_size[1]} | {preset} | {kbps} | {cpu_ms:.2f} "
                f"| {wall_ms:.2f} | {1000 / cpu_ms:.0f} | {cpu_ms * 16 / 10:.1f}% |"
            )
    return "\n".join(rows)


def bench_chat(redis_url: str | None = None, viewers: int = 20_000, concurrency: int = 64,
               seed: int = 5) -> str:
    """Chat events through Steering.handle (dedupe, parse, moderation, batched store): votes/s, latency.

    The stream: every viewer votes, a quarter change their vote later, 2 % of the votes are delivered
    twice (EventSub is at-least-once), and one event in 25 is a `!prompt`. At the end the tally must
    equal each viewer's last vote, exactly; otherwise this raises. With Redis, the same client's
    pipelined ceiling (SET NX PX in pipelines of 1000) is measured in the same run, for scale.
    """
    import asyncio
    import random

    from chat.events import ChatEvent, Role
    from chat.redis_store import redact_url as redact_redis_url
    from chat.settings import ChatSettings
    from chat.steering import Steering

    rng = random.Random(seed)
    options = 4
    plan: list[tuple[str, int, str]] = []  # (kind, user, text) in delivery order; kind: vote | again | prompt
    for user in range(viewers):
        plan.append(("vote", user, f"!vote {rng.randint(1, options)}"))
    for user in rng.sample(range(viewers), viewers // 4):
        plan.insert(rng.randint(user + 1, len(plan)), ("vote", user, f"!vote {rng.randint(1, options)}"))
    for index in rng.sample(range(len(plan)), len(plan) // 50):
        plan.insert(rng.randint(index + 1, len(plan)), ("again", index, ""))
    for n in range(len(plan) // 24):
        text = f"!prompt viewer {n} suggests a calm lake at dawn"
        plan.insert(rng.randint(0, len(plan)), ("prompt", n, text))

    async def run() -> dict:
        if redis_url:
            from chat.redis_store import RedisStore

            store = RedisStore(redis_url, f"bench-{os.getpid()}", max_connections=20)
        else:
            from chat.memory_store import MemoryStore

            store = MemoryStore()
        settings = ChatSettings(mode="vote", vote={"options": options, "min_suggestions": options,
                                                   "round_seconds": 600},
                                moderation={"rate_limit_per_minute": 10_000, "flood_messages": 10_000,
                                            "duplicate_window_seconds": 0})
        steering = Steering(settings, store)

        def event(user: int, text: str, message_id: str) -> ChatEvent:
            return ChatEvent(source="bench", message_id=message_id, user_id=str(user), login=f"v{user}",
                             display_name=f"v{user}", text=text, time=time.time(),
                             roles=frozenset({Role.VIEWER}))

        for n in range(options):
            await steering.handle(event(10**9 + n, f"!prompt a scene number {n} with a red fox", f"setup{n}"))
        await steering.tick()
        events: list[ChatEvent] = []
        votes, last = 0, {}
        for position, (kind, ref, text) in enumerate(plan):
            if kind == "again":  # the same notification again: same message id
                events.append(events[ref] if ref < len(events) else events[-1])
                continue
            events.append(event(ref + (10**8 if kind == "prompt" else 0), text, f"m{position}"))
            if kind == "vote":
                votes += 1
                last[ref] = int(text.split()[1])
        feed = iter(events)
        latencies: list[float] = []

        async def worker() -> None:  # a source's pump: the next event as soon as the last one is stored
            clock = time.perf_counter
            for item in feed:
                t0 = clock()
                await steering.handle(item)
                latencies.append(clock() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        current = await store.current_round()
        expected = tuple(sum(1 for o in last.values() if o == option) for option in range(1, options + 1))
        pool = len(await store.suggestions(limit=10**6))
        ceiling = await _redis_pipelined_ceiling(redis_url) if redis_url else None
        await store.close()
        batcher = steering._intake
        return {"elapsed": elapsed, "latencies": latencies, "events": len(events), "votes": votes,
                "tally": current.tally if current else (), "expected": expected, "pool": pool,
                "prompts": sum(1 for k, _, _ in plan if k == "prompt"), "ceiling": ceiling,
                "batch": batcher.items / max(1, batcher.batches)}

    r = asyncio.run(run())
    latencies = sorted(r["latencies"])
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    exact = tuple(r["tally"]) == r["expected"] and r["pool"] == r["prompts"]
    votes_per_s = r["votes"] / r["elapsed"]
    store_name = f"redis ({redact_redis_url(redis_url)})" if redis_url else "memory"
    lines = [
        f"bench chat: {r['events']} events ({r['votes']} votes from {viewers} viewers, "
        f"{r['events'] - r['votes'] - r['prompts']} redelivered, {r['prompts']} suggestions), "
        f"{concurrency} concurrent handlers, store {store_name}",
        f"machine: {machine()}",
        f"votes: {votes_per_s:,.0f} votes/s; events: {r['events'] / r['elapsed']:,.0f} events/s; "
        f"latency p50 {p50:.2f} ms, p99 {p99:.2f} ms; {r['batch']:.0f} events per store batch on average",
        f"tally {'exact' if exact else 'WRONG'}: {list(r['tally'])} (expected {list(r['expected'])}), "
        f"{r['pool']} of {r['prompts']} suggestions in the pool",
    ]
    if r["ceiling"]:
        lines.append(f"redis pipelined ceiling (same client library, SET NX PX, pipelines of 1000): "
                     f"{r['ceiling']:,.0f} commands/s; votes/s is {votes_per_s / r['ceiling']:.1%} of it")
    if not exact:
        raise RuntimeError("\n".join([*lines, "bench chat: the tally is not exact"]))
    return "\n".join(lines)


async def _redis_pipelined_ceiling(url: str, commands: int = 100_000, depth: int = 1000) -> float:
    """Plain pipelined commands per second from redis.asyncio on `url` (its keys expire within a minute)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    prefix = f"bench-ceiling-{os.getpid()}:"
    try:
        t0 = time.perf_counter()
        for start in range(0, commands, depth):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(start, start + depth):
                    pipe.set(f"{prefix}{i}", 1, nx=True, px=60_000)
                await pipe.execute()
        elapsed = time.perf_counter() - t0
    finally:
        await client.aclose()
    return commands / elapsed
