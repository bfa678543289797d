"""The programme: which playlist plays when, as settings (`schedule:` in the channel YAML) and pure logic.

    ScheduleSettings -> Programme(settings).at(t) -> Slot (window, prompt, chat policy, ends_at)

Nothing here reads the clock or touches steering: `broadcaster/scheduler.py` does, on an
injected `Clock`, so tests can run days of programme in seconds. Semantics in docs/schedule.md.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

# The default playlist's position counts from here, so a restart resumes at the same item.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Every window recurs within a week and lasts at most a day: a change is always this close.
_HORIZON = timedelta(days=8)
_US = timedelta(microseconds=1)

_HHMM = re.compile(r"^(?P<h>[0-9]{1,2}):(?P<m>[0-5][0-9])$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def zone(name: str) -> tzinfo:
    """The time zone called `name` (IANA); KeyError when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, UnicodeError):
        # Containers often ship without tzdata; UTC needs none, so the default always works.
        if name == "UTC":
            return UTC
        raise KeyError(name) from None


def _check_zone(name: str) -> str:
    try:
        zone(name)
    except KeyError:
        try:
            close = difflib.get_close_matches(name, available_timezones(), n=1)
        except OSError:
            close = []
        hint = f"; did you mean '{close[0]}'?" if close else " (IANA names like Europe/Berlin)"
        raise ValueError(f"unknown time zone '{name}'{hint}") from None
    return name


def _check_time(value: object, latest: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 18:30 as the base-60 number 1110.
        raise ValueError(f"write the time in quotes, e.g. '18:30' (YAML read this as the number {value})")
    match = _HHMM.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a time of day: write HH:MM, 00:00 to {latest}")
    hours, minutes = int(match["h"]), int(match["m"])
    text = f"{hours:02d}:{minutes:02d}"
    if hours > 23 and text != latest:
        raise ValueError(f"{value!r} is not a time of day: write HH:MM, 00:00 to {latest}")
    return text


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class PlaylistItem(_Strict):
    """One prompt of a playlist and how long it plays."""

    prompt: str = Field(min_length=1, max_length=2000, description="the prompt text (the style is appended)")
    seconds: float | None = Field(None, gt=0, description="how long it plays; default the playlist's "
                                                          "item_seconds")


class PlaylistSettings(_Strict):
    """Prompts that play in turn, each for its duration, cycling for as long as the window is open."""

    prompts: list[PlaylistItem] = Field(
        min_length=1, description="items ({prompt, seconds}) or plain strings (played for item_seconds)")
    order: Literal["sequence", "shuffle"] = Field(
        "sequence", description="sequence: as listed; shuffle: a new order each cycle, every item once")
    style: str = Field("", max_length=300, description="the style anchor, appended as '<prompt>, <style>'")
    item_seconds: float = Field(60.0, gt=0, description="how long an item without its own seconds plays")

    @field_validator("prompts", mode="before")
    @classmethod
    def _plain_strings(cls, prompts: object) -> object:
        if isinstance(prompts, list):
            return [{"prompt": p} if isinstance(p, str) else p for p in prompts]
        return prompts


class WindowSettings(_Strict):
    """A time window on some days of the week, mapped to a playlist and a chat policy."""

    name: str = Field(pattern=r"^[A-Za-z0-9_. -]{1,40}$", description="unique; shown in the API and logs")
    days: list[Day] = Field(default_factory=lambda: list(DAYS), min_length=1,
                            description="days the window starts on (mon..sun)")
    start: str = Field(description="local start time, 'HH:MM' (quote it in YAML)")
    end: str = Field(description="local end time, 'HH:MM' or '24:00'; at or before start: ends the next day "
                                 "(equal to start: 24 hours)")
    timezone: str | None = Field(None, description="IANA time zone of start/end; default the schedule's")
    playlist: str = Field(description="the name of a playlist in schedule.playlists")
    chat: bool = Field(True, description="whether chat may steer during this window")
    mode: Literal["vote", "queue", "manual"] | None = Field(
        None, description="chat mode during this window; default chat.mode")

    @field_validator("days")
    @classmethod
    def _unique_days(cls, days: list[str]) -> list[str]:
        repeated = sorted({d for d in days if days.count(d) > 1}, key=DAYS.index)
        if repeated:
            raise ValueError(f"day listed twice: {', '.join(repeated)}")
        return days

    @field_validator("start", mode="before")
    @classmethod
    def _start(cls, value: object) -> str:
        return _check_time(value, "23:59")

    @field_validator("end", mode="before")
    @classmethod
    def _end(cls, value: object) -> str:
        return _check_time(value, "24:00")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str | None) -> str | None:
        return None if name is None else _check_zone(name)


