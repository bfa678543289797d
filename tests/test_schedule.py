"""The programme as pure logic: windows, priority, midnight, DST, positions, shuffle; its config errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml

from broadcaster.schedule import EPOCH, Programme, ScheduleSettings
from broadcaster.settings import ConfigError, parse_settings

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
MINUTE = timedelta(minutes=1)

# One programme in two time zones. Berlin springs forward on Sunday 2026-03-29 at 02:00 CET
# (01:00 UTC): 02:00-03:00 local does not exist that night. New York is on EDT all that week.
WEEK_PROGRAMME = """
schedule:
  timezone: Europe/Berlin
  default_playlist: fallback
  playlists:
    gap: {prompts: [a lantern in the fog], item_seconds: 3600}
    night: {prompts: [stars over a lake, aurora], item_seconds: 3600, style: long exposure}
    nyc: {prompts: [yellow cabs in the rain], item_seconds: 3600}
    evening: {prompts: [a harbour at dusk, lanterns], item_seconds: 3600}
    day: {prompts: [a busy market, a quiet library], item_seconds: 3600}
    fallback: {prompts: [drifting clouds], item_seconds: 3600}
  windows:
    - {name: gap, days: [sun], start: '02:30', end: '04:00', playlist: gap}
    - {name: night, start: '22:00', end: '06:00', playlist: night, chat: false}
    - {name: nyc-lunch, days: [mon, tue, wed, thu, fri], start: '12:00', end: '13:00',
       timezone: America/New_York, playlist: nyc}
    - {name: evening, start: '18:00', end: '22:00', playlist: evening, mode: vote}
    - {name: day, days: [mon, tue, wed, thu, fri], start: '09:00', end: '18:00', playlist: day, mode: queue}
