"""Twitch chat over EventSub (WebSocket transport), with the real twitchio 3 client.

What twitchio does here: OAuth (app token, validating and refreshing user tokens, including a refresh and
retry on a Helix 401), Helix requests, the EventSub WebSocket protocol (welcome, keepalive watchdog,
notification parsing) and the `session_reconnect` handover.

What this module adds on top:

- one supervisor that (re)connects with exponential backoff and jitter. twitchio's own reconnect after a
  dropped socket is switched off (`reconnect_attempts=None`), because it can end in a socket that is
  closed for good (no welcome within 11 s, a resubscribe that failed) with nobody retrying;
- a `session_reconnect` that loses nothing: twitchio closes the old socket as soon as the new one is
  welcomed, dropping notifications Twitch had already sent on the old one; here they are read first;
- de-duplication of EventSub's at-least-once delivery (bounded LRU of message ids);
- the shared-chat policy (`shared_chat: own` drops messages typed in the other channels);
- badges -> roles; replies through the Send Chat Message API under a token bucket (20 per 30 s);
- the channel-point reward (find or create, redemptions as ChatEvents, refunds);
- `automod_permitted`: Twitch's Check AutoMod Status for a suggestion, cached per text, failing open or
  closed (`automod_fail`) where Twitch cannot be asked;
- redaction: client secret, tokens and refresh tokens never reach a log line or `status()`.

Where Twitch is comes from the settings (`eventsub_url`, `api_url`, `auth_url`, `eventsub_api_url`; Twitch's
own by default): the EventSub URL is given to each socket, the HTTP roots through the client's own session
(chat/sources/twitch_http.py), so nothing process-wide changes and tests or the Twitch CLI mocks need no
patching.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import twitchio
from twitchio.eventsub import ChannelPointsRedeemAddSubscription, ChatMessageSubscription
from twitchio.eventsub.websockets import Websocket
from twitchio.models.moderation import AutomodCheckMessage
from twitchio.web import BaseAdapter

from chat.events import ChatEvent, Role
from chat.settings import TwitchSourceSettings
from chat.sources.base import Emit
from chat.sources.pump import Pump
from chat.sources.twitch_http import Rebase, rebased_session

if TYPE_CHECKING:
    from twitchio.eventsub import SubscriptionPayload

log = logging.getLogger(__name__)

READ_SCOPE = "user:read:chat"
WRITE_SCOPE = "user:write:chat"
REWARD_SCOPE = "channel:manage:redemptions"
AUTOMOD_SCOPE = "moderation:read"
MAX_MESSAGE_CHARS = 500  # Send Chat Message limit
# Send Chat Message limits per 30 s: a moderator or the broadcaster may send 100, anyone else 20.
REPLIES_PRIVILEGED, REPLIES_NORMAL = 100, 20
RESERVED_SHARE = 5  # 1/5 of the budget is kept for moderator confirmations and announcements
CHAT_TYPE = "channel.chat.message"
REDEMPTION_TYPE = "channel.channel_points_custom_reward_redemption.add"
# Why Twitch revokes a subscription (the `status` of a revocation message), and what the operator can do.
REVOCATION_HELP = {
    "authorization_revoked": "the token was revoked (its user disconnected the app or changed their password)"
                             ": make a new token and reload the channel",
    "user_removed": "the user is no longer on Twitch (deleted or suspended)",
    "version_removed": "Twitch retired this subscription version: a newer promptcast is needed",
    "moderator_removed": "the token's user is no longer a moderator of the channel",
}
REWARD_PROMPT = "Describe what the stream should show"


# ---------------------------------------------------------------------------------------------- redaction


class _Redactor(logging.Filter):
    """Replaces secrets in text; as a logging filter, in every record of the loggers it is attached to."""

    _PATTERNS = (
        (re.compile(r"(?i)\b(client_secret|refresh_token|access_token|id_token|code|token)=([^&\s\"'<>]+)"),
         r"\1=***"),
        (re.compile(r"(?i)\b(Bearer|OAuth)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    )

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, *secrets: str | None) -> None:
        self._secrets.update(s for s in secrets if s and len(s) >= 4)

    def __call__(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, "***")
        for pattern, replacement in self._PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("If you require the StarletteAdapter"):
            return False  # twitchio warns at every Client(); this source never uses its web adapters
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the caller's problem, not ours
            return True
        clean = self(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = self(logging.Formatter().formatException(record.exc_info))
        return True

    def install(self) -> None:
        """Attach to twitchio's loggers (OAuth URLs in its exceptions carry the client secret) and ours."""
        names = [n for n in list(logging.root.manager.loggerDict)
                 if n == "twitchio" or n.startswith("twitchio.")]
        for name in [*names, "twitchio", __name__]:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)


_REDACT = _Redactor()


# ---------------------------------------------------------------------------------------------- helpers


