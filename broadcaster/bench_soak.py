"""`promptcast bench soak`: a whole channel run for minutes or hours, watched for stalls and leaks.

The real service runs in this process (engine process, pacer, encoder, muxer processes,
HTTP server) with the preview engine, switching prompts on a timer. Every sample it
records output frames against the wall clock, repeated frames, the longest gap between
two output frames, the RSS of every process of the channel, and reconnects. The verdict:
memory flat (least-squares slope after warm-up), no gap longer than one frame interval
beyond the expected one, frames out = wall clock x fps.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import os
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

from broadcaster.bench import machine
from broadcaster.bench_faults import FaultInjector, fault_table
from broadcaster.service import Service
from broadcaster.settings import Settings, load_settings

log = logging.getLogger(__name__)

PROMPTS = (
    "slow drifting clouds over a misty pine forest at dawn",
    "a neon city in the rain at night, reflections on wet streets",
    "an underwater coral reef with schools of silver fish",
    "a desert under a huge full moon, dunes in blue light",
    "a field of sunflowers swaying in warm evening wind",
)
WARM_UP_SHARE = 0.1  # the first tenth of the run (allocator, caches) is left out of the memory trend
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Sample:
    """One look at the running channel."""

    elapsed_s: float
    frames_out: int
    frames_expected: float
    repeated: int
    max_gap_ms: float
    late_frames: int
    resyncs: int
    rss_main_mb: float
    rss_children_mb: float
    processes: int
    reconnects: int
    planned_reconnects: int
    engine_restarts: int
    switches: int
    rss_by_process: str = ""  # "engine=.. muxer-rec=.." in MB: which child a trend belongs to

    @property
    def rss_total_mb(self) -> float:
        """Main process plus every child (engine, muxers)."""
        return round(self.rss_main_mb + self.rss_children_mb, 1)


def _rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0  # it exited between listing and reading


def _descendants(root: int) -> list[int]:
    """Every process below `root` (engine, muxers, their helpers), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may contain spaces
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss_by_part(service: Service) -> str:
    """RSS of the engine and each muxer process, by name."""
    parts = {"engine": service.supervisor.process if service.supervisor else None}
    parts.update({f"muxer-{o.name}": getattr(o, "process", None) for o in service.outputs})
    return " ".join(f"{name}={_rss_kb(proc.pid) / 1024:.1f}" for name, proc in parts.items()
                    if proc is not None and proc.pid)


def slope_per_hour(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (seconds), per hour."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 3600


def soak_settings(base: Settings | None, work: Path, rtmp: str | None, planned_reconnect_s: float | None,
                  preview: bool = True) -> Settings:
    """The channel under test: the given one (or the demo) with the preview engine and outputs in `work`."""
    data = (base or Settings()).model_dump(mode="json")
    if preview:
        data["engine"]["backend"] = "preview"
    data["server"].update(port=0, token_file=str(work / "api-token"))
    if base is None:
        data["outputs"] = [
            {"kind": "record", "name": "rec", "dir": str(work / "rec"), "segment_minutes": 10,
             "format": "mp4"},
            {"kind": "hls", "name": "hls", "dir": str(work / "hls")},
        ]
    if rtmp:
        output = {"kind": "rtmp", "name": "rtmp", "url": rtmp}
        if planned_reconnect_s:
            output["planned_reconnect_hours"] = planned_reconnect_s / 3600
        data["outputs"].append(output)
    return Settings.model_validate(data)


async def _soak(service: Service, minutes: float, sample_s: float, switch_s: float,
                samples: list[Sample], csv_path: Path, injector: FaultInjector | None = None) -> None:
    runner = asyncio.create_task(service.run())
    # Measure from the engine's first frames on; the slate before them is start-up, not the soak.
    while service.supervisor is None or service.supervisor.state != "running":
        if runner.done():
            await runner  # it failed to start: raise why
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)
    pacer, fps = service.pacer, service.pacer.out_fps
    pacer.max_gap_s = 0.0
    started = time.monotonic()
    frames0, repeated0, late0, resyncs0 = pacer.frames_out, pacer.repeated, pacer.late_frames, pacer.resyncs
    next_switch = started + switch_s
    switches = 0
    end = started + minutes * 60
    out = csv_path.open("w", newline="")
    writer = csv.writer(out)
    writer.writerow([f.name for f in fields(Sample)] + ["rss_total_mb"])
    faults = asyncio.create_task(injector.run(), name="faults") if injector else None
    while time.monotonic() < end and not runner.done():
        await asyncio.sleep(min(sample_s, max(0.0, end - time.monotonic())))
        now = time.monotonic()
        if switch_s and now >= next_switch and service.steering is not None:
            switches += 1
            await service.steering.steering.enqueue_direct(PROMPTS[switches % len(PROMPTS)], "bench")
            next_switch += switch_s
        children = _descendants(os.getpid())
        outputs = [o.status() for o in service.outputs]
        engine = service.supervisor.status() if service.supervisor else {}
        gap, pacer.max_gap_s = pacer.max_gap_s, 0.0
        samples.append(Sample(
            elapsed_s=round(now - started, 2),
            frames_out=pacer.frames_out - frames0,
            frames_expected=round((now - started) * fps, 1),
            repeated=pacer.repeated - repeated0,
            max_gap_ms=round(gap * 1000, 1),
            late_frames=pacer.late_frames - late0,
            resyncs=pacer.resyncs - resyncs0,
            rss_main_mb=round(_rss_kb(os.getpid()) / 1024, 1),
            rss_children_mb=round(sum(_rss_kb(pid) for pid in children) / 1024, 1),
            processes=1 + len(children),
            reconnects=sum(o.get("reconnects", 0) for o in outputs),
            planned_reconnects=sum(o.get("planned_reconnects", 0) for o in outputs),
            engine_restarts=engine.get("restarts", 0),
            switches=service.switches.on_air_seq,
            rss_by_process=_rss_by_part(service),
        ))
        # Written as it goes: an hours-long run that dies still leaves its evidence.
        writer.writerow([getattr(samples[-1], f.name) for f in fields(Sample)] + [samples[-1].rss_total_mb])
        out.flush()
    out.close()
    if faults is not None:
        faults.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await faults
    service.request_stop()
    await runner