"""

WEEK_START = datetime(2026, 3, 23, tzinfo=UTC)  # Monday
WEEK_END = datetime(2026, 3, 30, tzinfo=UTC)


def _weekday_timeline(day: int) -> list[tuple[datetime, str | None]]:
    """Monday 23 .. Friday 27 March, in UTC (Berlin is UTC+1, New York UTC-4)."""
    at = lambda hour: datetime(2026, 3, day, hour, tzinfo=UTC)  # noqa: E731
    return [(at(5), None), (at(8), "day"), (at(16), "nyc-lunch"), (at(17), "evening"), (at(21), "night")]


# What is on air from each instant on, written out by hand: the specification of the week.
TIMELINE: list[tuple[datetime, str | None]] = [
    (datetime(2026, 3, 22, 21, tzinfo=UTC), "night"),  # Sunday 22:00 CET
    *[entry for day in range(23, 28) for entry in _weekday_timeline(day)],
    (datetime(2026, 3, 28, 5, tzinfo=UTC), None),  # Saturday: no day windows
    (datetime(2026, 3, 28, 17, tzinfo=UTC), "evening"),
    (datetime(2026, 3, 28, 21, tzinfo=UTC), "night"),  # Saturday 22:00 CET ...
    (datetime(2026, 3, 29, 1, 30, tzinfo=UTC), "gap"),  # 02:30 does not exist: 03:30 CEST
    (datetime(2026, 3, 29, 2, tzinfo=UTC), "night"),  # 04:00 CEST
    (datetime(2026, 3, 29, 4, tzinfo=UTC), None),  # ... to Sunday 06:00 CEST: 7 hours of night
    (datetime(2026, 3, 29, 16, tzinfo=UTC), "evening"),  # 18:00 CEST
    (datetime(2026, 3, 29, 20, tzinfo=UTC), "night"),  # 22:00 CEST
]


def _expected(t: datetime) -> str | None:
    return [window for start, window in TIMELINE if start <= t][-1]


def schedule(text: str) -> ScheduleSettings:
    """Schedule settings through the real loader."""
    return parse_settings(text, env={}).schedule


def programme(**fields) -> Programme:
    """A Programme from plain fields (one playlist 'p' unless given)."""
    fields.setdefault("playlists", {"p": {"prompts": ["one", "two", "three"]}})
    return Programme(ScheduleSettings.model_validate(fields))


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def berlin(*args) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, env={})
    return [str(p) for p in caught.value.problems]


# --- a whole week --------------------------------------------------------------------------------


def test_a_week_in_two_time_zones_across_a_dst_change_plays_the_timetable_at_every_boundary():
    week = Programme(schedule(WEEK_PROGRAMME))
    playlists = week.settings.playlists
    boundaries = week.boundaries(WEEK_START, WEEK_END)

    assert boundaries == [start for start, _ in TIMELINE if WEEK_START <= start < WEEK_END]
    for boundary in boundaries:
        for t in (boundary - MINUTE, boundary, boundary + MINUTE):
            slot = week.at(t)
            assert slot.window == _expected(t), t
            assert slot.playlist == (slot.window or "fallback").replace("nyc-lunch", "nyc"), t
        opened = week.at(boundary)
        if opened.window is not None and opened.window_key[2] == boundary.isoformat():
            first = playlists[opened.playlist].prompts[0].prompt
            assert (opened.item_index, opened.prompt.split(",")[0]) == (0, first), boundary
    # After the gap the night resumes where its clock says: 5 hours in, with 1-hour items.
    assert week.at(utc(2026, 3, 29, 2)).prompt == "aurora, long exposure"


def test_the_timetable_holds_all_week_not_only_at_boundaries():
    week = Programme(schedule(WEEK_PROGRAMME))
    t = WEEK_START
    while t < WEEK_END:
        assert week.at(t).window == _expected(t), t
        t += 7 * MINUTE


def test_the_window_key_changes_exactly_at_the_boundaries_of_the_week():
    week = Programme(schedule(WEEK_PROGRAMME))
    changes = []
    previous = week.at(WEEK_START).window_key
    t = WEEK_START
    while t < WEEK_END:
        key = week.at(t).window_key
        if key != previous:
            changes.append(t)
        previous = key
        t += 5 * MINUTE

    assert changes == week.boundaries(WEEK_START + MINUTE, WEEK_END)


def test_next_change_is_the_next_boundary_that_changes_the_window():
    week = Programme(schedule(WEEK_PROGRAMME))

    assert week.next_change(utc(2026, 3, 23, 12)) == utc(2026, 3, 23, 16)
    assert week.next_change(utc(2026, 3, 28, 6)) == utc(2026, 3, 28, 17)  # Saturday: default until evening
    assert week.next_change(utc(2026, 3, 23, 16)) == utc(2026, 3, 23, 17)


# --- daylight saving time --------------------------------------------------------------------------


def test_a_window_starts_at_the_same_wall_time_on_both_sides_of_the_change():
    week = Programme(schedule(WEEK_PROGRAMME))

    saturday, sunday = utc(2026, 3, 28, 17), utc(2026, 3, 29, 16)
    assert week.at(saturday).window == week.at(sunday).window == "evening"
    assert week.at(saturday - MINUTE).window is None and week.at(sunday - MINUTE).window is None
    assert saturday.astimezone(BERLIN).hour == sunday.astimezone(BERLIN).hour == 18


def test_a_start_in_the_spring_forward_gap_begins_at_the_wall_time_an_hour_later():
    week = Programme(schedule(WEEK_PROGRAMME))

    [start, end] = [b for b in week.boundaries(utc(2026, 3, 29), utc(2026, 3, 29, 3))
                    if week.at(b).window == "gap" or week.at(b - MINUTE).window == "gap"]
    assert start == utc(2026, 3, 29, 1, 30)
    assert start.astimezone(BERLIN).strftime("%H:%M %Z") == "03:30 CEST"
    assert end.astimezone(BERLIN).strftime("%H:%M %Z") == "04:00 CEST"


def test_a_window_in_the_gap_the_week_before_starts_at_its_wall_time():
    week = Programme(schedule(WEEK_PROGRAMME))

    assert week.at(berlin(2026, 3, 22, 2, 30)).window == "gap"
    assert week.at(berlin(2026, 3, 22, 2, 29)).window == "night"


def test_an_ambiguous_fall_back_time_is_its_first_occurrence():
    # New York falls back on Sunday 2026-11-01: 01:00-02:00 EDT, then 01:00-02:00 EST again.
    early = programme(timezone="America/New_York",
                      windows=[{"name": "early", "start": "01:30", "end": "03:00", "playlist": "p"}])

    starts = [b for b in early.boundaries(utc(2026, 10, 31), utc(2026, 11, 3)) if early.at(b).window]
    assert starts == [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    assert starts[1].astimezone(NEW_YORK).strftime("%H:%M %Z") == "01:30 EDT"
    assert early.at(utc(2026, 11, 1, 7, 59)).window == "early"  # until 03:00 EST: 2.5 hours that night
    assert early.at(utc(2026, 11, 1, 8)).window is None


# --- windows -------------------------------------------------------------------------------------


def test_a_window_that_crosses_midnight_is_found_from_the_day_after():
    night = programme(windows=[{"name": "n", "days": ["fri"], "start": "22:00", "end": "06:00",
                                "playlist": "p"}])

    assert night.at(utc(2026, 3, 27, 21, 59)).window is None  # Friday
    assert night.at(utc(2026, 3, 27, 22)).window == "n"
    assert night.at(utc(2026, 3, 28, 5, 59)).window == "n"  # Saturday morning: Friday's window
    assert night.at(utc(2026, 3, 28, 6)).window is None
    assert night.at(utc(2026, 3, 28, 23)).window is None  # no window starts on Saturday


def test_an_end_equal_to_the_start_means_24_hours():
    daily = programme(windows=[{"name": "all-day", "days": ["mon"], "start": "12:00", "end": "12:00",
                                "playlist": "p"}])

    assert daily.at(utc(2026, 3, 23, 11, 59)).window is None
    assert daily.at(utc(2026, 3, 24, 11, 59)).window == "all-day"
    assert daily.at(utc(2026, 3, 24, 12)).window is None


def test_an_end_of_24_00_is_midnight_at_the_end_of_the_day():
    late = programme(windows=[{"name": "late", "start": "20:00", "end": "24:00", "playlist": "p"}])

    assert late.at(utc(2026, 3, 23, 23, 59)).window == "late"
    assert late.at(utc(2026, 3, 24)).window is None


def test_the_first_open_window_in_list_order_wins():
    cascade = programme(windows=[
        {"name": "special", "days": ["wed"], "start": "10:00", "end": "11:00", "playlist": "p"},
        {"name": "general", "start": "08:00", "end": "20:00", "playlist": "p"},
    ])

    assert cascade.at(utc(2026, 3, 25, 10, 30)).window == "special"  # a Wednesday
    assert cascade.at(utc(2026, 3, 24, 10, 30)).window == "general"  # a Tuesday
    assert cascade.at(utc(2026, 3, 25, 11)).window == "general"


def test_a_window_uses_its_own_time_zone_over_the_schedules():
    mixed = programme(timezone="Europe/Berlin",
                      windows=[{"name": "ny", "start": "09:00", "end": "10:00",
                                "timezone": "America/New_York", "playlist": "p"}])

    assert mixed.at(utc(2026, 3, 23, 13)).window == "ny"  # 09:00 EDT
    assert mixed.at(utc(2026, 3, 23, 8)).window is None  # 09:00 CET


def test_no_open_window_plays_the_default_playlist():
    slot = programme(default_playlist="p").at(utc(2026, 3, 23, 12))

    assert (slot.window, slot.playlist, slot.chat, slot.mode) == (None, "p", True, None)
    assert slot.prompt in {"one", "two", "three"}


def test_without_a_default_playlist_nothing_is_programmed_between_windows():
    slot = programme().at(utc(2026, 3, 23, 12))

    assert (slot.window, slot.playlist, slot.prompt, slot.item_key) == (None, None, None, None)
    assert slot.chat is True and slot.ends_at is None


def test_a_window_carries_its_chat_policy_and_mode():
    quiet = programme(windows=[{"name": "q", "start": "00:00", "end": "24:00", "playlist": "p", "chat": False,
                                "mode": "manual"}])

    slot = quiet.at(utc(2026, 3, 23, 12))
    assert (slot.chat, slot.mode) == (False, "manual")


# --- what plays within a window ------------------------------------------------------------------


def test_items_play_in_turn_for_their_seconds_from_the_window_start():
    show = programme(playlists={"p": {"prompts": [{"prompt": "short", "seconds": 30}, "long"],
                                      "item_seconds": 90}},
                     windows=[{"name": "w", "start": "10:00", "end": "12:00", "playlist": "p"}])
    start = utc(2026, 3, 23, 10)

    assert [show.at(start + timedelta(seconds=s)).prompt for s in (0, 29, 30, 119, 120, 150)] == [
        "short", "short", "long", "long", "short", "long"]


def test_the_style_anchor_is_appended_to_every_prompt():
    styled = programme(playlists={"p": {"prompts": ["a red fox"], "style": "watercolor, soft light"}},
                       default_playlist="p")

    assert styled.at(utc(2026, 3, 23)).prompt == "a red fox, watercolor, soft light"


def test_the_position_comes_from_the_time_so_a_restarted_channel_resumes_at_the_same_item():
    fields = {"playlists": {"p": {"prompts": ["one", "two", "three"], "item_seconds": 60}},
              "windows": [{"name": "w", "start": "10:00", "end": "12:00", "playlist": "p"}],
              "default_playlist": "p"}
    t = utc(2026, 3, 23, 10, 4, 30)

    before, after = programme(**fields).at(t), programme(**fields).at(t)
    assert before == after
    assert before.prompt == "two"  # 4.5 min in: one, two, three, one, *two*
    later = utc(2026, 3, 23, 12, 2)  # the default playlist has been cycling since 1970
    assert programme(**fields).at(later).prompt == ["one", "two", "three"][(later - EPOCH) // MINUTE % 3]


def test_ends_at_is_the_earlier_of_the_item_end_and_the_window_end():
    show = programme(playlists={"p": {"prompts": ["one", "two"], "item_seconds": 3600}},
                     windows=[{"name": "w", "start": "10:00", "end": "10:30", "playlist": "p"},
                              {"name": "x", "start": "10:30", "end": "14:00", "playlist": "p"}])

    assert show.at(utc(2026, 3, 23, 10, 10)).ends_at == utc(2026, 3, 23, 10, 30)
    assert show.at(utc(2026, 3, 23, 10, 40)).ends_at == utc(2026, 3, 23, 11, 30)


def test_the_item_key_changes_with_the_item_the_cycle_and_the_occurrence():
    single = programme(playlists={"p": {"prompts": ["only"], "item_seconds": 600}},
                       windows=[{"name": "w", "start": "00:00", "end": "24:00", "playlist": "p"}])
    t = utc(2026, 3, 23, 23, 40)

    assert single.at(t).item_key == single.at(t + timedelta(minutes=9)).item_key
    assert single.at(t).item_key != single.at(t + timedelta(minutes=10)).item_key  # next cycle
    midnight = utc(2026, 3, 24)
    assert single.at(midnight - MINUTE).window_key != single.at(midnight).window_key  # next occurrence


def test_shuffle_plays_every_item_once_per_cycle():
    shuffled = programme(playlists={"p": {"prompts": [f"item {i}" for i in range(6)], "order": "shuffle",
                                          "item_seconds": 60}},
                         windows=[{"name": "w", "start": "00:00", "end": "24:00", "playlist": "p"}])
    start = utc(2026, 3, 23)

    cycles = [[shuffled.at(start + timedelta(minutes=6 * c + i)).item_index for i in range(6)]
              for c in range(5)]
    assert all(sorted(cycle) == list(range(6)) for cycle in cycles)
    assert len({tuple(cycle) for cycle in cycles}) > 1  # a new order each cycle


def test_shuffle_is_reproducible():
    fields = {"playlists": {"p": {"prompts": [f"item {i}" for i in range(8)], "order": "shuffle"}},
              "default_playlist": "p"}
    times = [utc(2026, 3, 23) + timedelta(minutes=m) for m in range(0, 600, 7)]

    first, second = programme(**fields), programme(**fields)
    assert [first.at(t).prompt for t in times] == [second.at(t).prompt for t in times]


def test_a_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        programme().at(datetime(2026, 3, 23, 12))


def test_a_programme_without_windows_never_changes():
    assert programme(default_playlist="p").next_change(utc(2026, 3, 23)) is None
    assert programme().boundaries(utc(2026, 3, 23), utc(2026, 3, 30)) == []


# --- settings and their errors -------------------------------------------------------------------


def test_plain_strings_are_items_with_the_playlists_seconds():
    settings = ScheduleSettings.model_validate({"playlists": {"p": {"prompts": ["a", {"prompt": "b",
                                                                                       "seconds": 5}]}}})

    assert [(i.prompt, i.seconds) for i in settings.playlists["p"].prompts] == [("a", None), ("b", 5)]


def test_the_empty_schedule_is_the_default():
    assert schedule("schedule: {}\n") == ScheduleSettings()
    assert ScheduleSettings().autopilot.idle_seconds == 300


def test_every_schedule_field_has_a_description():
    from broadcaster import schedule as module

    for model in (module.PlaylistItem, module.PlaylistSettings, module.WindowSettings,
                  module.AutopilotSettings, module.ScheduleSettings):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


def test_an_unknown_time_zone_is_refused_at_its_line_with_a_suggestion():
    assert problems("channel: demo\nschedule:\n  timezone: Europe/Berln\n") == [
        "line 3: schedule.timezone: unknown time zone 'Europe/Berln'; did you mean 'Europe/Berlin'?"]


def test_an_unknown_window_time_zone_is_refused_at_its_line():
    text = """schedule:
  playlists: {p: {prompts: [a]}}
  windows:
    - name: w
      start: '10:00'
      end: '11:00'
      timezone: Mars/Olympus
      playlist: p