class RecentIds:
    """The last `size` ids seen (LRU): `seen(id)` is False the first time, True for a repeat."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, key: str) -> bool:
        if key in self._ids:
            self._ids.move_to_end(key)
            return True
        self._ids[key] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return False

    def add(self, key: str) -> None:
        self.seen(key)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class ReplyLimiter:
    """A token bucket of `limit` tokens where each spent token comes back `window` seconds later.

    So a burst of up to `limit` goes out at once, and no `window`-long stretch ever holds more than
    `limit` sends (a bucket refilled at a constant rate would allow up to twice that).
    """

    def __init__(self, limit: int = 20, window: float = 30.0, clock: Any = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._spent: deque[float] = deque()

    def available(self) -> int:
        now = self._clock()
        while self._spent and now - self._spent[0] >= self.window:
            self._spent.popleft()
        return self.limit - len(self._spent)

    def try_acquire(self, keep: int = 0) -> bool:
        """Spend a token if more than `keep` are left (`keep` > 0: leave those for what matters more)."""
        if self.available() <= keep:
            return False
        self._spent.append(self._clock())
        return True


def backoff_delay(attempt: int, base: float, maximum: float) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random."""
    step = min(maximum, base * (2 ** min(attempt, 30)))
    return step / 2 + random.uniform(0, step / 2)


def text_from_fragments(message: Any) -> tuple[str, tuple[str, ...]]:
    """The text to steer with, and the logins it mentions, from a chat message's fragments.

    Cheermotes (`Cheer100`) are left out, so a cheer can carry a command ("Cheer100 !prompt a dragon")
    and never ends up in a prompt ("a phoenix Cheer50"). Mentions are those Twitch marked (real users).
    Without fragments the plain text is used.
    """
    fragments = getattr(message, "fragments", None) or ()
    if not fragments:
        return message.text or "", ()
    parts: list[str] = []
    mentions: list[str] = []
    for fragment in fragments:
        kind, text = getattr(fragment, "type", "text"), getattr(fragment, "text", None) or ""
        if kind == "cheermote":
            continue
        if kind == "mention" and fragment.mention is not None and fragment.mention.name:
            mentions.append(fragment.mention.name.casefold())
        parts.append(text)
    return "".join(parts), tuple(dict.fromkeys(mentions))


def roles_from_badges(badges: Iterable[Any], *, is_broadcaster: bool = False) -> frozenset[Role]:
    """Chat roles from Twitch badges (objects with `set_id`), in this channel."""
    sets = {getattr(b, "set_id", None) or (b.get("set_id") if isinstance(b, dict) else None) for b in badges}
    roles: set[Role] = set()
    if is_broadcaster or "broadcaster" in sets:
        roles.add(Role.BROADCASTER)
    if sets & {"moderator", "lead_moderator"}:
        roles.add(Role.MODERATOR)
    if "vip" in sets:
        roles.add(Role.VIP)
    if sets & {"subscriber", "founder"}:
        roles.add(Role.SUBSCRIBER)
    return frozenset(roles or {Role.VIEWER})


