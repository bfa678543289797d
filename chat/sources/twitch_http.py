"""The HTTP session a Twitch source hands to twitchio: Twitch's URLs moved to the configured ones.

twitchio builds every Helix and OAuth URL from class attributes (`twitchio.http.Route.BASE`/`ID_BASE`)
that are shared by the whole process. Rather than change those, each source gives its client an aiohttp
session (a public `twitchio.Client(session=...)` option) whose requests are rebased on the way out, so
two sources in one process can talk to different servers (Twitch, the Twitch CLI's mocks, a test fake).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from yarl import URL

TWITCH_API = "https://api.twitch.tv/helix"
TWITCH_AUTH = "https://id.twitch.tv/oauth2"
TWITCH_EVENTSUB = "wss://eventsub.wss.twitch.tv/ws"
_SUBSCRIPTIONS = "eventsub/subscriptions"


class Rebase:
    """Maps a URL under Twitch's Helix or OAuth root to the same path under the configured root."""

    def __init__(self, api_url: str, auth_url: str, eventsub_api_url: str = "") -> None:
        subscriptions = (eventsub_api_url or api_url).rstrip("/")
        self._rules = [  # most specific first
            (f"{TWITCH_API}/{_SUBSCRIPTIONS}", f"{subscriptions}/{_SUBSCRIPTIONS}"),
            (f"{TWITCH_API}/", f"{api_url.rstrip('/')}/"),
            (f"{TWITCH_AUTH}/", f"{auth_url.rstrip('/')}/"),
        ]

    def __call__(self, url: str) -> str:
        for twitch, ours in self._rules:
            if url.startswith(twitch):
                return ours + url[len(twitch):]
        return url


def rebased_session(rebase: Rebase) -> aiohttp.ClientSession:
    """A session whose requests to Twitch's Helix/OAuth roots go where `rebase` says."""

    class _Request(aiohttp.ClientRequest):
        def __init__(self, method: str, url: URL, *args: Any, **kwargs: Any) -> None:
            moved = rebase(str(url))
            super().__init__(method, url if moved == str(url) else URL(moved, encoded=True), *args, **kwargs)

    return aiohttp.ClientSession(request_class=_Request)