def bench_soak(minutes: float, config: str | None = None, rtmp: str | None = None,
               planned_reconnect_s: float | None = None, sample_s: float = 10.0, switch_s: float = 30.0,
               out_dir: str | None = None, faults: bool = False, fault_every_s: float | None = None) -> str:
    """Run a channel for `minutes` and report stalls, frame accounting, memory trend and reconnects.

    `faults`: inject faults in turn (`broadcaster/bench_faults.py`) and add their table; chat runs in
    manual mode then, so every accepted line stays in the pool to be found afterwards.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="promptcast-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    base = load_settings(config) if config else None
    settings = soak_settings(base, work, rtmp, planned_reconnect_s)
    if faults:
        settings = settings.model_copy(update={"chat": settings.chat.model_copy(update={"mode": "manual"})})
    service = Service(settings)
    every_s = fault_every_s or max(15.0, minutes * 60 / 10)  # about ten faults a run, at most one per 15 s
    injector = FaultInjector(service, every_s) if faults else None
    samples: list[Sample] = []
    asyncio.run(_soak(service, minutes, sample_s, switch_s, samples, work / "soak-samples.csv", injector))
    if not samples:
        return "bench soak: no samples (the run was shorter than one sample interval)"
    text = report(samples, settings, minutes, work)
    return text + ("\n\n" + fault_table(injector.rows) if injector else "")


def report(samples: list[Sample], settings: Settings, minutes: float, work: Path) -> str:
    """The verdict as Markdown."""
    last = samples[-1]
    fps = settings.output_fps
    interval_ms = 1000 / fps
    steady = samples[int(len(samples) * WARM_UP_SHARE):] or samples
    xs = [s.elapsed_s for s in steady]
    total_slope = slope_per_hour(xs, [s.rss_total_mb for s in steady])
    main_slope = slope_per_hour(xs, [s.rss_main_mb for s in steady])
    worst_gap = max(s.max_gap_ms for s in samples)
    deficit = last.frames_expected - last.frames_out
    span_h = (steady[-1].elapsed_s - steady[0].elapsed_s) / 3600
    growth = total_slope * span_h
    flat = growth < max(5.0, 0.02 * steady[0].rss_total_mb)  # under 5 MB (or 2 %) over the measured span
    no_stall = worst_gap <= 2 * interval_ms  # one frame interval late at most
    outputs = ", ".join(
        o.kind + (f" (planned reconnect every {o.planned_reconnect_hours * 3600:.0f}s)"
                  if o.kind == "rtmp" and o.planned_reconnect_hours else "")
        for o in settings.outputs)
    repeated_share = 100 * last.repeated / max(1, last.frames_out)
    rows = [
        f"bench soak: {minutes:g} min, engine {settings.engine.backend} {settings.engine.width}x"
        f"{settings.engine.height} @ {settings.engine.fps:g} fps, encoder {settings.encoder.preset} "
        f"{settings.encoder.video_bitrate_kbps} kbit/s, outputs: {outputs}",
        f"machine: {machine()}",
        f"samples: {len(samples)} (every {samples[0].elapsed_s:.0f}s), CSV in {work / 'soak-samples.csv'}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| wall clock | {last.elapsed_s:.0f} s |",
        f"| output frames / expected (wall x {fps:g} fps) | {last.frames_out} / {last.frames_expected:.0f} "
        f"(deficit {deficit:.0f}) |",
        f"| repeated frames (engine late) | {last.repeated} ({repeated_share:.2f} %) |",
        f"| longest gap between output frames | {worst_gap:.1f} ms (interval {interval_ms:.1f} ms) |",
        f"| frames > 1.5 intervals after the previous | {last.late_frames} |",
        f"| clock resyncs | {last.resyncs} |",
        f"| RSS, all {last.processes} processes: start of steady state -> end | "
        f"{steady[0].rss_total_mb:.0f} -> {last.rss_total_mb:.0f} MB |",
        f"| RSS trend after warm-up (least squares) | total {total_slope:+.2f} MB/h, main process "
        f"{main_slope:+.2f} MB/h |",
        f"| RSS max | {max(s.rss_total_mb for s in samples):.0f} MB |",
        f"| prompt switches on air | {last.switches} |",
        f"| output reconnects (failures) / planned | {last.reconnects} / {last.planned_reconnects} |",
        f"| engine restarts | {last.engine_restarts} |",
        "",
        f"verdict: memory {'flat' if flat else 'GROWING'} ({growth:+.1f} MB over the steady span); "
        f"{'no stall' if no_stall else 'STALLED'} (longest gap {worst_gap:.0f} ms, "
        f"{2 * interval_ms:.0f} ms allowed); frame accounting "
        + ("exact" if abs(deficit) <= 2 else f"off by {deficit:.0f}"),
    ]
    return "\n".join(rows)