class _NoWebAdapter(BaseAdapter[Any]):
    """twitchio's web adapter (OAuth callbacks, webhooks) is never started here: this one serves nothing.

    Passing it keeps `twitchio.Client` from building an aiohttp web application for every connection.
    """

    def __init__(self) -> None:
        self._runner_task = None
        self._eventsub_secret = None
        self._running = False

    async def event_startup(self) -> None:
        return None

    async def event_shutdown(self) -> None:
        return None

    async def close(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def run(self, host: str | None = None, port: int | None = None) -> None:
        raise RuntimeError("this client serves no OAuth callbacks or webhooks")

    async def eventsub_callback(self, request: Any) -> Any:
        return None

    async def fetch_token(self, request: Any) -> Any:
        return None

    async def oauth_callback(self, request: Any) -> Any:
        return None

    async def oauth_redirect(self, request: Any) -> Any:
        return None

    @property
    def eventsub_url(self) -> str:
        return ""

    @property
    def redirect_url(self) -> str:
        return ""


class _SetupError(Exception):
    """Wrong settings or tokens (not a network problem): retried slowly, with the client rebuilt."""


# ---------------------------------------------------------------------------------------------- socket


class _EventSubSocket(Websocket):
    """twitchio's EventSub socket with a `session_reconnect` hand-over that neither stalls nor drops.

    twitchio closes the old socket as soon as the new one is welcomed, losing whatever Twitch had already
    sent on it. Here, once the new socket is welcomed, the frames already waiting on the old one are
    handled first (every type: notifications, a revocation), until it has been quiet for `handover_quiet`
    seconds (milliseconds, not the old 3 s); then the new socket's notifications flow. The old socket stays
    open and is read by its own loop until Twitch closes it (or `retire_after` seconds pass), so a frame
    still in flight on it is handled too, only not in order.
    """

    def __init__(self, source: TwitchSource, *, hold: asyncio.Event | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._source = source
        self._hold = hold  # set: this socket's notifications may go out (the old socket's went first)
        self._successor: _EventSubSocket | None = None  # set once Twitch moved the session elsewhere

    async def _process_notification(self, data: Any) -> None:
        if self._hold is not None and not self._hold.is_set():
            await self._hold.wait()
        await super()._process_notification(data)

    async def _process_revocation(self, data: Any) -> None:
        # Before twitchio forgets the subscription (and closes a socket left with none): the source must
        # know first, or its supervisor would subscribe again.
        self._source._on_revocation(self._token_for, data.get("payload", {}).get("subscription", {}))
        await super()._process_revocation(data)

    async def _reconnect(self, url: str) -> None:
        # Runs inside the old socket's listen loop: it reads on once this returns.
        source = self._source
        if self._successor is not None:
            log.warning("twitch: a second session_reconnect on a socket already moved: ignored")
            return
        started = time.monotonic()
        hold = asyncio.Event()
        new = _EventSubSocket(source, hold=hold, keep_alive_timeout=self.keep_alive_timeout,
                              reconnect_attempts=None, client=self._client, token_for=self._token_for,
                              http=self._http)
        new._subscriptions = self._subscriptions  # Twitch moves the subscriptions with the session
        try:
            try:
                await new.connect(url=url, fail_once=True)
            except Exception as exc:
                log.warning("twitch: session_reconnect failed (%s); reconnecting from scratch",
                            source._describe(exc))
                await self.close()
                return
            self._successor = new
            source._adopt(new)
            source._retired.add(self)
            source._session_reconnects += 1
            source._spawn(self._retire_after(source._retire_after))
            welcomed = time.monotonic()
            handled = await self._handle_waiting_frames(source._handover_quiet)
        finally:
            hold.set()
        source._handover_s = time.monotonic() - welcomed
        log.info("twitch: session_reconnect handled (new session %s, welcomed after %.0f ms, %d frames of "
                 "the old socket first, %.0f ms)", new.session_id, (welcomed - started) * 1000, handled,
                 source._handover_s * 1000)

    async def _handle_waiting_frames(self, quiet: float) -> int:
        """Handle what waits on this (old) socket until it is quiet for `quiet` s; how many frames."""
        socket, handled = self._socket, 0
        while socket is not None and not socket.closed:
            try:
                message = await socket.receive(timeout=quiet)
            except TimeoutError:  # quiet: Twitch sends on the new socket now
                break
            if message.type is not aiohttp.WSMsgType.TEXT:
                break  # closing: the listen loop sees the socket closed and lets it go
            handled += 1
            await self._handle_frame(message.data)
        return handled

    async def _handle_frame(self, raw: str) -> None:
        """One frame read outside twitchio's listen loop, handled as that loop would."""
        try:
            data = json.loads(raw)
            kind = data["metadata"]["message_type"]
        except (ValueError, KeyError, TypeError):
            log.warning("twitch: unreadable EventSub frame during a hand-over")
            return
        self._last_keepalive = datetime.datetime.now()
        try:
            if kind == "notification":
                await self._process_notification(data)
            elif kind == "revocation":
                await self._process_revocation(data)
            elif kind != "session_keepalive":
                log.warning("twitch: %s on a socket being replaced: ignored", kind)
        except Exception as exc:
            log.warning("twitch: EventSub %s not handled: %s", kind, self._source._describe(exc))

    async def _retire_after(self, seconds: float) -> None:
        """Twitch closes a moved socket by itself; this is for a server that never does."""
        await asyncio.sleep(seconds)
        await self.close()

    async def close(self, cleanup: bool = True, *, reassociate: bool = True) -> None:
        await super().close(cleanup, reassociate=reassociate)
        self._source._retired.discard(self)
        if self._successor is not None:  # closing unregistered the session id, which the new socket shares
            self._source._adopt(self._successor)


# ---------------------------------------------------------------------------------------------- source


class TwitchSource:
    """Twitch chat (and channel-point redemptions) as ChatEvents; see the module docstring, docs/twitch.md."""

    def __init__(
        self,
        settings: TwitchSourceSettings,
        *,
        name: str = "twitch",
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        stable_after: float = 60.0,
        reply_limit: int | None = None,
        reply_window: float = 30.0,
        keepalive_timeout: int = 10,
        retire_after: float = 30.0,
        handover_quiet: float = 0.01,
        check_interval: float = 1.0,
        http_timeout: float = 10.0,
        dedupe_size: int = 4096,
        queue_size: int = 10_000,
        emit_concurrency: int = 64,
        automod_timeout: float = 3.0,
        automod_cache_ttl: float = 300.0,
        automod_cache_size: int = 1024,
        automod_backoff: float = 60.0,
    ) -> None:
        self.settings = settings
        self.name = name
        self._eventsub_url = settings.eventsub_url
        self._rebase = Rebase(settings.api_url, settings.auth_url, settings.eventsub_api_url)
        self._session: aiohttp.ClientSession | None = None
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._stable_after = stable_after
        self._keepalive_timeout = max(10, min(600, int(keepalive_timeout)))
        self._retire_after = retire_after  # a moved socket still open after this is closed by us
        self._handover_quiet = handover_quiet
        self._handover_s: float | None = None  # how long the last session_reconnect held new notifications
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: set[_EventSubSocket] = set()  # moved by session_reconnect, not closed by Twitch yet
        self._check_interval = check_interval
        self._http_timeout = http_timeout
        # An explicit limit (tests) or the setting wins; "auto" starts at 20 and learns the bot's role.
        fixed = reply_limit or (None if settings.reply_limit == "auto" else int(settings.reply_limit))
        self._limiter = ReplyLimiter(fixed or REPLIES_NORMAL, reply_window)
        self._limit_fixed = fixed is not None
        self._bot_role = "unknown"  # broadcaster | moderator | viewer, as Twitch shows it
        self._recent = RecentIds(dedupe_size)
        self._queue: asyncio.Queue[ChatEvent] = asyncio.Queue(maxsize=queue_size)
        self._emit_concurrency = max(1, emit_concurrency)
        _REDACT.add(settings.client_secret, settings.user_token, settings.refresh_token,
                    settings.broadcaster_token)
        _REDACT.install()

        self._client: twitchio.Client | None = None
        self._groups: dict[str, list[SubscriptionPayload]] = {}  # token user id -> its subscriptions
        self._revoked: dict[str, str] = {}  # subscription type -> why Twitch revoked it (kept until a reload)
        self._sockets: dict[str, _EventSubSocket] = {}
        self._wake = asyncio.Event()
        self._running = False
        self._bot_id: str | None = None
        self._bot_login: str | None = None
        self._broadcaster_id: str | None = None
        self._can_write = False
        self._reward_id: str | None = None
        self._own_replies: deque[tuple[str, float]] = deque(maxlen=64)  # (text, sent at): to spot echoes
        self._own_reply_ids = RecentIds(256)
        self._bot_scopes: frozenset[str] = frozenset()
        # the broadcaster's token as registered with the current client: (scopes or None, why none)
        self._broadcaster_auth: tuple[frozenset[str] | None, str] | None = None
        self._broadcaster_lock = asyncio.Lock()

        self._automod_timeout = automod_timeout
        self._automod_ttl = automod_cache_ttl
        self._automod_cache_size = automod_cache_size
        self._automod_backoff = automod_backoff
        self._automod_cache: OrderedDict[str, tuple[bool, float]] = OrderedDict()  # text -> (permitted, at)
        self._automod_pending: dict[str, asyncio.Task[bool]] = {}  # text -> the check in flight
        self._automod_paused_until = 0.0  # after a 429: no request before this (monotonic)
        self._automod_warned: set[str] = set()  # failure kinds warned about since the last good check
        self._automod_checked = 0
        self._automod_held = 0
        self._automod_failed = 0

        self._connected = False
        self._connected_at = 0.0
        self._ever_connected = False
        self._failures = 0
        self._reconnects = 0
        self._session_reconnects = 0
        self._last_error: str | None = None
        self._messages = 0
        self._last_event_at: float | None = None  # monotonic time of the last event emitted
        self._redemptions = 0
        self._duplicates = 0
        self._echoes_dropped = 0
        self._shared_dropped = 0
        self._overflow_dropped = 0
        self._replies_sent = 0
        self._replies_dropped = 0
        self._replies_failed = 0

    # ----- ChatSource -----

    async def run(self, emit: Emit) -> None:
        if self._running:
            raise RuntimeError(f"{self.name}: run() is already active")
        self._running = True
        pump = asyncio.create_task(
            Pump(self._queue, emit, concurrency=self._emit_concurrency, counted=self._count).run(),
            name=f"{self.name}-emit")
        try:
            await self._supervise()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await asyncio.shield(self._drop_client())
            self._running = False
            self._connected = False

    async def reply(self, text: str, reply_to: ChatEvent | None = None) -> None:
        if not self.settings.replies or not text.strip():
            return
        client, bot_id, broadcaster_id = self._client, self._bot_id, self._broadcaster_id
        if client is None or bot_id is None or broadcaster_id is None or not self._can_write:
            self._replies_dropped += 1
            reason = ("not connected" if self._can_write or client is None
                      else f"the user token lacks {WRITE_SCOPE}")
            log.info("twitch: reply dropped (%s): %.80s", reason, text)
            return
        # Answers to viewers leave the last fifth of the budget to moderators' confirmations and
        # announcements (reply_to None): in a busy minute the refusals go first, not those.
        urgent = reply_to is None or reply_to.is_moderator
        if not self._limiter.try_acquire(keep=0 if urgent else self._limiter.limit // RESERVED_SHARE):
            self._replies_dropped += 1
            log.warning("twitch: reply dropped, over %d replies per %.0f s: %.80s",
                        self._limiter.limit, self._limiter.window, text)
            return
        parent = None
        if reply_to is not None and reply_to.source == self.name and reply_to.redemption_id is None:
            parent = reply_to.message_id
        text = text[:MAX_MESSAGE_CHARS]
        self._own_replies.append((text, time.monotonic()))  # before sending: the echo may come first
        try:
            async with asyncio.timeout(self._http_timeout):
                channel = client.create_partialuser(broadcaster_id, self.settings.channel.lower())
                sent = await channel.send_message(text, sender=bot_id, token_for=bot_id,
                                                  reply_to_message_id=parent)
            self._own_reply_ids.add(sent.id)
        except twitchio.MessageRejectedError as exc:
            self._replies_failed += 1
            log.warning("twitch: Twitch dropped a reply (%s: %s)", exc.message.dropped_code,
                        exc.message.dropped_message)
        except Exception as exc:
            self._replies_failed += 1
            log.warning("twitch: reply failed: %s", self._describe(exc))
        else:
            self._replies_sent += 1

    async def refund(self, event: ChatEvent) -> None:
        """Mark the redemption CANCELED, which gives the viewer their channel points back."""
        await self._set_redemption(event, "CANCELED")

    async def fulfill(self, event: ChatEvent) -> None:
        """Mark the redemption FULFILLED (it leaves the broadcaster's request queue)."""
        await self._set_redemption(event, "FULFILLED")

    def status(self) -> dict[str, Any]:
        """Everything an operator may ask (for /healthz and metrics); never a secret."""
        connected = self._connected and bool(self._groups) and all(self._healthy(t) for t in self._groups)
        last = self._last_event_at
        return {
            "source": self.name,
            "kind": "twitch",
            "channel": self.settings.channel,
            "state": self._state(connected),
            "connected": connected,
            "sessions": sorted(s.session_id for s in self._sockets.values() if s.session_id),
            "subscriptions": sorted(str(getattr(p.type, "value", p.type))
                                    for payloads in self._groups.values() for p in payloads),
            "last_message_age_s": None if last is None else round(time.monotonic() - last, 1),
            "reconnects": self._reconnects,
            "session_reconnects": self._session_reconnects,
            "last_handover_ms": None if self._handover_s is None else round(self._handover_s * 1000, 1),
            "last_error": self._last_error,
            "messages": self._messages,
            "redemptions": self._redemptions,
            "duplicates_dropped": self._duplicates,
            "own_echoes_dropped": self._echoes_dropped,
            "shared_chat_dropped": self._shared_dropped,
            "overflow_dropped": self._overflow_dropped,
            "replies_sent": self._replies_sent,
            "replies_dropped": self._replies_dropped,
            "replies_failed": self._replies_failed,
            "replies_available": self._limiter.available(),
            "reply_limit": self._limiter.limit,
            "bot_role": self._bot_role,
            "reward_id": self._reward_id,
            "revoked": dict(self._revoked),
            "automod_checked": self._automod_checked,
            "automod_held": self._automod_held,
            "automod_failed": self._automod_failed,
        }

    def _state(self, connected: bool) -> str:
        """One word for /healthz: connected, connecting, token_revoked, revoked (another reason), stopped."""
        if self._revoked and not self._groups and self._client is not None:
            return "token_revoked" if "authorization_revoked" in self._revoked.values() else "revoked"
        if connected:
            return "connected"
        return "connecting" if self._running else "stopped"

    # ----- AutoMod -----

    async def automod_permitted(self, event: ChatEvent, text: str) -> bool:
        """Whether Twitch AutoMod lets `text` through in this channel (Helix Check AutoMod Status).

        True: permitted; False: AutoMod would hold it. Where Twitch cannot be asked (no broadcaster token
        with moderation:read, not connected, a timeout, an HTTP error, the rate limit), the answer is
        `settings.automod_fail`: "open" -> True, "closed" -> False. Answers are cached per exact text
        (`automod_cache_ttl`), and one check is in flight per text. Never raises.
        """
        now = time.monotonic()
        cached = self._automod_cache.get(text)
        if cached is not None:
            if now - cached[1] < self._automod_ttl:
                self._automod_cache.move_to_end(text)
                return cached[0]
            del self._automod_cache[text]
        task = self._automod_pending.get(text)
        if task is None:
            task = asyncio.create_task(self._automod_check(event, text), name=f"{self.name}-automod")
            self._automod_pending[text] = task
            task.add_done_callback(lambda _, key=text: self._automod_pending.pop(key, None))
        return await asyncio.shield(task)  # a cancelled caller leaves the check to the others

    async def _automod_check(self, event: ChatEvent, text: str) -> bool:
        if time.monotonic() < self._automod_paused_until:
            return self._automod_fallback("rate_limited", "rate limited by Twitch")
        client, broadcaster_id = self._client, self._broadcaster_id
        if client is None or broadcaster_id is None:
            return self._automod_fallback("not_connected", "not connected to Twitch")
        try:
            async with asyncio.timeout(self._automod_timeout):
                scopes, problem = await self._broadcaster_token()
                if scopes is None:
                    return self._automod_fallback("no_token", problem)
                if AUTOMOD_SCOPE not in scopes:
                    return self._automod_fallback("scope", f"the broadcaster token lacks {AUTOMOD_SCOPE}")
                msg_id = event.message_id or "1"
                answer = await client.http.post_check_automod_status(
                    broadcaster_id, messages=[AutomodCheckMessage(id=msg_id, text=text)],
                    token_for=broadcaster_id)
            results = answer["data"]
            result = next((r for r in results if r.get("msg_id") == msg_id), results[0])
            permitted = bool(result["is_permitted"])
        except TimeoutError:
            return self._automod_fallback("timeout", f"no answer within {self._automod_timeout:g} s")
        except twitchio.HTTPException as exc:
            if exc.status == 429:
                self._automod_paused_until = time.monotonic() + self._automod_backoff
                return self._automod_fallback("rate_limited", "rate limited by Twitch (HTTP 429): no check "
                                                              f"for {self._automod_backoff:g} s")
            kind = "refused" if exc.status in (401, 403) else "http"
            return self._automod_fallback(kind, self._describe(exc))
        except _SetupError as exc:  # not (or no longer) connected
            return self._automod_fallback("setup", str(exc))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            return self._automod_fallback("bad_answer", f"unreadable answer ({self._describe(exc)})")
        except Exception as exc:
            return self._automod_fallback("network", self._describe(exc))
        self._automod_checked += 1
        self._automod_warned.clear()  # it works (again): a new failure is worth a new warning
        self._automod_cache[text] = (permitted, time.monotonic())
        self._automod_cache.move_to_end(text)
        while len(self._automod_cache) > self._automod_cache_size:
            self._automod_cache.popitem(last=False)
        if not permitted:
            self._automod_held += 1
            log.info("twitch: AutoMod would hold a suggestion of @%s", event.login)
        return permitted

    def _automod_fallback(self, kind: str, reason: str) -> bool:
        """The answer where AutoMod could not be asked; a warning once per kind until a check works."""
        self._automod_failed += 1
        fail_open = self.settings.automod_fail == "open"
        if kind not in self._automod_warned:
            self._automod_warned.add(kind)
            log.warning("twitch: cannot ask AutoMod (%s): suggestions %s (automod_fail: %s)", reason,
                        "pass unchecked" if fail_open else "are held", self.settings.automod_fail)
        return fail_open

    # ----- supervision -----

    async def _supervise(self) -> None:
        first = True
        while True:
            # A revoked subscription is gone from _groups: nothing reconnects or resubscribes it.
            if self._client is None or any(not self._healthy(t) for t in self._groups):
                if not first:
                    if self._connected:  # it was up: lost now
                        if time.monotonic() - self._connected_at < self._stable_after:
                            self._failures += 1  # flapping: back off further
                        self._connected = False
                        self._last_error = "EventSub connection lost"
                        log.warning("twitch: EventSub connection lost")
                    delay = backoff_delay(self._failures, self._backoff_base, self._backoff_max)
                    log.info("twitch: connecting again in %.2f s", delay)
                    await asyncio.sleep(delay)
                first = False
                try:
                    await self._connect_all()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failures += 1
                    self._last_error = self._describe(exc)
                    log.warning("twitch: connecting failed (attempt %d): %s", self._failures,
                                self._last_error)
                    if isinstance(exc, _SetupError) or self._failures % 5 == 0:
                        await self._drop_client()  # start over: tokens validated again, ids resolved again
                    continue
                if self._ever_connected:
                    self._reconnects += 1
                self._ever_connected = True
                self._connected = True
                self._connected_at = time.monotonic()
                log.info("twitch: reading #%s as @%s", self.settings.channel, self._bot_login)
            elif self._failures and time.monotonic() - self._connected_at >= self._stable_after:
                self._failures = 0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await self._wake.wait()

    def _healthy(self, token_for: str) -> bool:
        socket = self._sockets.get(token_for)
        return socket is not None and socket.connected and not socket._closed and not socket._closing

    async def _connect_all(self) -> None:
        if self._client is None:
            await self._drop_client()
            try:
                await self._start_client()
            except BaseException:
                await self._drop_client()  # a half-started client cannot log in again
                raise
        for token_for, payloads in self._groups.items():
            if not self._healthy(token_for):
                await self._connect_group(token_for, payloads)

    async def _start_client(self) -> None:
        settings = self.settings
        self._broadcaster_id, self._broadcaster_auth = None, None  # until this client has logged in
        self._session = rebased_session(self._rebase)
        client = twitchio.Client(client_id=settings.client_id, client_secret=settings.client_secret,
                                 fetch_client_user=False, adapter=_NoWebAdapter(), session=self._session)
        self._client = client
        client.add_listener(self._on_message, event="event_message")
        client.add_listener(self._on_redemption, event="event_custom_redemption_add")
        client.add_listener(self._on_socket_closed, event="event_websocket_closed")
        client.add_listener(self._on_token_refreshed, event="event_token_refreshed")
        async with asyncio.timeout(self._http_timeout * 3):
            # an app token; no token file is read or written
            await client.login(load_tokens=False, save_tokens=False)
            bot = await self._add_token(settings.user_token, settings.refresh_token, "user_token")
            if READ_SCOPE not in bot.scopes:
                raise _SetupError(f"the user token lacks the {READ_SCOPE} scope")
            self._bot_id, self._bot_login = bot.user_id, bot.login
            self._bot_scopes = frozenset(bot.scopes)
            self._can_write = WRITE_SCOPE in bot.scopes
            if settings.replies and not self._can_write:
                log.warning("twitch: the user token lacks %s: replies are off", WRITE_SCOPE)
            users = await client.fetch_users(logins=[settings.channel.lower()])
            if not users:
                raise _SetupError(f"no Twitch channel named {settings.channel!r}")
            broadcaster_id = users[0].id
        self._broadcaster_id = broadcaster_id
        if bot.user_id == broadcaster_id:
            self._set_bot_role("broadcaster")
        assert bot.user_id is not None
        self._groups = {}
        if CHAT_TYPE not in self._revoked:
            self._groups[bot.user_id] = [
                ChatMessageSubscription(broadcaster_user_id=broadcaster_id, user_id=bot.user_id)]
        self._reward_id = None
        if settings.reward_title and REDEMPTION_TYPE not in self._revoked:
            reward_id = await self._setup_reward()
            if reward_id is not None:
                self._reward_id = reward_id
                redemptions = ChannelPointsRedeemAddSubscription(broadcaster_user_id=broadcaster_id,
                                                                 reward_id=reward_id)
                self._groups.setdefault(broadcaster_id, []).append(redemptions)

    async def _add_token(self, token: str, refresh: str, what: str) -> Any:
        assert self._client is not None
        try:
            validated = await self._client.add_token(token, refresh)
        except twitchio.InvalidTokenException as exc:
            raise _SetupError(f"{what} is invalid or expired and could not be refreshed") from exc
        if not validated.user_id:
            raise _SetupError(f"{what} is an app token; a user token is needed")
        return validated

    async def _broadcaster_token(self) -> tuple[frozenset[str] | None, str]:
        """The broadcaster's token, registered with the client once (for the reward and for AutoMod).

        Returns its scopes, or None and why there is none. The bot's own token where the bot is the
        broadcaster; else `broadcaster_token`, validated and registered at the first call for this client.
        A network error raises (and the next call tries again); a wrong token is remembered.
        """
        client, broadcaster_id, bot_id = self._client, self._broadcaster_id, self._bot_id
        if client is None or broadcaster_id is None or bot_id is None:
            raise _SetupError("not connected to Twitch")
        async with self._broadcaster_lock:
            if self._broadcaster_auth is not None and client is self._client:
                return self._broadcaster_auth
            settings = self.settings
            if bot_id == broadcaster_id:
                found: tuple[frozenset[str] | None, str] = (self._bot_scopes, "")
            elif not settings.broadcaster_token:
                found = (None, "no broadcaster_token is given")
            else:
                try:
                    validated = await self._add_token(settings.broadcaster_token, "", "broadcaster_token")
                except _SetupError as exc:
                    found = (None, str(exc))
                else:
                    if validated.user_id == broadcaster_id:
                        found = (frozenset(validated.scopes), "")
                    else:
                        await client.remove_token(validated.user_id)
                        if validated.user_id == bot_id:  # it replaced the bot's token: put that back
                            await self._add_token(settings.user_token, settings.refresh_token, "user_token")
                        found = (None, f"broadcaster_token is not #{settings.channel}'s token")
            if client is self._client:
                self._broadcaster_auth = found
            return found

    async def _setup_reward(self) -> str | None:
        """Find or create the prompt reward; None (with a warning) where it cannot be had."""
        settings, client, broadcaster_id = self.settings, self._client, self._broadcaster_id
        assert client is not None and broadcaster_id is not None
        try:
            scopes, problem = await self._broadcaster_token()
            if scopes is None:
                log.warning("twitch: reward_title is set but %s: no reward", problem)
                return None
            if REWARD_SCOPE not in scopes:
                log.warning("twitch: the broadcaster token lacks %s: no reward", REWARD_SCOPE)
                return None
            title = settings.reward_title
            async with asyncio.timeout(self._http_timeout * 2):
                existing = await client.http.get_custom_reward(broadcaster_id=broadcaster_id,
                                                               token_for=broadcaster_id, manageable=True)
                for reward in existing["data"]:
                    if reward["title"].casefold() == title.casefold():
                        log.info("twitch: using the existing reward %r", reward["title"])
                        return reward["id"]
                created = await client.http.post_custom_reward(
                    broadcaster_id=broadcaster_id, token_for=broadcaster_id, title=title,
                    cost=settings.reward_cost, prompt=REWARD_PROMPT)
            log.info("twitch: created the reward %r (%d points)", title, settings.reward_cost)
            return created["data"][0]["id"]
        except _SetupError as exc:
            log.warning("twitch: no reward: %s", exc)
        except twitchio.HTTPException as exc:
            # 403: the channel is not affiliate/partner; 400: a reward of that title made by another app
            log.warning("twitch: no reward (HTTP %s): %s", exc.status, self._describe(exc))
        return None

    async def _connect_group(self, token_for: str, payloads: list[SubscriptionPayload]) -> None:
        client = self._client
        assert client is not None
        for stale in list(client._websockets.pop(token_for, {}).values()):
            with contextlib.suppress(Exception):
                await stale.close()
        socket = _EventSubSocket(self, client=client, token_for=token_for, http=client.http,
                                 keep_alive_timeout=self._keepalive_timeout, reconnect_attempts=None)
        try:
            url = f"{self._eventsub_url}?keepalive_timeout_seconds={self._keepalive_timeout}"
            await socket.connect(url=url, fail_once=True)
            assert socket.session_id is not None
            client._websockets[token_for] = {socket.session_id: socket}
            async with asyncio.timeout(self._http_timeout * 2):
                for payload in payloads:
                    await client.subscribe_websocket(payload, token_for=token_for, as_bot=False,
                                                     socket_id=socket.session_id)
        except BaseException:
            client._websockets.pop(token_for, None)
            with contextlib.suppress(Exception):
                await socket.close()
            raise
        self._sockets[token_for] = socket

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _adopt(self, socket: _EventSubSocket) -> None:
        """A socket that replaced another after `session_reconnect`."""
        if self._client is None or socket._token_for is None or socket.session_id is None:
            return
        self._client._websockets[socket._token_for][socket.session_id] = socket
        self._sockets[socket._token_for] = socket

    async def _drop_client(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for retired in list(self._retired):
            with contextlib.suppress(Exception):
                await retired.close()
        client, self._client = self._client, None
        self._broadcaster_id, self._broadcaster_auth = None, None
        self._sockets.clear()
        self._groups = {}
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close(save_tokens=False)
        session, self._session = self._session, None
        if session is not None:  # ours, so twitchio leaves it open
            await session.close()

    # ----- events -----

    def _enqueue(self, event: ChatEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflow_dropped += 1
            log.warning("twitch: %d events wait for the consumer; dropped one from @%s",
                        self._queue.qsize(), event.login)

    def _count(self, event: ChatEvent) -> None:
        if event.redemption_id is None:
            self._messages += 1
            self._last_event_at = time.monotonic()
        else:
            self._redemptions += 1

    async def _on_message(self, message: twitchio.ChatMessage) -> None:
        # No await before _enqueue: events keep the order twitchio dispatched them in.
        try:
            if message.broadcaster.id != self._broadcaster_id:
                return
            if self._recent.seen(f"m:{message.id}"):
                self._duplicates += 1
                log.debug("twitch: duplicate message %s dropped", message.id)
                return
            source = message.source_broadcaster
            foreign = source is not None and source.id != self._broadcaster_id
            if foreign and self.settings.shared_chat == "own":
                self._shared_dropped += 1
                return
            if message.chatter.id == self._bot_id:
                self._learn_bot_role(message.badges)
            if message.chatter.id == self._bot_id and self._is_own_echo(message):
                self._echoes_dropped += 1
                return
            if self._reward_id is not None and message.channel_points_id == self._reward_id:
                return  # the redemption event carries it, with the ids a refund needs
            chatter = message.chatter
            text, mentions = text_from_fragments(message)
            self._enqueue(ChatEvent(
                source=self.name,
                message_id=message.id,
                user_id=chatter.id,
                login=chatter.name or "",
                display_name=chatter.display_name or chatter.name or "",
                text=text,
                time=time.time(),
                roles=roles_from_badges(message.badges, is_broadcaster=chatter.id == self._broadcaster_id),
                mentions=mentions,
            ))
        except Exception as exc:
            log.warning("twitch: unusable chat message: %s", self._describe(exc))

    def _learn_bot_role(self, badges: Iterable[Any]) -> None:
        """The bot's own messages come back with its badges: they say which reply limit Twitch applies."""
        roles = roles_from_badges(badges, is_broadcaster=self._bot_id == self._broadcaster_id)
        role = ("broadcaster" if Role.BROADCASTER in roles else "moderator" if Role.MODERATOR in roles
                else "viewer")
        if role != self._bot_role:
            self._set_bot_role(role)

    def _set_bot_role(self, role: str) -> None:
        self._bot_role = role
        if self._limit_fixed:
            return
        limit = REPLIES_NORMAL if role == "viewer" else REPLIES_PRIVILEGED
        if limit != self._limiter.limit:
            log.info("twitch: the bot is %s in #%s: up to %d replies per 30 s", role, self.settings.channel,
                     limit)
            self._limiter.limit = limit

    def _is_own_echo(self, message: twitchio.ChatMessage) -> bool:
        """Twitch delivers the bot's own replies back as chat: they must not steer (nor loop)."""
        if self._bot_id != self._broadcaster_id:
            return True  # a bot account only speaks through this source
        # The broadcaster's own account is the bot: only what this source sent is an echo. Known by its
        # id once Send Chat Message has answered, by its text before (the echo may come first).
        now = time.monotonic()
        sent = next((e for e in self._own_replies if e[0] == message.text and now - e[1] < 30.0), None)
        if sent is not None:
            self._own_replies.remove(sent)
        return message.id in self._own_reply_ids or sent is not None

    async def _on_redemption(self, redemption: Any) -> None:
        try:
            if redemption.reward.id != self._reward_id or redemption.broadcaster.id != self._broadcaster_id:
                return
            if self._recent.seen(f"r:{redemption.id}"):
                self._duplicates += 1
                return
            user = redemption.user
            self._enqueue(ChatEvent(
                source=self.name,
                message_id=redemption.id,
                user_id=user.id,
                login=user.name or "",
                display_name=user.display_name or user.name or "",
                text=redemption.user_input,
                time=time.time(),
                roles=roles_from_badges((), is_broadcaster=user.id == self._broadcaster_id),
                reward_id=redemption.reward.id,
                redemption_id=redemption.id,
            ))
        except Exception as exc:
            log.warning("twitch: unusable redemption: %s", self._describe(exc))

    async def _on_socket_closed(self, payload: Any) -> None:
        self._wake.set()

    async def _on_token_refreshed(self, payload: Any) -> None:
        _REDACT.add(payload.token, payload.refresh_token)
        log.info("twitch: the token of user %s was refreshed", payload.user_id)

    def _on_revocation(self, token_for: str | None, subscription: dict[str, Any]) -> None:
        """Twitch revoked a subscription: drop it for good (until a reload) and say so once, loudly."""
        type_, status = str(subscription.get("type", "?")), str(subscription.get("status", "?"))
        if type_ in self._revoked:
            return
        self._revoked[type_] = status
        payloads = self._groups.get(token_for or "", [])
        payloads[:] = [p for p in payloads if str(getattr(p.type, "value", p.type)) != type_]
        if token_for in self._groups and not payloads:
            del self._groups[token_for]  # nothing left to read on that token: no socket, no reconnect
            self._sockets.pop(token_for, None)
        help_text = REVOCATION_HELP.get(status, f"Twitch gave the reason {status!r}")
        what = "token revoked" if status == "authorization_revoked" else f"subscription revoked ({status})"
        self._last_error = f"{what}: {type_}: {help_text}"
        log.error("twitch: Twitch revoked the %s subscription of #%s (%s): %s; it is not renewed until the "
                  "channel is reloaded", type_, self.settings.channel, status, help_text)
        self._wake.set()

    async def _set_redemption(self, event: ChatEvent, status: str) -> None:
        if event.source != self.name or event.redemption_id is None or event.reward_id is None:
            return
        client, broadcaster_id = self._client, self._broadcaster_id
        if client is None or broadcaster_id is None:
            log.warning("twitch: not connected; redemption %s not marked %s", event.redemption_id, status)
            return
        try:
            async with asyncio.timeout(self._http_timeout):
                await client.http.patch_custom_reward_redemption(
                    broadcaster_id=broadcaster_id, token_for=broadcaster_id, reward_id=event.reward_id,
                    id=event.redemption_id, status=status)  # type: ignore[arg-type]
        except Exception as exc:
            log.warning("twitch: marking redemption %s %s failed: %s", event.redemption_id, status,
                        self._describe(exc))
        else:
            log.info("twitch: redemption %s of @%s marked %s", event.redemption_id, event.login, status)

    @staticmethod
    def _describe(exc: BaseException) -> str:
        """An exception as a log-safe line (no secrets)."""
        text = str(exc) or type(exc).__name__
        return _REDACT(f"{type(exc).__name__}: {text}"[:500])

