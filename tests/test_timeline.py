"""The prompt timeline beside each recording, and chapters for VODs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broadcaster.switches import OnAir
from broadcaster.timeline import (
    Aired,
    Chapter,
    RecordingTimeline,
    chapters_path,
    describe_choice,
    ffmetadata_chapters,
    read_timeline,
    timeline_path,
    youtube_chapters,
)
from tests.channel import Channel, small_channel
from tests.servers import probe_streams, wait_until


def aired(seq: int, prompt: str, media_seconds: float, chosen_by: str = "@ana") -> Aired:
    return Aired(OnAir(seq, prompt, media_seconds, 1_790_000_000.0 + media_seconds), chosen_by)


def lines(recording) -> list[dict]:
    return [json.loads(line) for line in timeline_path(recording).read_text().splitlines()]


def test_a_new_file_opens_its_timeline_with_the_prompt_already_on_air_at_offset_zero(tmp_path):
    timeline = RecordingTimeline()
    timeline.aired(aired(0, "a calm ocean", 0.0, "start"))
    recording = tmp_path / "demo-1.mp4"
    recording.write_bytes(b"x")

    timeline.file_started(str(recording), base_seconds=120.0)

    [first] = lines(recording)
    assert (first["offset_s"], first["prompt"], first["how"]) == (0.0, "a calm ocean", "start")
    assert first["carried"] is True


def test_prompts_are_written_at_their_offset_into_the_file(tmp_path):
    timeline = RecordingTimeline()
    recording = tmp_path / "demo-1.mp4"
    recording.write_bytes(b"x")
    timeline.file_started(str(recording), base_seconds=100.0)

    timeline.aired(aired(3, "a red fox in snow", 112.5, "@ana (vote)"))

    [entry] = lines(recording)
    assert entry["offset_s"] == 12.5
    assert (entry["seq"], entry["prompt"]) == (3, "a red fox in snow")
    assert (entry["how"], entry["by"]) == ("vote", "ana")
    assert entry["time"].endswith("+00:00")


def test_rotation_finishes_the_old_file_with_chapters_and_starts_a_new_timeline(tmp_path):
    timeline = RecordingTimeline()
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"
    first.write_bytes(b"x")
    second.write_bytes(b"x")
    timeline.file_started(str(first), 0.0)
    timeline.aired(aired(1, "one", 0.0))
    timeline.aired(aired(2, "two", 30.0))

    timeline.file_started(str(second), 60.0)

    assert chapters_path(first).read_text() == "00:00 one\n00:30 two\n"
    assert [e["prompt"] for e in lines(second)] == ["two"]


def test_unicode_prompts_are_kept_verbatim_in_the_timeline(tmp_path):
    timeline = RecordingTimeline()
    recording = tmp_path / "r.mkv"
    recording.write_bytes(b"x")
    timeline.file_started(str(recording), 0.0)

    timeline.aired(aired(1, "雪の中の狐 🦊, \"quoted\"\nnext line", 4.0))

    assert lines(recording)[0]["prompt"] == "雪の中の狐 🦊, \"quoted\"\nnext line"


@pytest.mark.parametrize(("chosen_by", "expected"), [
    ("@ana (vote)", ("vote", "ana")),
    ("@ana", ("queue", "ana")),
    ("@ana (approved by mod_bob)", ("approved", "ana by mod_bob")),
    ("schedule:night", ("schedule", "night")),
    ("panel", ("panel", "")),
    ("start", ("start", "")),
])
def test_how_a_prompt_was_chosen_is_read_from_its_queue_entry(chosen_by, expected):
    assert describe_choice(chosen_by) == expected


def test_youtube_chapters_start_at_zero_and_drop_chapters_under_ten_seconds():
    chapters = [Chapter(0.0, "intro"), Chapter(40.0, "brief"), Chapter(44.0, "fox"), Chapter(3725.0, "owl")]

    assert youtube_chapters(chapters) == "00:00 intro\n00:44 fox\n1:02:05 owl\n"


def test_youtube_chapter_titles_are_one_line_and_at_most_100_characters():
    text = youtube_chapters([Chapter(0.0, "a\nb   c " + "x" * 200)])

    title = text.split(" ", 1)[1].rstrip("\n")
    assert "\n" not in title and len(title) == 100 and title.startswith("a b c x")


def test_ffmetadata_chapters_escape_special_characters_and_end_where_the_next_begins():
    text = ffmetadata_chapters([Chapter(0.0, "a=b;c#d\\e"), Chapter(12.5, "two")], duration_s=20.0)

    assert text.startswith(";FFMETADATA1\n")
    assert "START=0\nEND=12500\ntitle=a\\=b\\;c\\#d\\\\e\n" in text
    assert "START=12500\nEND=20000\ntitle=two\n" in text


def test_a_malformed_timeline_line_is_refused_with_its_line_number(tmp_path):
    path = tmp_path / "x.timeline.jsonl"
    path.write_text('{"offset_s": 0, "prompt": "ok"}\n{"offset_s": "soon"\n')

    with pytest.raises(ValueError, match=r"x.timeline.jsonl:2: not a timeline line"):
        read_timeline(path)


def test_chapters_command_prints_ffmetadata_for_ffmpeg(tmp_path):
    path = tmp_path / "x.timeline.jsonl"
    path.write_text('{"offset_s": 0, "prompt": "one"}\n{"offset_s": 15.0, "prompt": "two"}\n')

    command = ["chapters", str(path), "--format", "ffmetadata", "--duration", "30"]
    done = subprocess.run([sys.executable, "-m", "broadcaster", *command], capture_output=True, text=True,
                          check=True)

    assert "START=15000\nEND=30000\ntitle=two" in done.stdout


def test_chapters_command_refuses_a_missing_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "broadcaster", "chapters", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True)

    assert done.returncode == 2 and "cannot read" in done.stderr


@pytest.mark.servers
def test_every_recording_gets_a_timeline_of_what_played_and_chapters(tmp_path):
    rec = tmp_path / "rec"
    config = small_channel(tmp_path, [{"kind": "record", "dir": str(rec), "segment_minutes": 0.1,
                                       "format": "mkv"}], chat={"mode": "queue"})
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 20)
        channel.post_prompt("a red fox running through deep snow")
        wait_until(lambda: channel.metrics().get("promptcast_prompt_switches_total", 0) >= 1, 15)
        wait_until(lambda: len(list(rec.glob("*.mkv"))) >= 2, 20)
        channel.stop()

    recordings = sorted(rec.glob("*.mkv"))
    for recording in recordings:
        entries = lines(recording)
        assert entries and entries[0]["offset_s"] == 0.0, recording
        duration = float(probe_streams(recording)["format"]["duration"])
        assert all(0 <= e["offset_s"] <= duration + 0.1 for e in entries)
        assert chapters_path(recording).exists()
    first = lines(recordings[0])[0]
    assert (first["prompt"], first["how"], first["carried"]) == ("a red fire in the night", "start", True)
    played = [e for r in recordings for e in lines(r) if not e.get("carried")]
    assert [(e["prompt"], e["how"]) for e in played] == [("a red fox running through deep snow", "panel")]
