"""The steering store: one interface, two implementations (memory, Redis) with one contract.

Everything a restart must not lose lives here: the suggestion pool, the current vote
round and its votes (one per user), the prompt queue (acknowledged only after the engine
applied the switch), what is playing and the history.
"""

from __future__ import annotations

from typing import Protocol

from chat.events import Draft, Ingested, Intake, QueuedPrompt, Suggestion, VoteOutcome, VoteRound


class StoreUnavailable(RuntimeError):
    """The store could not take or give data in time (down, restarting, overloaded): retry later."""


class SteeringStore(Protocol):
    """Per-channel steering state. All methods are coroutines; implementations are atomic per call."""

    async def add_suggestion(self, text: str, raw: str, user_id: str, login: str, source: str,
                             time: float) -> Suggestion:
        """Add to the pool; returns it with its id."""

    async def add_suggestions(self, drafts: list[Draft]) -> list[Suggestion]:
        """Add several to the pool in one round trip, in order; returns them with their ids."""

    async def suggestions(self, limit: int = 100) -> list[Suggestion]:
        """The pool, oldest first."""

    async def remove_suggestions(self, ids: list[str]) -> None:
        """Drop suggestions (used in a round, vetoed, banned)."""

    async def open_round(self, options: list[Suggestion], opened_at: float, closes_at: float) -> VoteRound:
        """Start a vote round (the previous one must be closed); its options leave the pool."""

    async def current_round(self) -> VoteRound | None:
        """The open round, or the last closed one until a new one opens; tally included."""

    async def cast_vote(self, round_id: str, user_id: str, option: int, last_vote_counts: bool = True,
                        now: float | None = None) -> VoteOutcome:
        """One vote per user per round, atomically; `option` is 1-based."""

    async def ingest(self, items: list[Intake], bans: bool = False) -> tuple[list[Ingested], list[str]]:
        """A batch of chat events in one atomic step: duplicates found, votes counted; and the bans.

        Items are taken in order. Each records its message id; a repeat within its ttl is a duplicate
        and does nothing else (so a vote and its id are stored together, or neither). A vote counts for
        the round open now by the `cast_vote` rules, except that a closed round or none is `no_round`;
        its tally is the one after the whole batch. `bans` also returns `banned()`.
        """

    async def close_round(self, round_id: str) -> VoteRound:
        """Close the round (no vote counts after this) and return it with its final tally."""

    async def enqueue(self, text: str, chosen_by: str, suggestion_id: str | None,
                      time: float) -> QueuedPrompt:
        """Append to the prompt queue."""

    async def next_prompt(self) -> QueuedPrompt | None:
        """The oldest unacknowledged entry (the same one again until it is acknowledged)."""

    async def ack(self, entry_id: str) -> None:
        """The engine applied this entry: remove it from the queue for good."""

    async def queued(self, limit: int = 50) -> list[QueuedPrompt]:
        """Unacknowledged entries, oldest first (for the panel and overlays)."""

    async def queue_depth(self) -> int:
        """How many entries wait."""

    async def set_now_playing(self, prompt: QueuedPrompt) -> None:
        """Record what is on air (for overlays) and append it to the history."""

    async def now_playing(self) -> QueuedPrompt | None:
        """What is on air."""

    async def history(self, limit: int = 50) -> list[QueuedPrompt]:
        """What was played, newest first."""

    async def ban(self, text: str) -> None:
        """Ban a prompt text (moderator `!banprompt`); matched after normalisation by moderation."""

    async def banned(self) -> list[str]:
        """Banned prompt texts."""

    async def seen_message(self, source: str, message_id: str, ttl_s: float = 600) -> bool:
        """True if this message id was seen before (records it otherwise): at-least-once delivery."""

    async def close(self) -> None:
        """Release connections."""
