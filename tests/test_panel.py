"""The control panel and the OBS overlays in real headless Chromium against a real `promptcast run`.

One channel and one browser serve the whole module (2-core budget). With
PROMPTCAST_DOC_SCREENSHOTS=1 the tests also write docs/img/{panel,overlay-poll,overlay-now}.png.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.channel import Channel, small_channel
from tests.servers import wait_until

pytestmark = pytest.mark.servers

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

CHROMIUM = os.environ.get("PROMPTCAST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync"]
TOKEN = "test-token-0123456789"
DOC_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
DOC_SHOTS = os.environ.get("PROMPTCAST_DOC_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1280, "height": 720}
# From the POST's answer to the overlay's DOM: the event stream reads steering 4x a second and
# at once after an API call.
OVERLAY_DEADLINE_MS = 500
VIDEO_PLAYS = "() => document.getElementById('preview-video').videoWidth > 0"
COUNTDOWN = re.compile(r"^0:[0-3]\d$")


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("panel")
    vote = {"round_seconds": 30, "min_suggestions": 2, "options": 2}
    config = small_channel(tmp, [{"kind": "hls", "dir": str(tmp / "hls")}],
                           chat={"mode": "vote", "vote": vote},
                           server={"ice_loopback": True})  # the WHEP preview: browser and server on one host
    with Channel(tmp, config) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (set PROMPTCAST_CHROMIUM)")
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser):
    """Pages in a fresh context (own localStorage); uncaught page errors fail the test."""
    contexts, errors = [], []

    def make(token: str | None = None):
        context = browser.new_context(viewport=VIEWPORT)
        if token is not None:
            context.add_init_script(f"localStorage.setItem('promptcast.apiToken', {json.dumps(token)})")
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(error))
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, errors


def _request(channel: Channel, path: str, body: dict | None = None,
             token: str | None = TOKEN) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(channel.url(path), data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _say(channel: Channel, login: str, text: str) -> None:
    status, body = _request(channel, f"/api/chat?login={login}", {"text": text})
    assert status == 202, body


def _state(channel: Channel) -> dict:
    return json.loads(_request(channel, "/api/state")[1])


def _on_air(channel: Channel) -> str:
    return _state(channel)["prompt_on_air"]


def _transparent_corners(png: bytes) -> list[int]:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGBA")
    w, h = image.size
    return [image.getpixel(xy)[3] for xy in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))]


def _doc_shot(name: str, png: bytes) -> None:
    if DOC_SHOTS:
        DOC_IMG.mkdir(parents=True, exist_ok=True)
        (DOC_IMG / name).write_bytes(png)
        assert len(png) < 300_000, f"{name} is {len(png)} bytes"


def test_the_panel_asks_for_the_token_then_shows_what_is_on_air(channel, new_page):
    page = new_page()
    page.goto(channel.url("/"))
    expect(page.locator("#token-dialog")).to_be_visible()
    page.fill("#token-input", "not-the-token")
    page.click("#token-submit")
    expect(page.locator("#token-error")).to_have_text("Wrong token.")
    page.fill("#token-input", TOKEN)
    page.click("#token-submit")
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#now-text")).to_have_text(_state(channel)["prompt_on_air"])
    assert page.evaluate("localStorage.getItem('promptcast.apiToken')") == TOKEN
    page.reload()  # asked once: kept in this browser
    expect(page.locator("#now-text")).to_have_text(_state(channel)["prompt_on_air"])
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#health")).to_have_text("healthy")
    expect(page.locator("#outputs tr[data-output='hls-0'] td").nth(2)).to_have_text("yes")


def test_the_preview_plays_over_whep(channel, new_page):
    page = new_page()  # the preview-only view (an OBS Browser Source) asks for no token
    page.goto(channel.url("/?view=preview"))
    page.wait_for_function(VIDEO_PLAYS, timeout=20_000)
    expect(page.locator("#preview-status")).to_have_text("")
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#prompt-form")).to_be_hidden()


def test_the_panel_says_preview_unavailable_without_whep(channel, new_page):
    page = new_page(TOKEN)
    page.route("**/whep", lambda route: route.fulfill(status=404, content_type="application/json",
                                                      body='{"error": "not found"}'))
    page.goto(channel.url("/"))
    expect(page.locator("#preview-status")).to_contain_text("preview unavailable")
    expect(page.locator("#now-text")).not_to_have_text("—")  # the rest of the panel works


def test_a_prompt_sent_from_the_panel_reaches_the_air(channel, new_page):
    page = new_page(TOKEN)
    page.goto(channel.url("/"))
    page.fill("#prompt-input", "a storm over the ocean")
    page.click("#prompt-send")
    expect(page.locator("#messages")).to_contain_text("queued: a storm over the ocean")
    wait_until(lambda: _on_air(channel) == "a storm over the ocean", 15, message=channel.logs())
    expect(page.locator("#now-text")).to_have_text("a storm over the ocean")
    expect(page.locator("#now-by")).to_have_text("panel")


def test_moderator_buttons_call_the_api(channel, new_page):
    page = new_page(TOKEN)
    page.goto(channel.url("/"))
    expect(page.locator("#btn-resume")).to_be_disabled()
    page.click("#btn-pause")
    wait_until(lambda: _state(channel)["steering"]["paused"], 5)
    expect(page.locator("#paused-badge")).to_be_visible()
    page.click("#btn-resume")
    wait_until(lambda: not _state(channel)["steering"]["paused"], 5)
    expect(page.locator("#paused-badge")).to_be_hidden()
    page.click("#btn-veto")  # nothing queued: the server's reason shows in the page
    expect(page.locator("#messages .message.error")).to_contain_text("nothing to veto: the queue is empty")


def test_a_refused_token_is_asked_for_again(channel, new_page):
    page = new_page("a-stale-token")
    page.goto(channel.url("/"))
    expect(page.locator("#token-dialog")).to_be_visible()  # the first /api/state answered 401
    expect(page.locator("#token-error")).to_contain_text("refused the token")


def test_the_poll_overlay_shows_a_chat_vote_at_once(channel, new_page):
    overlay = new_page()  # no token: overlays are read-only
    overlay.goto(channel.url("/overlay/poll"))
    _say(channel, "alice", "!prompt a red fox in the snow")
    _say(channel, "bob", "!prompt a blue whale in the deep sea")
    options = overlay.locator("#options li")
    expect(options).to_have_count(2, timeout=10_000)
    expect(options.nth(0).locator(".text")).to_have_text("a red fox in the snow")
    expect(overlay.locator("#hint")).to_have_text("type !vote 1–2 in chat")
    expect(overlay.locator("#countdown")).to_have_text(COUNTDOWN)

    votes = overlay.locator('#options li[data-n="1"] .votes')
    expect(votes).to_have_text("0")
    _say(channel, "carol", "!vote 1")
    started = time.monotonic()
    expect(votes).to_have_text("1", timeout=OVERLAY_DEADLINE_MS)
    shown_after = time.monotonic() - started
    print(f"the vote reached the overlay {shown_after * 1000:.0f} ms after the POST answered")
    assert shown_after < OVERLAY_DEADLINE_MS / 1000 + 0.1  # the wait itself, plus Playwright's own round trip
    for voter in ("dave", "erin"):
        _say(channel, voter, "!vote 2")
    expect(overlay.locator('#options li[data-n="2"] .votes')).to_have_text("2")

    png = overlay.screenshot(omit_background=True)
    assert _transparent_corners(png) == [0, 0, 0, 0]
    _doc_shot("overlay-poll.png", png)
    if DOC_SHOTS:  # the panel mid-round makes the best picture
        panel = new_page(TOKEN)
        panel.goto(channel.url("/"))
        expect(panel.locator("#round-options li")).to_have_count(2)
        panel.wait_for_function(VIDEO_PLAYS, timeout=20_000)
        panel.wait_for_timeout(600)
        _doc_shot("panel.png", panel.screenshot(full_page=True))


def test_the_poll_overlay_names_the_winner_in_the_chosen_theme(channel, new_page):
    state = {"channel": "test", "mode": "vote", "paused": False, "queue": [], "pool_size": 0, "pool_rev": "",
             "vote_command": "!v", "server_time": time.time(), "now_playing": None,
             "round": {"id": "7", "closed": True, "closes_at": time.time() - 1, "total_votes": 5, "options": [
                 {"n": 1, "text": "a red fox", "by": "alice", "votes": 2, "vetoed": False},
                 {"n": 2, "text": "a blue whale", "by": "bob", "votes": 3, "vetoed": False}],
                 "winner": {"n": 2, "text": "a blue whale", "by": "bob", "votes": 3, "vetoed": False}}}
    overlay = new_page()
    overlay.route("**/events", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body=f"retry: 60000\nevent: state\ndata: {json.dumps(state)}\n\n"))
    overlay.goto(channel.url("/overlay/poll?theme=light&position=top&accent=%2300aaff&scale=0.8"))
    expect(overlay.locator("#winner")).to_be_visible()
    expect(overlay.locator("#winner-text")).to_have_text("a blue whale")
    expect(overlay.locator("#winner-by")).to_have_text("chosen by @bob")
    expect(overlay.locator("#countdown")).to_have_text("closed")
    expect(overlay.locator("#hint")).to_have_text("type !v 1–2 in chat")
    expect(overlay.locator('#options li[data-n="2"]')).to_have_class(re.compile(r"\bwon\b"))
    root = "getComputedStyle(document.documentElement).getPropertyValue"
    assert overlay.evaluate(f"{root}('--accent')") == "#00aaff"
    assert overlay.evaluate("document.documentElement.dataset.theme") == "light"
    box = overlay.locator("#poll").bounding_box()
    assert box["y"] < VIEWPORT["height"] / 2  # position=top


def test_the_now_overlay_shows_the_prompt_on_air(channel, new_page):
    assert _request(channel, "/api/prompt", {"prompt": "a lighthouse at dusk"})[0] == 202
    wait_until(lambda: _on_air(channel) == "a lighthouse at dusk", 15, message=channel.logs())
    overlay = new_page()
    overlay.goto(channel.url("/overlay/now?theme=dark&position=bottom&accent=%23ff4f9a&scale=1.2"))
    expect(overlay.locator("#now-text")).to_have_text("a lighthouse at dusk")
    expect(overlay.locator("#now-by")).to_have_text("chosen by the streamer")
    assert overlay.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--scale')") == "1.2"
    assert overlay.evaluate("getComputedStyle(document.body).backgroundColor") == "rgba(0, 0, 0, 0)"
    png = overlay.screenshot(omit_background=True)
    assert _transparent_corners(png) == [0, 0, 0, 0]
    _doc_shot("overlay-now.png", png)


def test_overlays_and_events_need_no_token_but_the_api_does(channel):
    for path in ("/overlay/poll", "/overlay/now", "/static/overlay.js", "/api/openapi.json"):
        status, _ = _request(channel, path, token=None)
        assert status == 200, path
    with urllib.request.urlopen(channel.url("/events"), timeout=5) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        head = stream.read1(4096) + stream.read1(4096)
    assert b"retry: 2000" in head
    status, body = _request(channel, "/api/state", token=None)
    assert status == 401 and b"bearer token" in body


def test_the_shipped_nginx_rtmp_config_is_valid():
    if shutil.which("nginx") is None or not Path("/usr/lib/nginx/modules/ngx_rtmp_module.so").exists():
        pytest.skip("nginx with libnginx-mod-rtmp is not installed")
    conf = Path(__file__).resolve().parent.parent / "config" / "nginx-rtmp.conf"
    check = subprocess.run(["nginx", "-t", "-e", "stderr", "-c", str(conf)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr
