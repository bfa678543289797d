"""The programme in a running channel: it plays, reloads on SIGHUP and through the API, re-anchors."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

import yaml

from tests.channel import Channel, small_channel
from tests.servers import wait_until


def programme(prompt: str) -> dict:
    return {"playlists": {"all-day": {"prompts": [prompt], "item_seconds": 3600}},
            "windows": [{"name": "always", "start": "00:00", "end": "00:00", "playlist": "all-day",
                         "chat": False}],
            "autopilot": {"idle_seconds": 0}}


def on_air(channel: Channel) -> str:
    return json.loads(channel.get("/api/state", token="test-token-0123456789"))["prompt_on_air"]


def post(channel: Channel, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(channel.url(path), method="POST", data=b"",
                                     headers={"Authorization": "Bearer test-token-0123456789"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def rewrite(channel: Channel, schedule: dict | str) -> None:
    config = dict(channel.config)
    text = yaml.safe_dump({**config, "schedule": schedule}) if isinstance(schedule, dict) else (
        yaml.safe_dump(config) + schedule)
    channel.config_path.write_text(text)


def test_the_programme_plays_and_a_sighup_swaps_it_without_restarting_the_stream(tmp_path):
    config = small_channel(tmp_path, [], schedule=programme("a lighthouse in a winter storm"))
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: on_air(channel) == "a lighthouse in a winter storm", 20, message=channel.logs())
        pid = channel.health()["engine"]["pid"]
        frames = channel.metrics()["promptcast_frames_output_total"]
        rewrite(channel, programme("a paper boat on a rainy street"))

        channel.process.send_signal(signal.SIGHUP)

        wait_until(lambda: on_air(channel) == "a paper boat on a rainy street", 20, message=channel.logs())
        schedule = json.loads(channel.get("/api/schedule", token="test-token-0123456789"))
        health = channel.health()
        metrics = channel.metrics()
        assert health["engine"]["pid"] == pid and health["engine"]["restarts"] == 0
        assert metrics["promptcast_frames_output_total"] > frames
    assert health["schedule"]["window"] == "always"
    assert metrics["promptcast_autopilot_engaged"] == 1 and metrics["promptcast_chat_steering_enabled"] == 0
    assert (schedule["window"], schedule["prompt"], schedule["chat"]) == ("always", "a paper boat on a rainy "
                                                                          "street", False)


def test_a_broken_schedule_is_refused_by_the_reload_api_with_its_line_and_the_programme_stays(tmp_path):
    config = small_channel(tmp_path, [], schedule=programme("a lighthouse in a winter storm"))
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: on_air(channel) == "a lighthouse in a winter storm", 20, message=channel.logs())
        rewrite(channel, "schedule:\n  timezone: Europe/Berln\n")

        status, answer = post(channel, "/api/schedule/reload")
        schedule = json.loads(channel.get("/api/schedule", token="test-token-0123456789"))

    assert status == 422 and answer["reloaded"] is False
    assert any("schedule.timezone" in p and "Europe/Berln" in p and p.startswith("line ")
               for p in answer["problems"]), answer
    assert schedule["prompt"] == "a lighthouse in a winter storm"


def test_a_window_boundary_switches_with_a_soft_reanchor(tmp_path):
    first = programme("a lighthouse in a winter storm")
    with Channel(tmp_path, small_channel(tmp_path, [], schedule=first)) as channel:
        wait_until(lambda: on_air(channel) == "a lighthouse in a winter storm", 20, message=channel.logs())
        # A reload that changes the window in effect is a boundary, like the clock reaching one.
        second = programme("a paper boat on a rainy street")
        second["windows"][0]["name"] = "another"
        rewrite(channel, second)
        status, _ = post(channel, "/api/schedule/reload")
        wait_until(lambda: channel.metrics().get("promptcast_reanchors_total", 0) >= 1, 20,
                   message=channel.logs())
        wait_until(lambda: on_air(channel) == "a paper boat on a rainy street", 20)
    assert status == 200


def test_reanchor_api_renews_the_sink_at_the_next_block(tmp_path):
    with Channel(tmp_path, small_channel(tmp_path, [])) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 20)
        status, answer = post(channel, "/api/reanchor")
        wait_until(lambda: channel.metrics().get("promptcast_reanchors_total", 0) >= 1, 20,
                   message=channel.logs())
    assert status == 200 and answer["action"] == "reanchor"


def test_schedule_reload_on_the_embedded_config_is_refused_as_a_conflict(tmp_path):
    from broadcaster.service import Service
    from broadcaster.settings import Settings

    ok, problems = asyncio.run(Service(Settings()).reload_schedule())

    assert not ok and "no file to re-read" in problems[0]


def test_a_boundary_while_chat_has_the_channel_reanchors_without_a_switch(tmp_path):
    chatty = programme("a lighthouse in a winter storm")
    chatty["windows"][0]["chat"] = True
    chatty["autopilot"] = {"idle_seconds": 3600}  # chat is not idle: the programme does not play
    with Channel(tmp_path, small_channel(tmp_path, [], schedule=chatty)) as channel:
        wait_until(lambda: channel.health()["engine"]["state"] == "running", 20)
        chatty["windows"][0]["name"] = "evening"
        rewrite(channel, chatty)
        status, _ = post(channel, "/api/schedule/reload")
        wait_until(lambda: channel.metrics().get("promptcast_reanchors_total", 0) >= 1, 20,
                   message=channel.logs())
        metrics = channel.metrics()
    assert status == 200
    assert metrics.get("promptcast_prompt_switches_total", 0) == 0
