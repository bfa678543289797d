"""What played when: a JSONL prompt timeline beside each recording, and chapters made from it.

Each recording file `<name>.mp4` gets `<name>.timeline.jsonl`: one line per prompt that
reached the air, with its offset into that file (media time, so it matches the player's
clock), the wall time, the prompt, how it was chosen and by whom. The first line of every
file is the prompt already on air when the file started, at offset 0, so each file stands
alone. When a file is finished, `<name>.chapters.txt` (YouTube description style) is
written next to it; `promptcast chapters` exports other formats.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from broadcaster.switches import OnAir

log = logging.getLogger(__name__)

YOUTUBE_MIN_CHAPTER_S = 10.0  # YouTube ignores chapter lists with shorter chapters
TITLE_MAX_CHARS = 100


@dataclass(frozen=True)
class Aired:
    """A prompt on air, with who chose it."""

    on_air: OnAir
    chosen_by: str


def describe_choice(chosen_by: str) -> tuple[str, str]:
    """Split a queue entry's `chosen_by` into (how, by): vote, queue, approved, schedule, panel, start."""
    if chosen_by.startswith("schedule:"):
        return "schedule", chosen_by.removeprefix("schedule:")
    if chosen_by in ("panel", "start", "api"):
        return chosen_by, ""
    match = re.fullmatch(r"@(\S+) \((vote|approved by (.+))\)", chosen_by)
    if match:
        return ("vote", match[1]) if match[2] == "vote" else ("approved", f"{match[1]} by {match[3]}")
    if chosen_by.startswith("@"):
        return "queue", chosen_by[1:]
    return "other", chosen_by


def timeline_path(recording: str | Path) -> Path:
    """`rec/x.mp4` -> `rec/x.timeline.jsonl`."""
    path = Path(recording)
    return path.with_name(path.stem + ".timeline.jsonl")


def chapters_path(recording: str | Path) -> Path:
    """`rec/x.mp4` -> `rec/x.chapters.txt`."""
    path = Path(recording)
    return path.with_name(path.stem + ".chapters.txt")


class RecordingTimeline:
    """Follows one recording output's files and writes each one's timeline."""

    def __init__(self) -> None:
        self.recording: str | None = None
        self.base_seconds = 0.0
        self.current: Aired | None = None
        self.lines_written = 0

    def file_started(self, recording: str, base_seconds: float) -> None:
        """A recording file began at media time `base_seconds`; the prompt on air opens its timeline."""
        if self.recording is not None and self.recording != recording:
            self.file_finished(self.recording)
        self.recording, self.base_seconds = recording, base_seconds
        timeline_path(recording).write_text("")
        if self.current is not None:
            self._append(self.current, offset=0.0, carried=True)

    def aired(self, aired: Aired) -> None:
        """A prompt reached the air: note it in the open file's timeline."""
        self.current = aired
        if self.recording is not None:
            self._append(aired, offset=max(0.0, aired.on_air.media_seconds - self.base_seconds))

    def file_finished(self, recording: str) -> None:
        """A recording file is complete: write its chapters beside it."""
        if recording == self.recording:
            self.recording = None
        path = timeline_path(recording)
        if not Path(recording).exists() or not path.exists():
            return
        try:
            text = youtube_chapters(read_timeline(path))
            chapters_path(recording).write_text(text, encoding="utf-8")
        except (OSError, ValueError) as exc:  # chapters are a convenience; the recording is what matters
            log.warning("chapters for %s not written: %s", recording, exc)

    def _append(self, aired: Aired, offset: float, carried: bool = False) -> None:
        how, by = describe_choice(aired.chosen_by)
        line = {
            "offset_s": round(offset, 3),
            "time": datetime.fromtimestamp(aired.on_air.wall_time, UTC).isoformat(timespec="milliseconds"),
            "seq": aired.on_air.seq,
            "prompt": aired.on_air.prompt,
            "how": how,
            "by": by,
            "chosen_by": aired.chosen_by,
        }
        if carried:
            line["carried"] = True  # was already on air when this file began
        assert self.recording is not None
        try:
            with timeline_path(self.recording).open("a", encoding="utf-8") as out:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.lines_written += 1
        except OSError as exc:  # a full disk must not stop the stream
            log.warning("timeline of %s not written: %s", self.recording, exc)


@dataclass(frozen=True)
class Chapter:
    """A chapter: start offset and title."""

    start_s: float
    title: str


def read_timeline(path: str | Path) -> list[Chapter]:
    """Chapters from a timeline file, one per line; malformed lines are refused with their number."""
    chapters: list[Chapter] = []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            chapters.append(Chapter(float(entry["offset_s"]), str(entry["prompt"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a timeline line ({exc})") from None
    return sorted(chapters, key=lambda c: c.start_s)


def _clean_title(title: str) -> str:
    title = " ".join(title.split())  # no newlines or tabs inside a chapter title
    return title if len(title) <= TITLE_MAX_CHARS else title[: TITLE_MAX_CHARS - 1] + "…"


def merge_short(chapters: list[Chapter], min_seconds: float) -> list[Chapter]:
    """Drop chapters that lasted less than `min_seconds`: the chapter before them runs on."""
    return [c for i, c in enumerate(chapters)
            if i + 1 == len(chapters) or chapters[i + 1].start_s - c.start_s >= min_seconds]


def _clock(seconds: float) -> str:
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def youtube_chapters(chapters: list[Chapter], min_seconds: float = YOUTUBE_MIN_CHAPTER_S) -> str:
    """Description-style chapters ('00:00 title' per line), the first at 00:00."""
    merged = merge_short(chapters, min_seconds)
    if not merged:
        return ""
    merged[0] = Chapter(0.0, merged[0].title)
    return "".join(f"{_clock(c.start_s)} {_clean_title(c.title)}\n" for c in merged)


def _ffmeta_escape(text: str) -> str:
    return re.sub(r"([=;#\\\n])", r"\\\1", text)


def ffmetadata_chapters(chapters: list[Chapter], duration_s: float | None = None) -> str:
    """FFmpeg metadata chapters: `ffmpeg -i rec.mp4 -i this.txt -map_metadata 1 -codec copy out.mp4`."""
    out = [";FFMETADATA1\n"]
    for index, chapter in enumerate(chapters):
        end = chapters[index + 1].start_s if index + 1 < len(chapters) else duration_s
        if end is None:
            end = chapter.start_s + 1.0
        out.append(f"[CHAPTER]\nTIMEBASE=1/1000\nSTART={round(chapter.start_s * 1000)}\n"
                   f"END={round(end * 1000)}\ntitle={_ffmeta_escape(_clean_title(chapter.title))}\n")
    return "".join(out)
