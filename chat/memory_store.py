"""The in-process steering store: the embedded default (`store: {kind: memory}`).

Same contract as `chat.redis_store.RedisStore` (one test suite runs against both), but the
state lives in this process and is gone when it exits. Every method does its work without
awaiting in between, so each call is atomic for the event loop; a lock also makes calls
from other threads (another event loop) safe.
"""

from __future__ import annotations

import itertools
import threading
import time as _time
from collections import OrderedDict, deque
from dataclasses import replace

from chat.events import Draft, Ingested, Intake, QueuedPrompt, Suggestion, VoteOutcome, VoteRound

# Shared limits (RedisStore keeps the same ones).
MAX_POOL = 10_000  # suggestions kept in the pool; the oldest drop out beyond this
HISTORY_LENGTH = 200  # played prompts kept for history()


class RoundStillOpen(RuntimeError):
    """open_round while the previous round is still open: close it first."""


class RoundNotFound(LookupError):
    """close_round for a round that is not the current (or last closed) one."""


def round_reason(round_id: str, current_id: str | None) -> str:
    """Why a vote for `round_id` finds no open round: an older round is closed, anything else is unknown."""
    try:
        older = current_id is not None and int(round_id) < int(current_id)
    except ValueError:
        older = False
    return "round_closed" if older else "no_round"


def valid_option(option: object, n: int) -> bool:
    """A 1-based option number within 1..n (bools and floats are not option numbers)."""
    return isinstance(option, int) and not isinstance(option, bool) and 1 <= option <= n


_ACCEPTED = {"counted": True, "changed": True, "unchanged": True, "kept": False, "no_round": False,
             "round_closed": False, "bad_option": False}


_DUPLICATE, _NEW = Ingested(True), Ingested(False)


def ingested(items: list[Intake], codes: list[str], tally: tuple[int, ...]) -> list[Ingested]:
    """The outcome of each item of an `ingest` batch from its code (both stores answer in codes).

    Codes: duplicate, new (no vote), and for votes counted, changed, unchanged, kept (another option
    while the first vote counts: refused as "unchanged"), no_round, round_closed, bad_option.
    """
    out: list[Ingested] = []
    outcomes: dict[str, Ingested] = {}  # one object per code: they are equal for the whole batch
    for item, code in zip(items, codes, strict=True):
        if code == "duplicate":
            out.append(_DUPLICATE)
        elif code == "new" or item.option is None:
            out.append(_NEW)
        else:
            outcome = outcomes.get(code)
            if outcome is None:
                reason = "unchanged" if code == "kept" else code
                votes = () if code == "no_round" else tally
                outcome = outcomes[code] = Ingested(False, VoteOutcome(_ACCEPTED[code], reason, votes))
            out.append(outcome)
    return out


