"""A small fake of Twitch (OAuth, Helix, EventSub WebSocket) on a free localhost port.

Enough of Twitch for the real twitchio 3 client to log in, subscribe and read chat offline:

- OAuth: `POST /oauth2/token` (client_credentials, refresh_token), `GET /oauth2/validate`.
- Helix: `GET /helix/users`, `POST|GET|DELETE /helix/eventsub/subscriptions` (POST answers 202),
  `POST /helix/chat/messages` (recorded in `sent_messages`), `GET|POST /helix/channel_points/custom_rewards`,
  `PATCH /helix/channel_points/custom_rewards/redemptions`, `POST /helix/moderation/enforcements/status`
  (Check AutoMod Status: not permitted when a word of `automod_forbidden` appears in the text; checked
  texts in `automod_checks`; `automod_error_status` answers 429, 500, ... instead).
- EventSub WebSocket `/ws`: `session_welcome`, a `session_keepalive` every `keepalive_interval` seconds,
  `notification`s with Twitch's full field set, `session_reconnect` to a new URL (the old socket keeps
  receiving until the new one is welcomed, then it is closed), abrupt drops, and redelivery of a
  notification (EventSub is at-least-once).

Test API: `send_chat`, `redeliver`, `redeem`, `reconnect`, `revoke`, `drop`, `expire_token`, `wait_for`,
`sent_messages`, `connections`, `subscriptions`, `redemptions`, `rewards`, `refreshes`, `automod_forbidden`,
`automod_error_status`, `automod_checks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

CLIENT_ID = "fake-client-id"
CLIENT_SECRET = "fake-client-secret-DO-NOT-LOG"
BOT_TOKEN = "bot-token-DO-NOT-LOG"
BOT_REFRESH = "bot-refresh-DO-NOT-LOG"
BROADCASTER_TOKEN = "broadcaster-token-DO-NOT-LOG"
CHEER_PREFIXES = ("cheer", "biblethump", "cheerwhal", "corgo", "party")
_FRAGMENT = re.compile(r"(?<!\S)(?:(?P<prefix>" + "|".join(CHEER_PREFIXES) + r")(?P<bits>[1-9][0-9]{0,5})"
                       r"(?!\S)|@(?P<login>[A-Za-z0-9_]{1,25})\b)", re.IGNORECASE)
ALL_SCOPES = ("user:read:chat", "user:write:chat", "channel:manage:redemptions", "moderation:read")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Connection:
    """One EventSub WebSocket connection the fake accepted."""

    session_id: str
    path: str
    ws: web.WebSocketResponse
    transport: Any
    opened_at: float = field(default_factory=time.monotonic)
    welcomed: bool = False
    closed_at: float | None = None
    close_reason: str = ""
    notifications_sent: int = 0
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> subscription JSON
    keepalive_task: asyncio.Task[None] | None = None
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def open(self) -> bool:
        return self.closed_at is None and not self.ws.closed


@dataclass
class _PendingReconnect:
    old: Connection
    welcome_delay: float
    close_old: bool = True
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FakeTwitch:
    """Start with `await FakeTwitch.start()` (or `async with FakeTwitch() as fake`), stop with `close()`."""

    def __init__(self, *, channel: str = "streamer", bot: str = "promptbot",
                 keepalive_interval: float = 0.5, reconnect_grace: float = 30.0, port: int = 0) -> None:
        self.channel = channel
        self.bot = bot
        self.keepalive_interval = keepalive_interval
        self.reconnect_grace = reconnect_grace
        self._ids = itertools.count(1000)
        self.users: dict[str, dict[str, Any]] = {}  # login -> Helix user JSON
        self.tokens: dict[str, dict[str, Any]] = {}  # access token -> {user_id, login, scopes, valid}
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user id
        self.app_tokens: set[str] = set()
        self.refreshes = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every HTTP request
        self.sent_messages: list[dict[str, Any]] = []  # Send Chat Message bodies, with "time" added
        self.rewards: dict[str, dict[str, Any]] = {}
        self.redemptions: dict[str, dict[str, Any]] = {}
        self.connections: list[Connection] = []
        self.revoked: list[dict[str, Any]] = []  # subscriptions revoked by `revoke`, with their status
        self.user_badges: dict[str, list[str]] = {}  # login -> badges their messages carry (unless given)
        self.notifications: dict[str, dict[str, Any]] = {}  # event id -> the notification as sent
        self.refuse_connections_until = 0.0
        self._pending: dict[str, _PendingReconnect] = {}
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = port
        self.chat_error_status: int | None = None  # answer Send Chat Message with this error status
        self.echo_sent_messages = True  # as Twitch does: what the bot sends comes back as chat
        self.automod_forbidden: set[str] = set()  # AutoMod holds a text holding any of these (any case)
        self.automod_error_status: int | None = None  # answer Check AutoMod Status with this error status
        self.automod_checks: list[str] = []  # the texts Check AutoMod Status answered for
        self.broadcaster_id = self.add_user(channel)["id"]
        self.bot_id = self.add_user(bot)["id"]
        self.add_token(BOT_TOKEN, bot, refresh=BOT_REFRESH)
        self.add_token(BROADCASTER_TOKEN, channel)

    # ----- setup -----

    @classmethod
    async def start(cls, **kwargs: Any) -> FakeTwitch:
        fake = cls(**kwargs)
        await fake._start()
        return fake

    async def __aenter__(self) -> FakeTwitch:
        await self._start()
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._oauth_token)
        app.router.add_get("/oauth2/validate", self._oauth_validate)
        app.router.add_get("/helix/users", self._users)
        app.router.add_route("*", "/helix/eventsub/subscriptions", self._eventsub_subscriptions)
        app.router.add_post("/helix/chat/messages", self._chat_messages)
        app.router.add_route("*", "/helix/channel_points/custom_rewards", self._custom_rewards)
        app.router.add_patch("/helix/channel_points/custom_rewards/redemptions", self._redemptions)
        app.router.add_post("/helix/moderation/enforcements/status", self._automod_status)
        app.router.add_get("/ws", self._websocket)
        # no access log: OAuth request lines carry the client secret and refresh tokens in the query
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        for conn in self.connections:
            if conn.keepalive_task:
                conn.keepalive_task.cancel()
            if conn.open:
                with contextlib.suppress(Exception):
                    await conn.ws.close()
        for task in list(self._tasks):
            task.cancel()
        if self._runner:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        """Helix root, for `TwitchSourceSettings.api_url`."""
        return f"http://127.0.0.1:{self.port}/helix"

    @property
    def auth_url(self) -> str:
        """OAuth root, for `TwitchSourceSettings.auth_url`."""
        return f"http://127.0.0.1:{self.port}/oauth2"

    @property
    def eventsub_url(self) -> str:
        """EventSub WebSocket, for `TwitchSourceSettings.eventsub_url`."""
        return f"ws://127.0.0.1:{self.port}/ws"

    def add_user(self, login: str) -> dict[str, Any]:
        login = login.lower()
        if login not in self.users:
            self.users[login] = {
                "id": str(next(self._ids)),
                "login": login,
                "display_name": login.capitalize(),
                "type": "",
                "broadcaster_type": "affiliate",
                "description": "",
                "profile_image_url": f"http://127.0.0.1/{login}.png",
                "offline_image_url": "",
                "view_count": 0,
                "created_at": "2020-01-01T00:00:00Z",
            }
        return self.users[login]

    def add_token(self, token: str, login: str, *, refresh: str | None = None,
                  scopes: Iterable[str] = ALL_SCOPES) -> None:
        user = self.add_user(login)
        self.tokens[token] = {"user_id": user["id"], "login": user["login"], "scopes": list(scopes),
                              "valid": True}
        if refresh:
            self.refresh_tokens[refresh] = user["id"]

    def expire_token(self, token: str) -> None:
        """From now on the token answers 401 (as an expired one does); its refresh token still works."""
        self.tokens[token]["valid"] = False

    # ----- helpers for tests -----

    def open_connections(self) -> list[Connection]:
        return [c for c in self.connections if c.open and c.welcomed]

    def subscriptions(self, type_: str | None = None) -> list[dict[str, Any]]:
        """Subscriptions on open connections."""
        return [s for c in self.open_connections() for s in c.subscriptions.values()
                if type_ is None or s["type"] == type_]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0,
                       what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake twitch: timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async def wait_subscribed(self, type_: str = "channel.chat.message", count: int = 1,
                              timeout: float = 5.0) -> None:
        await self.wait_for(lambda: len(self.subscriptions(type_)) >= count, timeout, f"{count} x {type_}")

    async def send_chat(self, login: str, text: str, *, badges: Iterable[str | dict[str, str]] = (),
                        message_id: str | None = None, source_broadcaster: str | None = None,
                        reward_id: str | None = None, reply_to: str | None = None,
                        via: Connection | None = None) -> str:
        """Chat `text` as `login` in the channel; returns the message id.

        badges: set ids ("moderator", "subscriber", ...) or full {set_id, id, info} dicts.
        message_id: reuse one to send the same message again (a redelivery carries the same ids).
        source_broadcaster: in a shared chat session, the channel the message was typed in.
        reply_to: the id of the message this one answers (a thread reply).
        via: send it on this connection only (e.g. an old one after a reconnect), else where subscribed.
        """
        chatter = self.add_user(login)
        channel = self.users[self.channel]
        message_id = message_id or str(uuid.uuid4())
        badges = badges or self.user_badges.get(chatter["login"], ())
        fragments = self.fragments(text)
        bits = sum(f["cheermote"]["bits"] for f in fragments if f["type"] == "cheermote")
        source = self.add_user(source_broadcaster) if source_broadcaster else None
        event = {
            "broadcaster_user_id": channel["id"],
            "broadcaster_user_login": channel["login"],
            "broadcaster_user_name": channel["display_name"],
            "source_broadcaster_user_id": source["id"] if source else None,
            "source_broadcaster_user_login": source["login"] if source else None,
            "source_broadcaster_user_name": source["display_name"] if source else None,
            "chatter_user_id": chatter["id"],
            "chatter_user_login": chatter["login"],
            "chatter_user_name": chatter["display_name"],
            "message_id": message_id,
            "source_message_id": message_id if source else None,
            "is_source_only": False if source else None,
            "message": {"text": text, "fragments": fragments},
            "color": "#1E90FF",
            "badges": [_badge(b) for b in badges],
            "source_badges": [] if source else None,
            "message_type": "channel_points_highlighted" if reward_id else "text",
            "cheer": {"bits": bits} if bits else None,
            "reply": self._reply_data(reply_to),
            "channel_points_custom_reward_id": reward_id,
            "channel_points_animation_id": None,
        }
        await self._notify("channel.chat.message", event, event_id=message_id,
                           match=lambda cond: cond.get("broadcaster_user_id") == channel["id"], via=via)
        return message_id

    def fragments(self, text: str) -> list[dict[str, Any]]:
        """`text` cut into fragments as Twitch does: cheermotes (`Cheer100`: a known prefix and bits, as a
        word of its own), mentions (`@login` of a user Twitch knows), and text in between."""
        out: list[dict[str, Any]] = []

        def plain(piece: str) -> None:
            if not piece:
                return
            if out and out[-1]["type"] == "text":
                out[-1]["text"] += piece
            else:
                out.append({"type": "text", "text": piece, "cheermote": None, "emote": None, "mention": None})

        at = 0
        for match in _FRAGMENT.finditer(text):
            word, prefix, bits, login = match.group(0, "prefix", "bits", "login")
            if login is not None and login.lower() not in self.users:
                continue  # not a user: plain text
            plain(text[at:match.start()])
            if prefix is not None:
                out.append({"type": "cheermote", "text": word, "emote": None, "mention": None,
                            "cheermote": {"prefix": prefix.lower(), "bits": int(bits), "tier": 1}})
            else:
                user = self.users[login.lower()]
                out.append({"type": "mention", "text": word, "cheermote": None, "emote": None,
                            "mention": {"user_id": user["id"], "user_login": user["login"],
                                        "user_name": user["display_name"]}})
            at = match.end()
        plain(text[at:])
        return out or [{"type": "text", "text": "", "cheermote": None, "emote": None, "mention": None}]

    def _reply_data(self, parent_id: str | None) -> dict[str, str] | None:
        note = self.notifications.get(parent_id or "")
        if note is None:
            return None
        parent = note["payload"]["event"]
        return {
            "parent_message_id": parent["message_id"], "parent_message_body": parent["message"]["text"],
            "parent_user_id": parent["chatter_user_id"], "parent_user_name": parent["chatter_user_name"],
            "parent_user_login": parent["chatter_user_login"], "thread_message_id": parent["message_id"],
            "thread_user_id": parent["chatter_user_id"], "thread_user_name": parent["chatter_user_name"],
            "thread_user_login": parent["chatter_user_login"],
        }

    async def redeliver(self, event_id: str) -> None:
        """Send an earlier notification again, byte for byte (same metadata.message_id)."""
        note = self.notifications[event_id]
        type_ = note["metadata"]["subscription_type"]
        for conn in self._delivery_targets(type_, lambda cond: True):
            await self._send(conn, note)

    async def redeem(self, login: str, *, reward_id: str | None = None, user_input: str = "") -> str:
        """Redeem a custom reward (the only one if not named) as `login`; returns the redemption id."""
        if reward_id is None:
            (reward_id,) = self.rewards
        reward = self.rewards[reward_id]
        user = self.add_user(login)
        channel = self.users[self.channel]
        redemption_id = str(uuid.uuid4())
        redemption = {
            "id": redemption_id,
            "broadcaster_user_id": channel["id"],
            "broadcaster_user_login": channel["login"],
            "broadcaster_user_name": channel["display_name"],
            "user_id": user["id"],
            "user_login": user["login"],
            "user_name": user["display_name"],
            "user_input": user_input,
            "status": "unfulfilled",
            "reward": {"id": reward_id, "title": reward["title"], "cost": reward["cost"],
                       "prompt": reward["prompt"]},
            "redeemed_at": _now_iso(),
        }
        self.redemptions[redemption_id] = dict(redemption)
        await self._notify(
            "channel.channel_points_custom_reward_redemption.add", redemption, event_id=redemption_id,
            match=lambda cond: cond.get("broadcaster_user_id") == channel["id"]
            and cond.get("reward_id") in (None, "", reward_id))
        return redemption_id

    async def reconnect(self, *, welcome_delay: float = 0.0, close_old: bool = True) -> None:
        """Send `session_reconnect` on every open connection.

        Notifications keep going to the old connection until the client connects to the reconnect URL and
        is welcomed there (after `welcome_delay`); then the subscriptions move over and the old connection
        is closed (with `close_old=False` it stays open: a test may still send on it with `via=`, as a
        server that is slow to close it would). A client that never comes sees its old connection closed
        (4004) after `reconnect_grace`.
        """
        for old in self.open_connections():
            token = uuid.uuid4().hex
            self._pending[token] = _PendingReconnect(old, welcome_delay, close_old)
            await self._send(old, self._message("session_reconnect", {"session": {
                "id": old.session_id, "status": "reconnecting", "keepalive_timeout_seconds": None,
                "reconnect_url": f"{self.eventsub_url}?reconnect={token}", "connected_at": _now_iso(),
                "recovery_url": None}}))
            self._spawn(self._reconnect_grace(token))

    async def revoke(self, type_: str, status: str = "authorization_revoked") -> None:
        """Revoke every open subscription of `type_` with a `revocation` message (Twitch sends no more).

        `authorization_revoked` also makes the tokens of the subscription's user invalid, as a user
        disconnecting the app does: they answer 401 and cannot be refreshed.
        """
        for conn in self.open_connections():
            for sub_id, sub in list(conn.subscriptions.items()):
                if sub["type"] != type_:
                    continue
                del conn.subscriptions[sub_id]
                self.revoked.append({**sub, "status": status})
                await self.send_revocation(conn, sub, status)
                if status == "authorization_revoked":
                    user_id = sub["condition"].get("user_id") or sub["condition"].get("broadcaster_user_id")
                    for data in self.tokens.values():
                        if data["user_id"] == user_id:
                            data["valid"] = False
                    for refresh, owner in list(self.refresh_tokens.items()):
                        if owner == user_id:
                            del self.refresh_tokens[refresh]

    async def send_revocation(self, conn: Connection, sub: dict[str, Any], status: str) -> None:
        """Only the `revocation` message for `sub` on `conn` (what `revoke` sends; a test may repeat it)."""
        payload = {"subscription": {**sub, "status": status}}
        await self._send(conn, self._message("revocation", payload, subscription=sub))

    async def wait_reconnected(self, timeout: float = 5.0) -> None:
        """Until every pending `reconnect()` has completed."""
        await self.wait_for(lambda: not self._pending, timeout, "the reconnect")

    async def drop(self, *, refuse_for: float = 0.0) -> None:
        """Cut every connection abruptly (no close frame); refuse new ones for `refuse_for` seconds."""
        self.refuse_connections_until = time.monotonic() + refuse_for
        for conn in self.connections:
            if conn.open:
                conn.close_reason = "dropped"
                conn.closed_at = time.monotonic()
                if conn.keepalive_task:
                    conn.keepalive_task.cancel()
                conn.transport.abort()

    # ----- EventSub WebSocket -----

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("GET", request.path))
        if time.monotonic() < self.refuse_connections_until:
            return web.Response(status=503, text="unavailable")
        pending = self._pending.get(request.query.get("reconnect", ""))
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Connection(session_id=f"session-{uuid.uuid4().hex[:12]}", path=request.path_qs, ws=ws,
                          transport=request.transport)
        self.connections.append(conn)
        try:
            if pending is not None:
                await asyncio.sleep(pending.welcome_delay)
            keepalive = int(request.query.get("keepalive_timeout_seconds", "10"))
            await self._send(conn, self._message("session_welcome", {"session": {
                "id": conn.session_id, "status": "connected", "connected_at": _now_iso(),
                "keepalive_timeout_seconds": keepalive, "reconnect_url": None, "recovery_url": None}}))
            conn.welcomed = True
            if pending is not None:  # the subscriptions move over; the old connection is closed
                self._pending.pop(request.query["reconnect"], None)
                conn.subscriptions = pending.old.subscriptions
                pending.old.subscriptions = {}
                for sub in conn.subscriptions.values():
                    sub["transport"]["session_id"] = conn.session_id
                if pending.close_old:
                    await self._close(pending.old, "reconnected")
                pending.done.set()
            conn.keepalive_task = asyncio.create_task(self._keepalive(conn))
            async for msg in ws:  # clients may not send anything; Twitch closes them (4001)
                if msg.type == WSMsgType.TEXT:
                    await self._close(conn, "client sent a message", code=4001)
        finally:
            if conn.closed_at is None:
                conn.closed_at = time.monotonic()
                conn.close_reason = conn.close_reason or "client closed"
            if conn.keepalive_task:
                conn.keepalive_task.cancel()
        return ws

    async def _keepalive(self, conn: Connection) -> None:
        while conn.open:
            await asyncio.sleep(self.keepalive_interval)
            if conn.open:
                await self._send(conn, self._message("session_keepalive", {}))

    async def _reconnect_grace(self, token: str) -> None:
        await asyncio.sleep(self.reconnect_grace)
        pending = self._pending.pop(token, None)
        if pending is not None:
            await self._close(pending.old, "reconnect grace time expired", code=4004)

    async def close_connection(self, conn: Connection, reason: str, code: int = 1000) -> None:
        """Close one connection with a close frame, as Twitch does."""
        await self._close(conn, reason, code)

    async def _close(self, conn: Connection, reason: str, code: int = 1000) -> None:
        if conn.closed_at is None:
            conn.closed_at = time.monotonic()
            conn.close_reason = reason
        if conn.keepalive_task:
            conn.keepalive_task.cancel()
        with contextlib.suppress(Exception):
            async with conn.send_lock:
                await conn.ws.close(code=code, message=reason.encode())

    async def _send(self, conn: Connection, message: dict[str, Any]) -> None:
        if not conn.open:
            return
        with contextlib.suppress(Exception):  # a connection dying under us is the test's business
            async with conn.send_lock:
                await conn.ws.send_str(json.dumps(message))

    def _message(self, message_type: str, payload: dict[str, Any], *, metadata_id: str | None = None,
                 subscription: dict[str, Any] | None = None) -> dict[str, Any]:
        metadata = {"message_id": metadata_id or str(uuid.uuid4()), "message_type": message_type,
                    "message_timestamp": _now_iso()}
        if subscription is not None:
            metadata["subscription_type"] = subscription["type"]
            metadata["subscription_version"] = subscription["version"]
        return {"metadata": metadata, "payload": payload}

    def _delivery_targets(self, type_: str, match: Callable[[dict[str, Any]], bool]) -> list[Connection]:
        return [c for c in self.connections if c.open and c.welcomed
                and any(s["type"] == type_ and match(s["condition"]) for s in c.subscriptions.values())]

    async def _notify(self, type_: str, event: dict[str, Any], *, event_id: str,
                      match: Callable[[dict[str, Any]], bool], via: Connection | None = None) -> None:
        # the same event id gives the same metadata.message_id: a redelivery, as Twitch sends it
        metadata_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{type_}/{event_id}"))
        for conn in [via] if via is not None else self._delivery_targets(type_, match):
            sub = next(s for c in [conn, *self.connections] for s in c.subscriptions.values()
                       if s["type"] == type_ and match(s["condition"]))
            note = self._message("notification", {"subscription": sub, "event": event},
                                 metadata_id=metadata_id, subscription=sub)
            self.notifications[event_id] = note
            conn.notifications_sent += 1
            await self._send(conn, note)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- OAuth -----

    async def _oauth_token(self, request: web.Request) -> web.Response:
        self.requests.append(("POST", request.path))
        params = dict(request.query)
        if request.can_read_body:
            params.update(await request.post())
        if params.get("client_id") != CLIENT_ID or params.get("client_secret") != CLIENT_SECRET:
            return _error(403, "invalid client secret")
        grant = params.get("grant_type")
        if grant == "client_credentials":
            token = f"app-{uuid.uuid4().hex}"
            self.app_tokens.add(token)
            return web.json_response({"access_token": token, "expires_in": 5000000, "token_type": "bearer"})
        if grant == "refresh_token":
            user_id = self.refresh_tokens.get(params.get("refresh_token", ""))
            if user_id is None:
                return _error(400, "Invalid refresh token")
            old = next(t for t, d in self.tokens.items() if d["user_id"] == user_id)
            token = f"refreshed-{uuid.uuid4().hex}"
            self.tokens[token] = {**self.tokens[old], "valid": True}
            self.refreshes += 1
            return web.json_response({"access_token": token, "refresh_token": params["refresh_token"],
                                      "expires_in": 14000, "scope": self.tokens[token]["scopes"],
                                      "token_type": "bearer"})
        return _error(400, "unsupported grant type")

    async def _oauth_validate(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path))
        token = request.headers.get("Authorization", "").removeprefix("OAuth ").removeprefix("Bearer ")
        if token in self.app_tokens:
            return web.json_response({"client_id": CLIENT_ID, "scopes": [], "expires_in": 5000000})
        data = self.tokens.get(token)
        if data is None or not data["valid"]:
            return _error(401, "invalid access token")
        return web.json_response({"client_id": CLIENT_ID, "login": data["login"], "scopes": data["scopes"],
                                  "user_id": data["user_id"], "expires_in": 14000})

    # ----- Helix -----

    def _auth(self, request: web.Request) -> dict[str, Any] | web.Response | None:
        """The user token's data, None for an app token, or the 401 to answer."""
        self.requests.append((request.method, request.path))
        if request.headers.get("Client-ID") != CLIENT_ID:
            return _error(401, "Client ID and OAuth token do not match")
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token in self.app_tokens:
            return None
        data = self.tokens.get(token)
        if data is None or not data["valid"]:
            return _error(401, "Invalid OAuth token")
        return data

    async def _users(self, request: web.Request) -> web.Response:
        auth = self._auth(request)
        if isinstance(auth, web.Response):
            return auth
        logins = request.query.getall("login", [])
        ids = request.query.getall("id", [])
        found = [u for u in self.users.values() if u["login"] in logins or u["id"] in ids]
        if not logins and not ids and auth is not None:
            found = [self.users[auth["login"]]]
        return web.json_response({"data": found})

    async def _eventsub_subscriptions(self, request: web.Request) -> web.Response:
        auth = self._auth(request)
        if isinstance(auth, web.Response):
            return auth
        if request.method == "GET":
            subs = [s for c in self.connections for s in c.subscriptions.values()]
            return web.json_response({"data": subs, "total": len(subs), "total_cost": 0, "max_total_cost": 10,
                                      "pagination": {}})
        if request.method == "DELETE":
            sub_id = request.query.get("id", "")
            for conn in self.connections:
                if conn.subscriptions.pop(sub_id, None) is not None:
                    return web.Response(status=204)
            return _error(404, "subscription not found")
        if request.method != "POST":
            return _error(405, "method not allowed")
        body = await request.json()
        if auth is None:
            return _error(400, "websocket transports need a user access token")
        session_id = body["transport"].get("session_id")
        conn = next((c for c in self.connections if c.session_id == session_id), None)
        if conn is None or not conn.open:
            return _error(400, "websocket transport session does not exist or has already disconnected")
        condition = body["condition"]
        type_ = body["type"]
        needed = {"channel.chat.message": ("user_id", "user:read:chat"),
                  "channel.channel_points_custom_reward_redemption.add":
                      ("broadcaster_user_id", "channel:manage:redemptions")}.get(type_)
        if needed is None:
            return _error(400, f"unsupported subscription type {type_}")
        if condition.get(needed[0]) != auth["user_id"] or needed[1] not in auth["scopes"]:
            return _error(403, "subscription missing proper authorization")
        for sub in conn.subscriptions.values():
            if sub["type"] == type_ and sub["condition"] == condition:
                return _error(409, f"subscription already exists id={sub['id']}")
        sub = {"id": str(uuid.uuid4()), "status": "enabled", "type": type_, "version": body["version"],
               "condition": condition, "created_at": _now_iso(), "cost": 0,
               "transport": {"method": "websocket", "session_id": conn.session_id,
                             "connected_at": _now_iso()}}
        conn.subscriptions[sub["id"]] = sub
        return web.json_response({"data": [sub], "total": 1, "total_cost": 0, "max_total_cost": 10},
                                 status=202)

    async def _chat_messages(self, request: web.Request) -> web.Response:
        auth = self._auth(request)
        if isinstance(auth, web.Response):
            return auth
        if self.chat_error_status is not None:
            return _error(self.chat_error_status, "internal server error")
        body = await request.json()
        if auth is None or auth["user_id"] != body.get("sender_id") \
                or "user:write:chat" not in auth["scopes"]:
            return _error(403, "the sender must be the token's user, with user:write:chat")
        message_id = str(uuid.uuid4())
        self.sent_messages.append({**body, "time": time.monotonic(), "message_id": message_id})
        if self.echo_sent_messages:  # the echo may well beat the HTTP answer
            await self.send_chat(auth["login"], body["message"], message_id=message_id,
                                 reply_to=body.get("reply_parent_message_id"))
        return web.json_response({"data": [{"message_id": message_id, "is_sent": True, "drop_reason": None}]})

    def _broadcaster_auth(self, request: web.Request) -> dict[str, Any] | web.Response:
        auth = self._auth(request)
        if isinstance(auth, web.Response):
            return auth
        if auth is None or auth["user_id"] != request.query.get("broadcaster_id") \
                or "channel:manage:redemptions" not in auth["scopes"]:
            return _error(403, "the broadcaster's token with channel:manage:redemptions is needed")
        return auth

    async def _custom_rewards(self, request: web.Request) -> web.Response:
        auth = self._broadcaster_auth(request)
        if isinstance(auth, web.Response):
            return auth
        if request.method == "GET":
            ids = request.query.getall("id", [])
            found = [r for r in self.rewards.values() if not ids or r["id"] in ids]
            return web.json_response({"data": found})
        if request.method != "POST":
            return _error(405, "method not allowed")
        body = await request.json()
        if any(r["title"].lower() == body["title"].lower() for r in self.rewards.values()):
            return _error(400, "CREATE_CUSTOM_REWARD_DUPLICATE_REWARD")
        channel = self.users[self.channel]
        reward = {
            "broadcaster_id": channel["id"], "broadcaster_login": channel["login"],
            "broadcaster_name": channel["display_name"], "id": str(uuid.uuid4()), "title": body["title"],
            "prompt": body.get("prompt", ""), "cost": body["cost"], "image": None,
            "default_image": {"url_1x": "http://127.0.0.1/1.png", "url_2x": "http://127.0.0.1/2.png",
                              "url_4x": "http://127.0.0.1/4.png"},
            "background_color": body.get("background_color", "#9147FF"),
            "is_enabled": body.get("is_enabled", True),
            "is_user_input_required": body.get("is_user_input_required", False),
            "max_per_stream_setting": {"is_enabled": False, "max_per_stream": 0},
            "max_per_user_per_stream_setting": {"is_enabled": False, "max_per_user_per_stream": 0},
            "global_cooldown_setting": {"is_enabled": False, "global_cooldown_seconds": 0},
            "is_paused": False, "is_in_stock": True,
            "should_redemptions_skip_request_queue": body.get("should_redemptions_skip_request_queue", False),
            "redemptions_redeemed_current_stream": None, "cooldown_expires_at": None,
        }
        self.rewards[reward["id"]] = reward
        return web.json_response({"data": [reward]})

    async def _redemptions(self, request: web.Request) -> web.Response:
        auth = self._broadcaster_auth(request)
        if isinstance(auth, web.Response):
            return auth
        body = await request.json()
        redemption = self.redemptions.get(request.query.get("id", ""))
        if redemption is None or redemption["reward"]["id"] != request.query.get("reward_id"):
            return _error(404, "redemption not found")
        if redemption["status"].upper() != "UNFULFILLED":
            return _error(400, "redemption is not UNFULFILLED")
        redemption["status"] = body["status"]
        reward = self.rewards[redemption["reward"]["id"]]
        return web.json_response({"data": [{
            "broadcaster_id": redemption["broadcaster_user_id"],
            "broadcaster_login": redemption["broadcaster_user_login"],
            "broadcaster_name": redemption["broadcaster_user_name"],
            "id": redemption["id"], "user_id": redemption["user_id"], "user_login": redemption["user_login"],
            "user_name": redemption["user_name"], "user_input": redemption["user_input"],
            "status": redemption["status"], "redeemed_at": redemption["redeemed_at"],
            "reward": {"id": reward["id"], "title": reward["title"], "prompt": reward["prompt"],
                       "cost": reward["cost"]},
        }]})

    async def _automod_status(self, request: web.Request) -> web.Response:
        auth = self._auth(request)
        if isinstance(auth, web.Response):
            return auth
        if auth is None or auth["user_id"] != request.query.get("broadcaster_id"):
            return _error(401, "The ID in broadcaster_id must match the user ID in the access token.")
        if "moderation:read" not in auth["scopes"]:
            return _error(401, "Missing scope: moderation:read")
        if self.automod_error_status is not None:
            return _error(self.automod_error_status, "automod check failed")
        body = await request.json()
        results = []
        for message in body["data"]:
            text = message["msg_text"].casefold()
            self.automod_checks.append(message["msg_text"])
            results.append({"msg_id": message["msg_id"],
                            "is_permitted": not any(w.casefold() in text for w in self.automod_forbidden)})
        return web.json_response({"data": results})


def _badge(badge: str | dict[str, str]) -> dict[str, str]:
    if isinstance(badge, dict):
        return badge
    return {"set_id": badge, "id": "12" if badge in ("subscriber", "founder") else "1",
            "info": "12" if badge in ("subscriber", "founder") else ""}


def _error(status: int, message: str) -> web.Response:
    reasons = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
               405: "Not Allowed", 409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error"}
    return web.json_response({"error": reasons.get(status, "Error"), "status": status, "message": message},
                             status=status)
