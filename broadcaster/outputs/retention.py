"""Recording retention: a 24/7 channel writes 24 files a day; old ones go, with their sidecars."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

SIDECARS = (".timeline.jsonl", ".chapters.txt")


def prune_recordings(directory: str | Path, prefix: str, keep_hours: float, keep: set[str] = frozenset(),
                     now: float | None = None) -> list[Path]:
    """Delete `prefix-*.mp4|mkv` older than `keep_hours` (by last write) and their sidecars; never `keep`."""
    now = time.time() if now is None else now
    cutoff = now - keep_hours * 3600
    removed: list[Path] = []
    for recording in sorted(Path(directory).glob(f"{prefix}-*")):
        if recording.suffix not in (".mp4", ".mkv") or str(recording) in keep:
            continue
        try:
            if recording.stat().st_mtime >= cutoff:
                continue
            recording.unlink()
        except OSError as exc:  # gone already, or not ours to delete: leave it and say so
            log.warning("recording %s not pruned: %s", recording, exc)
            continue
        removed.append(recording)
        for suffix in SIDECARS:
            recording.with_name(recording.stem + suffix).unlink(missing_ok=True)
    if removed:
        log.info("pruned %d recording(s) older than %gh from %s", len(removed), keep_hours, directory)
    return removed