class AutopilotSettings(_Strict):
    """Plays the programme by itself when chat is quiet (and always where a window turns chat off)."""

    idle_seconds: float = Field(300.0, ge=0, description="chat quiet this long (and the queue empty): "
                                                         "the programme plays")
    enabled: bool = Field(True, description="false: the programme plays only in windows with chat: false")


class ScheduleSettings(_Strict):
    """The programme by time of day and the autopilot for quiet chat."""

    timezone: str = Field(
        "UTC", description="IANA time zone of the windows' times (a window may set its own)")
    playlists: dict[str, PlaylistSettings] = Field(default_factory=dict, description="playlists by name")
    windows: list[WindowSettings] = Field(
        default_factory=list, description="checked in order; the first open window plays")
    default_playlist: str | None = Field(
        None, description="plays when no window is open; none: chat and the queue alone")
    autopilot: AutopilotSettings = Field(default_factory=AutopilotSettings, description="quiet-chat takeover")
    reanchor_on_boundary: bool = Field(
        True, description="ask the engine for a soft re-anchor where one window hands over to the next")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        return _check_zone(name)

    @model_validator(mode="after")
    def _references(self) -> ScheduleSettings:
        # Located errors (windows[2].playlist), all at once: the loader maps them to YAML lines.
        errors = []
        known = ", ".join(sorted(self.playlists)) or "none defined"
        seen: set[str] = set()
        for index, window in enumerate(self.windows):
            if window.name in seen:
                errors.append((("windows", index, "name"), f"duplicate window name '{window.name}'"))
            seen.add(window.name)
            if window.playlist not in self.playlists:
                errors.append((("windows", index, "playlist"),
                               f"window '{window.name}' names unknown playlist '{window.playlist}' "
                               f"(playlists: {known})"))
        if self.default_playlist is not None and self.default_playlist not in self.playlists:
            errors.append((("default_playlist",),
                           f"unknown playlist '{self.default_playlist}' (playlists: {known})"))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, [
                {"type": PydanticCustomError("schedule", "{message}", {"message": message}), "loc": loc,
                 "input": None} for loc, message in errors
            ])
        return self


# --- the programme ----------------------------------------------------------------------------------


