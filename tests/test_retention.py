"""Recording retention (`keep_hours`): old recordings and their sidecars go, nothing else does."""

from __future__ import annotations

import os

import pytest

from broadcaster.outputs.retention import prune_recordings
from tests.channel import Channel, small_channel
from tests.servers import wait_until

NOW = 1_800_000_000.0


def make(directory, name: str, age_hours: float, sidecars: bool = True):
    path = directory / name
    path.write_bytes(b"x")
    stamp = NOW - age_hours * 3600
    os.utime(path, (stamp, stamp))
    if sidecars:
        stem = path.with_suffix("")
        for suffix in (".timeline.jsonl", ".chapters.txt"):
            stem.with_name(stem.name + suffix).write_text("")
    return path


def test_recordings_older_than_keep_hours_are_deleted_with_their_timeline_and_chapters(tmp_path):
    old = make(tmp_path, "demo-20260101-000000-000.mp4", age_hours=30)
    new = make(tmp_path, "demo-20260102-050000-000.mp4", age_hours=2)

    removed = prune_recordings(tmp_path, "demo", keep_hours=24, now=NOW)

    assert removed == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo-20260102-050000-000.chapters.txt", new.name, "demo-20260102-050000-000.timeline.jsonl"]


def test_the_file_being_written_and_other_channels_and_other_files_are_never_touched(tmp_path):
    current = make(tmp_path, "demo-20260101-000000-000.mkv", age_hours=99)
    other_channel = make(tmp_path, "ocean-20260101-000000-000.mp4", age_hours=99)
    notes = make(tmp_path, "demo-notes.txt", age_hours=99, sidecars=False)

    removed = prune_recordings(tmp_path, "demo", keep_hours=1, keep={str(current)}, now=NOW)

    assert removed == []
    assert current.exists() and other_channel.exists() and notes.exists()


def test_a_missing_directory_prunes_nothing(tmp_path):
    assert prune_recordings(tmp_path / "nowhere", "demo", keep_hours=1, now=NOW) == []


@pytest.mark.servers
def test_a_running_channel_keeps_only_the_recent_recordings(tmp_path):
    rec = tmp_path / "rec"
    output = {"kind": "record", "dir": str(rec), "segment_minutes": 0.05, "format": "mkv",
              "keep_hours": 5 / 3600}
    with Channel(tmp_path, small_channel(tmp_path, [output])) as channel:
        wait_until(lambda: channel.metrics().get("promptcast_frames_output_total", 0) > 16 * 16, 40)
        # Right after a new file appears there is a moment before the old one is pruned.
        def recent() -> list | None:
            found = sorted(rec.glob("*.mkv"))
            return found if len(found) <= 3 else None

        files = wait_until(recent, 10)
        logs = channel.logs()

    # About 5 files were written by now (4 s each); only those finished within the last 5 s
    # before the newest began remain, plus the one being written.
    assert 1 <= len(files) <= 3, [f.name for f in files]
    assert "pruned 1 recording(s) older than" in logs
    assert all(f.with_name(f.stem + ".timeline.jsonl").exists() for f in files)
