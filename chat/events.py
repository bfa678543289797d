"""What steering is made of: chat events from any source, and the decisions taken on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

REDEMPTION_LABEL = "channel_points"  # how a channel-point redemption is shown and counted


class Role(StrEnum):
    """Chat roles, from Twitch badges (or the local panel)."""

    BROADCASTER = "broadcaster"
    MODERATOR = "moderator"
    VIP = "vip"
    SUBSCRIBER = "subscriber"
    VIEWER = "viewer"


@dataclass(frozen=True)
class ChatEvent:
    """One chat message (or channel-point redemption) as every source delivers it."""

    source: str  # "twitch", "local", ...
    message_id: str  # unique per source; used to drop EventSub's at-least-once duplicates
    user_id: str
    login: str
    display_name: str
    text: str
    time: float  # unix seconds
    roles: frozenset[Role] = field(default_factory=lambda: frozenset({Role.VIEWER}))
    reward_id: str | None = None  # channel-point reward, when this is a redemption
    redemption_id: str | None = None
    mentions: tuple[str, ...] = ()  # logins of the chat users the text @-mentions (as Twitch marked them)

    @property
    def is_moderator(self) -> bool:
        """Moderators and the broadcaster may run moderator commands."""
        return bool(self.roles & {Role.MODERATOR, Role.BROADCASTER})

    @property
    def label(self) -> str:
        """How the event is shown and counted: `channel_points` for a redemption, else its source.

        `source` stays the source's name: replies, refunds and fulfilment go back through it.
        """
        return REDEMPTION_LABEL if self.redemption_id else self.source


@dataclass(frozen=True)
class Suggestion:
    """A viewer's prompt that passed moderation, waiting in the pool or the queue."""

    id: str  # store-assigned
    text: str  # the prompt as it will be sent (template applied)
    raw: str  # what the viewer typed, cleaned
    user_id: str
    login: str
    source: str
    time: float


class Draft(NamedTuple):
    """A suggestion on its way into the pool (`SteeringStore.add_suggestions`), before it has an id."""

    text: str
    raw: str
    user_id: str
    login: str
    source: str
    time: float

    def stored(self, suggestion_id: str) -> Suggestion:
        """The suggestion it became, with the id the store gave it."""
        return Suggestion(suggestion_id, self.text, self.raw, self.user_id, self.login, self.source,
                          float(self.time))


@dataclass(frozen=True)
class VoteRound:
    """A timed vote among options drawn from the suggestion pool."""

    id: str
    options: tuple[Suggestion, ...]
    opened_at: float
    closes_at: float
    closed: bool = False
    tally: tuple[int, ...] = ()


@dataclass(frozen=True)
class QueuedPrompt:
    """A prompt chosen to be played, waiting for the engine; acknowledged once applied."""

    entry_id: str  # store-assigned (a Redis stream id)
    text: str
    chosen_by: str  # "@login", "vote", "moderator @login", "schedule", ...
    suggestion_id: str | None
    time: float


@dataclass(frozen=True)
class VoteOutcome:
    """What happened to one `!vote`."""

    accepted: bool
    reason: str  # "counted", "changed", "unchanged", "no_round", "round_closed", "bad_option"
    tally: tuple[int, ...] = ()


class Intake(NamedTuple):  # a tuple: thousands are made a second, and a tuple is the cheapest record
    """One chat event's work in the store, done in a batch with others (`SteeringStore.ingest`).

    Every intake records `message_id` (a repeat within `ttl_s` is a duplicate and does nothing else);
    with `option` set it is also a vote for that option of the round open at `now`.
    """

    source: str
    message_id: str
    user_id: str = ""
    option: int | None = None  # 1-based; None: only the duplicate check
    last_vote_counts: bool = True
    now: float | None = None
    ttl_s: float = 600.0


class Ingested(NamedTuple):
    """What the store did with one `Intake`."""

    duplicate: bool  # the message id was seen before: nothing else was done
    vote: VoteOutcome | None = None  # for a vote that was not a duplicate
