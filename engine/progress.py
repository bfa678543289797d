"""Weight-loading progress: bytes done per file, reported while a 10+ GB load runs.

The engine process forwards these reports to the supervisor, which restarts an engine
only when its load stops progressing (a stuck disk), never because it is slow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

Report = Callable[[dict], None]


class LoadProgress:
    """Counts the bytes of each weight file as its tensors are loaded."""

    def __init__(self, files: Iterable[Path], report: Report | None = None, interval_s: float = 0.25,
                 max_bytes_per_s: float | None = None):
        """`max_bytes_per_s` paces the load (engine.load_max_mb_s): it waits after a tensor that got ahead."""
        self.totals = {Path(f): Path(f).stat().st_size for f in files}
        self._max_rate = max_bytes_per_s
        self._started = time.monotonic()
        self.done = dict.fromkeys(self.totals, 0)
        self.current: Path | None = None
        self._report = report
        self._interval_s = interval_s
        self._last_report = 0.0

    @property
    def total_bytes(self) -> int:
        """Bytes of every file to load."""
        return sum(self.totals.values())

    @property
    def done_bytes(self) -> int:
        """Bytes loaded so far."""
        return sum(self.done.values())

    def advance(self, path: Path, nbytes: int) -> None:
        """`nbytes` more of `path` are loaded (one tensor); reports at most every `interval_s`."""
        path = Path(path)
        self.current = path
        # Pickle overhead makes the tensors a little smaller than the file: never past its size.
        self.done[path] = min(self.done.get(path, 0) + nbytes, self.totals.get(path, nbytes))
        self._maybe_report(force=False)
        if self._max_rate:
            ahead = self.done_bytes / self._max_rate - (time.monotonic() - self._started)
            while ahead > 0:  # in short sleeps, so the reports keep coming while it waits
                time.sleep(min(ahead, self._interval_s or 0.25))
                self._maybe_report(force=False)
                ahead = self.done_bytes / self._max_rate - (time.monotonic() - self._started)

    def finish(self, path: Path) -> None:
        """`path` is fully loaded."""
        path = Path(path)
        self.current = path
        self.done[path] = self.totals.get(path, self.done.get(path, 0))
        self._maybe_report(force=True)

    def snapshot(self) -> dict:
        """The state as plain data (sent over the engine's event pipe)."""
        current = self.current
        return {
            "file": current.name if current else None,
            "file_bytes": self.done.get(current, 0) if current else 0,
            "file_total": self.totals.get(current, 0) if current else 0,
            "bytes": self.done_bytes,
            "total": self.total_bytes,
            "files_done": sum(1 for p, n in self.done.items() if n >= self.totals[p]),
            "files": len(self.totals),
        }

    def _maybe_report(self, force: bool) -> None:
        now = time.monotonic()
        if self._report is not None and (force or now - self._last_report >= self._interval_s):
            self._last_report = now
            self._report(self.snapshot())


def describe(progress: dict | None) -> str:
    """'loading weights 7.2 / 14.1 GB (models_t5_umt5-xxl-enc-bf16.pth)' for a snapshot."""
    if not progress or not progress.get("total"):
        return "loading weights"
    gb = 1e9
    text = f"loading weights {progress['bytes'] / gb:.1f} / {progress['total'] / gb:.1f} GB"
    return f"{text} ({progress['file']})" if progress.get("file") else text