"""
    [problem] = problems(text)

    assert problem.startswith("line 7: schedule.windows[0].timezone: unknown time zone 'Mars/Olympus'")


def test_an_unknown_playlist_is_refused_at_the_line_of_the_window_that_names_it():
    text = """schedule:
  playlists:
    calm: {prompts: [a lake]}
  windows:
    - {name: morning, start: '06:00', end: '09:00', playlist: calm}
    - name: evening
      start: '18:00'
      end: '22:00'
      playlist: lively
"""
    assert problems(text) == [
        "line 9: schedule.windows[1].playlist: window 'evening' names unknown playlist 'lively' "
        "(playlists: calm)"]


def test_an_unknown_default_playlist_is_refused_at_its_line():
    assert problems("schedule:\n  playlists: {a: {prompts: [x]}}\n  default_playlist: b\n") == [
        "line 3: schedule.default_playlist: unknown playlist 'b' (playlists: a)"]


@pytest.mark.parametrize("value, message", [
    ("'25:00'", "'25:00' is not a time of day: write HH:MM, 00:00 to 23:59"),
    ("'7am'", "'7am' is not a time of day: write HH:MM, 00:00 to 23:59"),
    ("'24:00'", "'24:00' is not a time of day: write HH:MM, 00:00 to 23:59"),
    ("18:30", "write the time in quotes, e.g. '18:30' (YAML read this as the number 1110)"),
])
def test_a_bad_start_time_is_refused_at_its_line(value, message):
    text = (f"schedule:\n  playlists: {{p: {{prompts: [a]}}}}\n  windows:\n    - name: w\n"
            f"      start: {value}\n      end: '10:00'\n      playlist: p\n")

    assert problems(text) == [f"line 5: schedule.windows[0].start: {message}"]


def test_an_end_of_24_00_is_accepted_and_times_are_normalised():
    window = schedule("schedule:\n  playlists: {p: {prompts: [a]}}\n"
                      "  windows: [{name: w, start: '6:05', end: '24:00', playlist: p}]\n").windows[0]

    assert (window.start, window.end) == ("06:05", "24:00")


def test_duplicate_window_names_are_refused_at_the_second_one():
    text = """schedule:
  playlists: {p: {prompts: [a]}}
  windows:
    - {name: w, start: '01:00', end: '02:00', playlist: p}
    - {name: w, start: '03:00', end: '04:00', playlist: p}
"""
    assert problems(text) == ["line 5: schedule.windows[1].name: duplicate window name 'w'"]


def test_a_day_listed_twice_is_refused():
    text = "schedule:\n  playlists: {p: {prompts: [a]}}\n" \
           "  windows:\n    - {name: w, days: [mon, tue, mon], start: '01:00', end: '02:00', playlist: p}\n"

    [problem] = problems(text)
    assert problem == "line 4: schedule.windows[0].days: day listed twice: mon"


def test_an_empty_playlist_is_refused():
    [problem] = problems("schedule:\n  playlists:\n    p:\n      prompts: []\n")

    assert problem.startswith("line 4: schedule.playlists.p.prompts: ")


def test_every_schedule_problem_is_reported_at_once():
    text = yaml.safe_dump({"schedule": {
        "playlists": {"p": {"prompts": ["a"]}},
        "windows": [{"name": "w", "start": "10:00", "end": "11:00", "playlist": "nope"},
                    {"name": "w", "start": "12:00", "end": "13:00", "playlist": "nada"}],
        "default_playlist": "zilch"}})

    assert len(problems(text)) == 4