class Clock(Protocol):
    """Where the scheduler reads the time; tests inject a fake one."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        return datetime.now(UTC)


@dataclass(frozen=True)
class Slot:
    """What the programme says for one instant."""

    window: str | None  # the open window's name; None: the default playlist or nothing
    playlist: str | None  # None: no programme now (chat and the queue alone)
    prompt: str | None  # the item's text with the playlist's style applied
    item_index: int | None  # index in the playlist's prompts
    item_key: Hashable | None  # changes whenever the playing item changes (new item, cycle, occurrence)
    window_key: Hashable | None  # changes exactly at window boundaries, entering/leaving the default too
    chat: bool  # whether chat may steer
    mode: str | None  # chat mode; None: chat.mode
    ends_at: datetime | None  # the earlier of the item's end and the window's; None: nothing ever changes


@dataclass(frozen=True)
class _Occurrence:
    index: int  # the window's index in settings.windows
    start: datetime  # UTC
    end: datetime  # UTC


@dataclass(frozen=True)
class _Window:
    settings: WindowSettings
    zone: tzinfo
    days: frozenset[int]  # date.weekday() numbers
    start: time
    end: time
    end_next_day: bool


class Programme:
    """The pure programme logic over ScheduleSettings: what plays at any instant."""

    def __init__(self, settings: ScheduleSettings):
        self.settings = settings
        default_zone = zone(settings.timezone)
        self._windows = []
        for window in settings.windows:
            start, end = _minutes(window.start), _minutes(window.end)
            self._windows.append(_Window(
                settings=window,
                zone=zone(window.timezone) if window.timezone else default_zone,
                days=frozenset(DAYS.index(d) for d in window.days),
                start=time(start // 60, start % 60),
                end=time(end // 60 % 24, end % 60),
                # 24:00, an end before the start, and end == start (24 h) all end on the next day.
                end_next_day=end <= start or end == 24 * 60,
            ))

    # --- when windows are open -------------------------------------------------------------------
    def _occurrence(self, index: int, day: date) -> _Occurrence | None:
        """The window's occurrence starting on local date `day`, if it has one."""
        window = self._windows[index]
        if day.weekday() not in window.days:
            return None
        # fold=0 (PEP 495): a wall time in a spring-forward gap is read with the offset before the
        # change (02:30 -> 03:30 summer time); an ambiguous fall-back time is its first occurrence.
        start = datetime.combine(day, window.start, tzinfo=window.zone).astimezone(UTC)
        end_day = day + timedelta(days=1) if window.end_next_day else day
        end = datetime.combine(end_day, window.end, tzinfo=window.zone).astimezone(UTC)
        if end <= start:
            return None  # a window that falls entirely into a DST gap
        return _Occurrence(index, start, end)

    def _open(self, t: datetime) -> _Occurrence | None:
        """The first window in list order that is open at `t`."""
        for index, window in enumerate(self._windows):
            today = t.astimezone(window.zone).date()
            # An occurrence lasts at most a day of wall time: it started today or yesterday.
            for day in (today - timedelta(days=1), today):
                occurrence = self._occurrence(index, day)
                if occurrence is not None and occurrence.start <= t < occurrence.end:
                    return occurrence
        return None

    def _window_key(self, occurrence: _Occurrence | None) -> Hashable | None:
        if occurrence is not None:
            return ("window", self._windows[occurrence.index].settings.name, occurrence.start.isoformat())
        if self.settings.default_playlist is not None:
            return ("default", self.settings.default_playlist)
        return None

    def boundaries(self, start: datetime, end: datetime) -> list[datetime]:
        """Every window start and end in [start, end), sorted, in UTC (overridden ones included)."""
        _aware(start)
        _aware(end)
        found: set[datetime] = set()
        for index, window in enumerate(self._windows):
            first = start.astimezone(window.zone).date() - timedelta(days=1)
            last = end.astimezone(window.zone).date()
            for offset in range((last - first).days + 1):
                occurrence = self._occurrence(index, first + timedelta(days=offset))
                if occurrence is not None:
                    found.update(b for b in (occurrence.start, occurrence.end) if start <= b < end)
        return sorted(found)

    def next_change(self, t: datetime) -> datetime | None:
        """The first instant after `t` where the window in effect changes; None if it never does."""
        key = self._window_key(self._open(t))
        for boundary in self.boundaries(t + _US, t + _HORIZON):
            if self._window_key(self._open(boundary)) != key:
                return boundary
        return None

    # --- what plays --------------------------------------------------------------------------------
    def at(self, t: datetime) -> Slot:
        """What the programme plays at `t` (timezone-aware)."""
        _aware(t)
        t = t.astimezone(UTC)
        occurrence = self._open(t)
        change = self.next_change(t)
        key = self._window_key(occurrence)
        if occurrence is not None:
            window = self._windows[occurrence.index].settings
            name, playlist, started = window.name, window.playlist, occurrence.start
            chat, mode = window.chat, window.mode
        elif self.settings.default_playlist is not None:
            name, playlist, started = None, self.settings.default_playlist, EPOCH
            chat, mode = True, None
        else:
            return Slot(window=None, playlist=None, prompt=None, item_index=None, item_key=None,
                        window_key=None, chat=True, mode=None, ends_at=change)
        seed = f"{name or 'default:' + playlist}|{started.isoformat()}"
        index, cycle, item_end = _position(self.settings.playlists[playlist], seed, started, t)
        settings = self.settings.playlists[playlist]
        prompt = settings.prompts[index].prompt
        if settings.style:
            prompt = f"{prompt}, {settings.style}"
        return Slot(window=name, playlist=playlist, prompt=prompt, item_index=index,
                    item_key=(key, cycle, index, prompt), window_key=key, chat=chat, mode=mode,
                    ends_at=item_end if change is None else min(item_end, change))


def _aware(t: datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"the programme needs timezone-aware times, got {t!r}")


def _order(playlist: PlaylistSettings, seed: str, cycle: int) -> list[int]:
    """The item order of one cycle: as listed, or a permutation fixed by (seed, cycle)."""
    order = list(range(len(playlist.prompts)))
    if playlist.order == "shuffle":
        # A str seed is hashed with SHA-512: the same order in every process and after restarts.
        random.Random(f"{seed}|{cycle}").shuffle(order)
    return order


def _position(playlist: PlaylistSettings, seed: str, started: datetime,
              t: datetime) -> tuple[int, int, datetime]:
    """(item index, cycle, item end) at `t` for a playlist playing since `started`; integer µs, no drift."""
    lengths = [round((item.seconds or playlist.item_seconds) * 1_000_000) or 1 for item in playlist.prompts]
    total = sum(lengths)
    elapsed = (t - started) // _US
    cycle, offset = divmod(elapsed, total)
    cycle_start = started + cycle * total * _US
    done = 0
    for index in _order(playlist, seed, cycle):
        done += lengths[index]
        if offset < done:
            return index, cycle, cycle_start + done * _US
    raise AssertionError("offset beyond the cycle")  # divmod keeps offset < total
