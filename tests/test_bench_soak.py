"""The soak benchmark's accounting and verdicts (its 60-minute result lives in docs/benchmarks.md)."""

from __future__ import annotations

import csv

import pytest

from broadcaster.bench_soak import Sample, bench_soak, report, slope_per_hour, soak_settings
from broadcaster.settings import Settings


def sample(t: float, rss: float = 500.0, gap_ms: float = 70.0, frames: int | None = None) -> Sample:
    frames = round(t * 16) if frames is None else frames
    return Sample(elapsed_s=t, frames_out=frames, frames_expected=t * 16, repeated=0, max_gap_ms=gap_ms,
                  late_frames=0, resyncs=0, rss_main_mb=150.0, rss_children_mb=rss - 150.0, processes=5,
                  reconnects=0, planned_reconnects=0, engine_restarts=0, switches=0)


def test_slope_is_per_hour_and_zero_for_flat_series():
    assert slope_per_hour([0, 1800, 3600], [100, 105, 110]) == pytest.approx(10.0)
    assert slope_per_hour([0, 10, 20], [7, 7, 7]) == 0.0
    assert slope_per_hour([5], [7]) == 0.0


def test_flat_memory_and_steady_frames_are_reported_as_such(tmp_path):
    samples = [sample(t, rss=500.0 + (0.5 if t % 20 else 0.0)) for t in range(10, 3601, 10)]

    text = report(samples, Settings(), 60, tmp_path)

    assert "memory flat" in text and "no stall" in text and "frame accounting exact" in text


def test_a_memory_trend_after_warm_up_is_reported_as_growing(tmp_path):
    samples = [sample(t, rss=500.0 + t / 100) for t in range(10, 3601, 10)]  # +36 MB an hour

    assert "memory GROWING" in report(samples, Settings(), 60, tmp_path)


def test_warm_up_growth_alone_is_not_a_trend(tmp_path):
    # Grows for 5 minutes (inside the warm-up), then flat.
    samples = [sample(t, rss=400.0 + min(t, 300) / 3) for t in range(10, 3601, 10)]

    assert "memory flat" in report(samples, Settings(), 60, tmp_path)


def test_a_gap_longer_than_one_frame_interval_beyond_the_expected_one_is_a_stall(tmp_path):
    samples = [sample(t, gap_ms=140.0 if t == 600 else 70.0) for t in range(10, 3601, 10)]

    assert "STALLED (longest gap 140 ms, 125 ms allowed)" in report(samples, Settings(), 60, tmp_path)


def test_missing_output_frames_are_counted_against_the_wall_clock(tmp_path):
    samples = [sample(t) for t in range(10, 3591, 10)] + [sample(3600, frames=3600 * 16 - 40)]

    assert "frame accounting off by 40" in report(samples, Settings(), 60, tmp_path)


def test_soak_settings_use_the_preview_engine_and_push_rtmp_with_a_planned_reconnect(tmp_path):
    settings = soak_settings(None, tmp_path, "rtmp://127.0.0.1:1935/live/soak", planned_reconnect_s=600)

    assert settings.engine.backend == "preview"
    assert [o.kind for o in settings.outputs] == ["record", "hls", "rtmp"]
    assert settings.outputs[2].planned_reconnect_hours * 3600 == pytest.approx(600)
    assert settings.server.port == 0


@pytest.mark.servers
def test_a_short_soak_runs_the_real_channel_and_writes_every_sample(tmp_path):
    text = bench_soak(minutes=0.2, sample_s=2.0, switch_s=4.0, out_dir=str(tmp_path))

    with (tmp_path / "soak-samples.csv").open() as rows:
        samples = list(csv.DictReader(rows))
    assert len(samples) >= 5
    assert int(samples[-1]["processes"]) >= 4  # this process, the engine, two muxers
    assert float(samples[-1]["rss_children_mb"]) > 0
    assert int(samples[-1]["switches"]) >= 1
    parts = dict(part.split("=") for part in samples[-1]["rss_by_process"].split())
    assert set(parts) == {"engine", "muxer-rec", "muxer-hls"} and all(float(v) > 0 for v in parts.values())
    assert "verdict: memory" in text and "machine:" in text
    assert list((tmp_path / "rec").glob("*.timeline.jsonl"))


@pytest.mark.servers
def test_a_soak_with_faults_measures_each_and_loses_nothing_answered(tmp_path):
    text = bench_soak(minutes=0.4, sample_s=2.0, switch_s=0, out_dir=str(tmp_path), faults=True,
                      fault_every_s=3.0)

    table = text.split("| fault |", 1)[1]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert rows and rows[0].startswith("| engine SIGKILL | 1 | 5 | 5 | 0 |"), text
    assert "NOT RECOVERED" not in table
    assert "nothing answered 202 missing afterwards; all recovered" in text
