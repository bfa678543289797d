"""Settings of the steering sections (`chat:` and `store:` in the channel YAML)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalSourceSettings(_Strict):
    """Chat typed into the control panel or API of this service."""

    kind: Literal["local"] = "local"


class TwitchSourceSettings(_Strict):
    """Twitch chat read over EventSub; secrets come from the environment (`${VAR}`)."""

    kind: Literal["twitch"] = "twitch"
    channel: str = Field(min_length=1, max_length=25, pattern=r"^[A-Za-z0-9_]+$")
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    user_token: str = Field(min_length=1, description="bot/broadcaster user token with user:read:chat")
    refresh_token: str = Field("", description="lets the token be refreshed when it expires")
    broadcaster_token: str = Field("", description="broadcaster token for channel-point rewards")
    replies: bool = Field(True, description="answer in chat (which answers: chat.replies)")
    reply_limit: Literal["auto", 20, 100] = Field(
        "auto", description="chat messages per 30 s: Twitch allows 100 to a moderator or the broadcaster, "
                            "20 otherwise; auto: from the bot's role in the channel")
    reward_title: str = Field("", max_length=45, description="create this channel-point reward for prompts")
    reward_cost: int = Field(500, ge=1)
    shared_chat: Literal["own", "all"] = Field(
        "own", description="in a shared chat session: only this channel's viewers steer (own), or all")
    automod_fail: Literal["open", "closed"] = Field(
        "open", description="when Twitch AutoMod cannot be asked: let suggestions pass (open) or hold them")
    eventsub_url: str = Field("wss://eventsub.wss.twitch.tv/ws",
                              description="EventSub WebSocket (the Twitch CLI mock: ws://127.0.0.1:8080/ws)")
    api_url: str = Field("https://api.twitch.tv/helix",
                         description="Helix root (Twitch CLI mock-api: http://localhost:8080/mock)")
    auth_url: str = Field("https://id.twitch.tv/oauth2",
                          description="OAuth root (Twitch CLI mock-api: http://localhost:8080/auth)")
    eventsub_api_url: str = Field(
        "", description="where EventSub subscriptions are created; empty: api_url "
                        "(the Twitch CLI WebSocket mock: its root, http://127.0.0.1:8080)")

    @field_validator("eventsub_url")
    @classmethod
    def _websocket_url(cls, url: str) -> str:
        return _url(url, ("ws", "wss"))

    @field_validator("api_url", "auth_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return _url(url, ("http", "https"))

    @field_validator("eventsub_api_url")
    @classmethod
    def _optional_http_url(cls, url: str) -> str:
        return _url(url, ("http", "https")) if url else url


def _url(url: str, schemes: tuple[str, ...]) -> str:
    """`url` if it is an absolute URL with one of `schemes`, a host and no query or fragment."""
    parts = urlsplit(url.strip())
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be a {' or '.join(s + '://' for s in schemes)} URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment (the source adds its own)")
    return url.strip().rstrip("/")


ChatSourceSettings = Annotated[LocalSourceSettings | TwitchSourceSettings, Field(discriminator="kind")]


class CommandSettings(_Strict):
    """Chat command names."""

    prefix: str = Field("!", min_length=1, max_length=3)
    prompt: list[str] = Field(default_factory=lambda: ["prompt", "p"])
    vote: list[str] = Field(default_factory=lambda: ["vote", "v"])
    skip: list[str] = Field(default_factory=lambda: ["skip"])
    veto: list[str] = Field(default_factory=lambda: ["veto"])
    pause: list[str] = Field(default_factory=lambda: ["pause"])
    resume: list[str] = Field(default_factory=lambda: ["resume"])
    banprompt: list[str] = Field(default_factory=lambda: ["banprompt"])

    @field_validator("prompt", "vote", "skip", "veto", "pause", "resume", "banprompt")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        if not names or any(not re.fullmatch(r"[a-z0-9_]{1,20}", n) for n in names):
            raise ValueError("command names: 1-20 of a-z, 0-9, _ ; at least one")
        return names


class VoteSettings(_Strict):
    """Timed vote rounds."""

    round_seconds: float = Field(20.0, ge=3, le=600)
    options: int = Field(4, ge=2, le=9)
    min_votes: int = Field(1, ge=0, description="fewer votes: the round chooses nothing")
    last_vote_counts: bool = Field(True, description="a user's later vote replaces the earlier one")
    tie_break: Literal["earliest", "random"] = Field("earliest", description="earliest suggestion wins a tie")
    min_suggestions: int = Field(2, ge=1, description="a round opens once the pool has this many")


class QueueSettings(_Strict):
    """First come, first played."""

    user_cooldown_seconds: float = Field(60.0, ge=0)
    max_per_user: int = Field(2, ge=1, description="queued prompts one user may have waiting")
    max_length: int = Field(50, ge=1)
    min_play_seconds: float = Field(10.0, ge=0, description="a prompt stays on air at least this long")


class ModerationSettings(_Strict):
    """What a suggestion must pass."""

    min_chars: int = Field(3, ge=1)
    max_chars: int = Field(200, ge=10, le=2000)
    blocklist: list[str] = Field(default_factory=list, description="words (matched after normalising)")
    blocklist_regex: list[str] = Field(default_factory=list)
    blocklist_file: Path | None = Field(None, description="a word per line; re: lines are regex")
    rate_limit_per_minute: int = Field(6, ge=1, description="prompts one user may send")
    redemption_rate_limit_per_minute: int = Field(
        10, ge=1, description="channel-point redemptions one user may make a minute (a budget of their own)")
    flood_messages: int = Field(10, ge=2, description="this many in flood_seconds mutes")
    flood_seconds: float = Field(5.0, gt=0)
    flood_mute_seconds: float = Field(120.0, ge=0)
    duplicate_window_seconds: float = Field(300.0, ge=0)
    allow_users: list[str] = Field(default_factory=list, description="if set, only these logins steer")
    deny_users: list[str] = Field(default_factory=list)
    allow_roles: list[Literal["broadcaster", "moderator", "vip", "subscriber", "viewer"]] = Field(
        default_factory=lambda: ["broadcaster", "moderator", "vip", "subscriber", "viewer"])
    automod: bool = Field(False, description="ask Twitch AutoMod too (Twitch sources only)")
    mentions: Literal["refuse", "strip"] = Field(
        "refuse", description="a prompt that @-mentions a chat user: refuse it with a reason, or strip the "
                              "mention and go on (docs/chat.md)")
    template: str = Field("{prompt}", description="wraps viewer text, e.g. '{prompt}, {style}'")
    style: str = Field("", max_length=300, description="the channel's style anchor for the template")

    @field_validator("template")
    @classmethod
    def _template(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise ValueError("must contain {prompt}")
        try:
            template.format(prompt="", style="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{prompt}} and {{style}} may appear ({exc})") from None
        return template

    @field_validator("blocklist_regex")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from None
        return patterns


ReplyKind = Literal["accepted", "refused", "moderator", "rounds"]


class ReplySettings(_Strict):
    """Which chat answers steering gives (each source's `replies: false` silences it altogether)."""

    accepted: bool = Field(True, description="'added to the next vote', 'queued (#3)'")
    refused: bool = Field(True, description="'not accepted: <why>' (a refunded redemption says why too)")
    moderator: bool = Field(True, description="confirmations of moderator commands ('steering paused', ...)")
    rounds: bool = Field(True, description="a vote round opens (with its options), its result")


class RedemptionSettings(_Strict):
    """Channel-point redemptions: fulfilled when their prompt airs, refunded when it never will."""

    expire_minutes: float = Field(
        30.0, ge=1, le=24 * 60, description="a redeemed suggestion not on air by then is refunded")


class ChatSettings(_Strict):
    """How viewers steer the channel."""

    mode: Literal["vote", "queue", "manual"] = "vote"
    sources: list[ChatSourceSettings] = Field(default_factory=lambda: [LocalSourceSettings()])
    commands: CommandSettings = Field(default_factory=CommandSettings)
    vote: VoteSettings = Field(default_factory=VoteSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    redemptions: RedemptionSettings = Field(default_factory=RedemptionSettings)
    replies: ReplySettings = Field(default_factory=ReplySettings)
    fallback: Literal["keep"] = Field(
        "keep", description="when nothing is chosen: keep the current prompt (the scheduler adds more)")


class StoreSettings(_Strict):
    """Where suggestions, votes and the prompt queue live."""

    kind: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    max_connections: int = Field(20, ge=2, le=1000)

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url