class MemoryStore:
    """`SteeringStore` kept in memory; one instance per channel."""

    def __init__(self, max_pool: int = MAX_POOL, history_length: int = HISTORY_LENGTH) -> None:
        """An empty store; `max_pool` caps the suggestion pool, `history_length` the history."""
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._max_pool = max_pool
        self._pool: OrderedDict[str, Suggestion] = OrderedDict()
        self._round_seq = 0
        self._round: VoteRound | None = None
        self._votes: dict[str, int] = {}
        self._counts: list[int] = []
        self._queue: OrderedDict[str, QueuedPrompt] = OrderedDict()
        self._now: QueuedPrompt | None = None
        self._history: deque[QueuedPrompt] = deque(maxlen=history_length)
        self._banned: set[str] = set()
        self._seen: dict[tuple[str, str], float] = {}
        self._seen_sweep = 0.0

    def _next_id(self) -> str:
        # Shaped like a Redis stream id ("<ms>-<seq>"), strictly increasing.
        return f"{next(self._ids)}-0"

    # -- suggestions --------------------------------------------------------------------------

    async def add_suggestion(self, text: str, raw: str, user_id: str, login: str, source: str,
                             time: float) -> Suggestion:
        """Add to the pool; returns it with its id."""
        return (await self.add_suggestions([Draft(text, raw, user_id, login, source, time)]))[0]

    async def add_suggestions(self, drafts: list[Draft]) -> list[Suggestion]:
        """Add several to the pool, in order; returns them with their ids."""
        with self._lock:
            added = [d.stored(self._next_id()) for d in drafts]
            for suggestion in added:
                self._pool[suggestion.id] = suggestion
            while len(self._pool) > self._max_pool:
                self._pool.popitem(last=False)
            return added

    async def suggestions(self, limit: int = 100) -> list[Suggestion]:
        """The pool, oldest first."""
        with self._lock:
            return list(itertools.islice(self._pool.values(), max(limit, 0)))

    async def remove_suggestions(self, ids: list[str]) -> None:
        """Drop suggestions (used in a round, vetoed, banned); unknown ids are ignored."""
        with self._lock:
            for suggestion_id in ids:
                self._pool.pop(suggestion_id, None)

    # -- vote rounds --------------------------------------------------------------------------

    def _with_tally(self) -> VoteRound | None:
        if self._round is None:
            return None
        return replace(self._round, tally=tuple(self._counts))

    async def open_round(self, options: list[Suggestion], opened_at: float, closes_at: float) -> VoteRound:
        """Start a vote round; RoundStillOpen if the previous one is open. Its options leave the pool."""
        if not options:
            raise ValueError("a round needs at least one option")
        with self._lock:
            if self._round is not None and not self._round.closed:
                raise RoundStillOpen(f"round {self._round.id} is still open")
            self._round_seq += 1
            self._round = VoteRound(id=str(self._round_seq), options=tuple(options),
                                    opened_at=float(opened_at), closes_at=float(closes_at))
            self._votes = {}
            self._counts = [0] * len(options)
            for option in options:
                self._pool.pop(option.id, None)
            return self._with_tally()  # type: ignore[return-value]

    async def current_round(self) -> VoteRound | None:
        """The open round, or the last closed one until a new one opens; tally included."""
        with self._lock:
            return self._with_tally()

    async def cast_vote(self, round_id: str, user_id: str, option: int, last_vote_counts: bool = True,
                        now: float | None = None) -> VoteOutcome:
        """One vote per user per round, atomically; `option` is 1-based.

        Reasons: counted (first vote), changed (a different option replaced the earlier
        vote), unchanged (same option again: accepted; or a different one while the first
        vote counts: refused), no_round, round_closed (closed, or `now` >= closes_at),
        bad_option.
        """
        with self._lock:
            current = self._round
            if current is None or current.id != round_id:
                reason = round_reason(round_id, current.id if current else None)
                return VoteOutcome(False, reason)
            tally = tuple(self._counts)
            if current.closed or (now is not None and now >= current.closes_at):
                return VoteOutcome(False, "round_closed", tally)
            if not valid_option(option, len(current.options)):
                return VoteOutcome(False, "bad_option", tally)
            code = self._count(user_id, option, last_vote_counts)
            return VoteOutcome(_ACCEPTED[code], "unchanged" if code == "kept" else code, tuple(self._counts))

    async def ingest(self, items: list[Intake], bans: bool = False) -> tuple[list[Ingested], list[str]]:
        """Record a batch of message ids and count the votes among them, atomically; see SteeringStore."""
        with self._lock:
            current = self._round
            is_open = current is not None and not current.closed
            codes: list[str] = []
            for item in items:
                if self._seen_before(item.source, item.message_id, item.ttl_s):
                    codes.append("duplicate")
                elif item.option is None:
                    codes.append("new")
                elif current is None or not is_open:
                    codes.append("no_round")
                elif item.now is not None and item.now >= current.closes_at:
                    codes.append("round_closed")
                elif not valid_option(item.option, len(current.options)):
                    codes.append("bad_option")
                else:
                    codes.append(self._count(item.user_id, item.option, item.last_vote_counts))
            tally = tuple(self._counts) if is_open else ()
            return ingested(items, codes, tally), sorted(self._banned) if bans else []

    def _count(self, user_id: str, option: int, last_vote_counts: bool) -> str:
        previous = self._votes.get(user_id)
        if previous == option:
            return "unchanged"
        if previous is not None and not last_vote_counts:
            return "kept"
        if previous is not None:
            self._counts[previous - 1] -= 1
        self._votes[user_id] = option
        self._counts[option - 1] += 1
        return "counted" if previous is None else "changed"

    async def close_round(self, round_id: str) -> VoteRound:
        """Close the round (no vote counts after this) and return it with its final tally.

        Closing a closed round returns it again; RoundNotFound for any other id.
        """
        with self._lock:
            if self._round is None or self._round.id != round_id:
                raise RoundNotFound(f"no round {round_id!r}")
            self._round = replace(self._round, closed=True)
            return self._with_tally()  # type: ignore[return-value]

    # -- prompt queue -------------------------------------------------------------------------

    async def enqueue(self, text: str, chosen_by: str, suggestion_id: str | None,
                      time: float) -> QueuedPrompt:
        """Append to the prompt queue."""
        with self._lock:
            prompt = QueuedPrompt(entry_id=self._next_id(), text=text, chosen_by=chosen_by,
                                  suggestion_id=suggestion_id, time=float(time))
            self._queue[prompt.entry_id] = prompt
            return prompt

    async def next_prompt(self) -> QueuedPrompt | None:
        """The oldest unacknowledged entry (the same one again until it is acknowledged)."""
        with self._lock:
            return next(iter(self._queue.values()), None)

    async def ack(self, entry_id: str) -> None:
        """The engine applied this entry: remove it from the queue for good (unknown ids: no-op)."""
        with self._lock:
            self._queue.pop(entry_id, None)

    async def queued(self, limit: int = 50) -> list[QueuedPrompt]:
        """Unacknowledged entries, oldest first (for the panel and overlays)."""
        with self._lock:
            return list(itertools.islice(self._queue.values(), max(limit, 0)))

    async def queue_depth(self) -> int:
        """How many entries wait (delivered but unacknowledged ones included)."""
        with self._lock:
            return len(self._queue)

    # -- on air -------------------------------------------------------------------------------

    async def set_now_playing(self, prompt: QueuedPrompt) -> None:
        """Record what is on air (for overlays) and append it to the history."""
        with self._lock:
            self._now = prompt
            self._history.appendleft(prompt)

    async def now_playing(self) -> QueuedPrompt | None:
        """What is on air."""
        with self._lock:
            return self._now

    async def history(self, limit: int = 50) -> list[QueuedPrompt]:
        """What was played, newest first."""
        with self._lock:
            return list(itertools.islice(self._history, max(limit, 0)))

    # -- moderation ---------------------------------------------------------------------------

    async def ban(self, text: str) -> None:
        """Ban a prompt text (moderator `!banprompt`); matched after normalisation by moderation."""
        with self._lock:
            self._banned.add(text)

    async def banned(self) -> list[str]:
        """Banned prompt texts, sorted."""
        with self._lock:
            return sorted(self._banned)

    async def seen_message(self, source: str, message_id: str, ttl_s: float = 600) -> bool:
        """True if this message id was seen within ttl_s (records it otherwise): at-least-once delivery."""
        with self._lock:
            return self._seen_before(source, message_id, ttl_s)

    def _seen_before(self, source: str, message_id: str, ttl_s: float) -> bool:
        now = _time.monotonic()
        key = (source, message_id)
        if now - self._seen_sweep > 60:
            self._seen = {k: expiry for k, expiry in self._seen.items() if expiry > now}
            self._seen_sweep = now
        expiry = self._seen.get(key)
        if expiry is not None and expiry > now:
            return True
        self._seen[key] = now + ttl_s
        return False

    async def close(self) -> None:
        """Nothing to release."""
