"""Steering: chat events in, prompt switches out.

    source -> Steering.handle(event) -> parse -> moderate -> pool (vote, manual) or queue (queue)
    ticker -> Steering.tick(now)     -> opens and closes vote rounds; winners join the queue
    engine -> Steering.next_switch() -> the oldest queued prompt, at a block boundary
    on air -> Steering.applied(p)    -> acknowledged in the store (a restart before this replays it)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from chat.batch import Batcher
from chat.commands import (
    BanPromptCommand,
    Command,
    PromptCommand,
    Refusal,
    VetoCommand,
    VoteCommand,
    parse_command,
)
from chat.events import ChatEvent, Draft, Ingested, Intake, QueuedPrompt, Suggestion, VoteOutcome, VoteRound
from chat.moderation import Decision, Moderator, fold
from chat.redemptions import Redemptions
from chat.redemptions import pool as pool_place
from chat.redemptions import queue as queue_place
from chat.settings import ChatSettings, ReplyKind
from chat.store import SteeringStore, StoreUnavailable

log = logging.getLogger(__name__)

STEERING_OFF = "chat steering is off during this programme"
SHORT_TEXT, PARSED_MAX = 24, 4096  # parses of texts up to this long are remembered, this many at most
_UNPARSED = object()


@dataclass
class SteeringHooks:
    """What steering reports outward (metrics, chat replies, refunds); every hook is optional."""

    message: Callable[[str], None] = lambda source: None
    rejected: Callable[[str], None] = lambda reason: None
    vote: Callable[[], None] = lambda: None
    queue_depth: Callable[[int], None] = lambda depth: None
    reply: Callable[[ChatEvent, str], Awaitable[None]] | None = None
    refund: Callable[[ChatEvent], Awaitable[None]] | None = None  # a redemption ends CANCELED (points back)
    fulfill: Callable[[ChatEvent], Awaitable[None]] | None = None  # a redemption ends FULFILLED (it aired)
    prepare: Callable[[str], None] = lambda text: None  # pre-encode a prompt that may play soon
    queued: Callable[[], None] = lambda: None  # a prompt joined the queue: a switch may be due now
    announce: Callable[[str], Awaitable[None]] | None = None  # a line to every chat (round open/result)
    automod: Callable[[ChatEvent, str], Awaitable[bool]] | None = None  # Twitch AutoMod, when enabled


@dataclass
class _RoundState:
    vetoed: set[int] = field(default_factory=set)


class Steering:
    """The channel's steering logic over a store; one instance per channel process."""

    def __init__(self, settings: ChatSettings, store: SteeringStore, moderator: Moderator | None = None,
                 hooks: SteeringHooks | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.moderator = moderator or Moderator(settings.moderation)
        self.hooks = hooks or SteeringHooks()
        self.clock = clock
        self.mode = settings.mode  # the schedule may change it per window (set_policy)
        self.chat_enabled = True  # False: suggestions and votes are refused ("steering_off")
        self.paused = False
        self.skip_requested = False
        self.on_air_since = clock()
        self.last_activity = clock()  # the last accepted suggestion, vote or moderator queueing
        self._round = _RoundState()
        self._last_queued_by: dict[str, float] = {}
        self._prepared: set[str] = set()
        self.redemptions = Redemptions(settings.redemptions.expire_minutes * 60)
        self._parsed: dict[tuple[str, bool], Command | Refusal | None] = {}  # see _parse
        # Two batches on the wire at once: the store works on one while this process prepares the next.
        self._intake: Batcher[tuple[Intake, bool], tuple[Ingested, list[str]]] = Batcher(
            self._ingest, max_in_flight=2, keys=_intake_keys)
        # Suggestions that pass moderation together go into the pool in one XADD pipeline.
        self._pool_writes: Batcher[Draft, Suggestion] = Batcher(self.store.add_suggestions)

    def set_policy(self, chat_enabled: bool, mode: str) -> None:
        """Whether chat may steer, and in which mode (the schedule sets it per window)."""
        if mode not in ("vote", "queue", "manual"):
            raise ValueError(f"unknown chat mode {mode!r}")
        if (chat_enabled, mode) != (self.chat_enabled, self.mode):
            log.info("chat steering %s, mode %s", "on" if chat_enabled else "off", mode)
        self.chat_enabled = chat_enabled
        self.mode = mode

    # --- chat in -------------------------------------------------------------------------------
    async def handle(self, event: ChatEvent) -> None:
        """Act on one chat event from any source; returns once what it changed is stored."""
        await self.handle_many((event,))

    async def handle_many(self, events: Sequence[ChatEvent]) -> None:
        """Act on chat events in arrival order: one batched store step for all of them (duplicates
        dropped, votes counted, bans read), then what each needs besides; returns once all is stored."""
        commands, intakes = [], []
        last_counts, now = self.settings.vote.last_vote_counts, self.clock()
        for event in events:
            command = None if event.reward_id else self._parse(event)
            option = command.option if isinstance(command, VoteCommand) and self.chat_enabled else None
            suggests = bool(event.reward_id) or isinstance(command, PromptCommand)
            commands.append(command)
            intakes.append((Intake(event.source, event.message_id, event.user_id, option, last_counts, now),
                            suggests))
        # EventSub delivers at least once: the duplicate check and the vote are one store step.
        results = await self._intake.submit_many(intakes)
        rest = []
        for event, command, (result, banned) in zip(events, commands, results, strict=True):
            if result.duplicate:
                continue
            self.hooks.message(event.label)
            outcome = result.vote
            if outcome is not None and outcome.accepted:  # the common case, with nothing to await
                self.last_activity = self.clock()
                self.hooks.vote()
            elif command is not None or event.reward_id:
                rest.append(self._act(event, command, outcome, banned))
        if rest:
            await asyncio.gather(*rest)

    async def _act(self, event: ChatEvent, command: Command | Refusal | None, outcome: VoteOutcome | None,
                   banned: list[str]) -> None:
        """What one stored event needs besides the store step (a counted vote needs nothing)."""
        if event.reward_id:  # a channel-point redemption is a prompt suggestion by itself
            await self._suggest(event, self._redeemed_text(event), banned)
            return
        if command is None:
            return
        if isinstance(command, Refusal):
            await self._refuse(event, command.reason, command.message)
            return
        kind = command.kind
        if isinstance(command, PromptCommand):
            await self._suggest(event, command.text, banned)
        elif kind == "vote":
            await self._voted(event, outcome)
        elif kind == "skip":
            self.request_skip()
            await self._reply(event, "skipping to the next prompt", "moderator")
        elif isinstance(command, VetoCommand):
            await self._veto(event, command.option)
        elif kind == "pause":
            self.paused = True
            await self._reply(event, "steering paused", "moderator")
        elif kind == "resume":
            self.paused = False
            await self._reply(event, "steering resumed", "moderator")
        elif isinstance(command, BanPromptCommand):
            await self.ban(command.text)
            await self._reply(event, "prompt banned", "moderator")

    def _parse(self, event: ChatEvent) -> Command | Refusal | None:
        """`parse_command`, remembered for short texts: a busy chat repeats "!vote 2" thousands of times."""
        text = event.text
        if not isinstance(text, str) or len(text) > SHORT_TEXT:
            return parse_command(event, self.settings.commands, vote_options=self.settings.vote.options)
        key = (text, event.is_moderator)  # the only parts of the event parsing reads
        found = self._parsed.get(key, _UNPARSED)
        if found is _UNPARSED:
            found = parse_command(event, self.settings.commands, vote_options=self.settings.vote.options)
            if len(self._parsed) >= PARSED_MAX:
                self._parsed.clear()
            self._parsed[key] = found
        return found  # type: ignore[return-value]

    def _redeemed_text(self, event: ChatEvent) -> str:
        """A redemption's input, less a `!prompt` viewers type out of habit (`!prompt` alone: empty)."""
        command = parse_command(event, self.settings.commands, vote_options=self.settings.vote.options)
        if isinstance(command, PromptCommand):
            return command.text
        if isinstance(command, Refusal) and command.kind == "prompt":
            return ""
        return event.text

    async def _ingest(self, batch: list[tuple[Intake, bool]]) -> list[tuple[Ingested, list[str]]]:
        with_banned = any(wants for _, wants in batch)
        results, banned = await self.store.ingest([item for item, _ in batch], with_banned)
        return [(result, banned) for result in results]

    async def _refuse(self, event: ChatEvent, reason: str, message: str) -> None:
        self.hooks.rejected(reason)
        await self._reply(event, f"not accepted: {message}", "refused")
        if event.reward_id:
            await self._cancel([event], reason)

    async def _cancel(self, events: list[ChatEvent], why: str) -> None:
        """These redemptions will never air: CANCELED, which refunds the points."""
        for event in events:
            log.info("redemption %s of @%s refunded (%s)", event.redemption_id, event.login, why)
            if self.hooks.refund is not None:
                await self.hooks.refund(event)

    async def _announce(self, text: str) -> None:
        if self.hooks.announce is not None and self.settings.replies.rounds:
            await self.hooks.announce(text)

    async def _reply(self, event: ChatEvent, text: str, kind: ReplyKind) -> None:
        if self.hooks.reply is not None and getattr(self.settings.replies, kind):
            await self.hooks.reply(event, text)

    async def _suggest(self, event: ChatEvent, text: str, banned: list[str]) -> None:
        if not self.chat_enabled:
            await self._refuse(event, "steering_off", STEERING_OFF)
            return
        # commit=False: a line the store cannot take must not count as a duplicate or against the rate.
        decision = self.moderator.check(event, text, banned=banned, commit=False)
        if not decision.accepted:
            await self._refuse(event, decision.reason, decision.message)
            return
        automod = self.hooks.automod if self.settings.moderation.automod else None
        if automod is not None and not await automod(event, decision.raw):
            await self._refuse(event, "automod", "held by AutoMod")
            return
        mode = self.mode
        if mode != "queue":  # the pool grows, not the queue: no depth to report
            added = await self._pool_writes.submit(
                Draft(decision.text, decision.raw, event.user_id, event.login, event.label, self.clock()))
            self._kept(event, decision)
            if event.redemption_id:
                self.redemptions.track(pool_place(added.id), event, self.clock())
            await self._reply(event, "added to the next vote" if mode == "vote" else "waiting for approval",
                              "accepted")
            return
        refusal = await self._queue_refusal(event)
        if refusal:
            await self._refuse(event, *refusal)
            return
        by = f"@{event.login} (channel points)" if event.redemption_id else f"@{event.login}"
        entry = await self.store.enqueue(decision.text, by, None, self.clock())
        self._kept(event, decision)
        if event.redemption_id:
            self.redemptions.track(queue_place(entry.entry_id), event, self.clock())
        self._last_queued_by[event.user_id] = self.clock()
        self.hooks.prepare(entry.text)
        self.hooks.queued()
        depth = await self._report_depth()
        await self._reply(event, f"queued (#{depth})" if depth is not None else "queued", "accepted")

    def _kept(self, event: ChatEvent, decision: Decision) -> None:
        # Only now, with the store holding it, does the line count for duplicates and the rate limit.
        self.moderator.note_accepted(event, decision)
        self.last_activity = self.clock()

    async def _queue_refusal(self, event: ChatEvent) -> tuple[str, str] | None:
        cfg = self.settings.queue
        last = self._last_queued_by.get(event.user_id)
        if last is not None and self.clock() - last < cfg.user_cooldown_seconds:
            wait = cfg.user_cooldown_seconds - (self.clock() - last)
            return "cooldown", f"wait {wait:.0f}s before your next prompt"
        queued = await self.store.queued(limit=cfg.max_length + 1)
        if len(queued) >= cfg.max_length:
            return "queue_full", "the queue is full"
        if sum(1 for q in queued if q.chosen_by == f"@{event.login}") >= cfg.max_per_user:
            return "user_cap", f"you already have {cfg.max_per_user} prompts waiting"
        return None

    async def _voted(self, event: ChatEvent, outcome: VoteOutcome | None) -> None:
        """A vote the store did not count (a counted one is done in handle_many)."""
        if not self.chat_enabled or outcome is None:
            await self._refuse(event, "steering_off", STEERING_OFF)
        elif outcome.reason == "no_round":
            await self._refuse(event, "no_round", "no vote is open")
        else:
            self.hooks.rejected(outcome.reason)

    async def _veto(self, event: ChatEvent, option: int | None) -> None:
        if option is not None and await self.veto_option(option):
            await self._reply(event, f"option {option} vetoed", "moderator")
            return
        if await self.veto_next() is not None:
            await self._reply(event, "next prompt vetoed", "moderator")

    # --- moderators and the panel --------------------------------------------------------------
    async def veto_option(self, option: int) -> bool:
        """Option `option` (1-based) of the open round cannot win; False when no round is open."""
        current = await self.store.current_round()
        if current is None or current.closed:
            return False
        self._round.vetoed.add(option)
        return True

    async def veto_next(self) -> QueuedPrompt | None:
        """Drop the next queued prompt unplayed; the dropped prompt, or None when the queue is empty."""
        head = await self.store.next_prompt()
        if head is None:
            return None
        await self.store.ack(head.entry_id)
        await self._cancel(self.redemptions.settle_all([queue_place(head.entry_id)]), "vetoed")
        await self._report_depth()
        return head

    async def ban(self, text: str) -> None:
        """Ban a prompt text and drop matching suggestions from the pool."""
        await self.store.ban(text)
        banned = fold(text).compact
        pool = await self.store.suggestions(limit=1000)
        dropped = [s.id for s in pool if banned and banned in fold(s.raw).compact]
        await self.store.remove_suggestions(dropped)
        await self._cancel(self.redemptions.settle_all(map(pool_place, dropped)), "banned")

    async def approve(self, suggestion_id: str, by: str = "moderator") -> QueuedPrompt | None:
        """Manual mode: queue a suggestion from the pool."""
        pool = {s.id: s for s in await self.store.suggestions(limit=1000)}
        chosen = pool.get(suggestion_id)
        if chosen is None:
            return None
        # Queued before it leaves the pool: a store failing in between leaves it in both, never in neither.
        entry = await self.store.enqueue(chosen.text, f"@{chosen.login} (approved by {by})", chosen.id,
                                         self.clock())
        self.redemptions.moved(pool_place(chosen.id), queue_place(entry.entry_id))
        await self.store.remove_suggestions([suggestion_id])
        self.last_activity = self.clock()
        self.hooks.prepare(entry.text)
        self.hooks.queued()
        await self._report_depth()
        return entry

    def request_skip(self) -> None:
        """Play the next queued prompt now, without waiting for the minimum play time."""
        self.skip_requested = True
        self.hooks.queued()

    async def enqueue_direct(self, text: str, chosen_by: str) -> QueuedPrompt:
        """A prompt from the panel or the scheduler: straight into the queue, played next."""
        entry = await self.store.enqueue(text, chosen_by, None, self.clock())
        if not chosen_by.startswith("schedule:"):
            self.last_activity = self.clock()  # the programme itself does not count as chat
        self.skip_requested = True  # the panel means now, not after the minimum play time
        self.hooks.prepare(entry.text)
        self.hooks.queued()
        await self._report_depth()
        return entry

    # --- the clock -----------------------------------------------------------------------------
    async def tick(self) -> None:
        """Open and close vote rounds, refund redemptions that waited too long; call a few times a second."""
        current = await self.store.current_round()
        await self._expire_redemptions(current)
        if self.mode != "vote":
            return  # rounds go on while paused: pause stops switching, not voting
        now = self.clock()
        if current is not None and not current.closed:
            if now >= current.closes_at:
                await self._finish_round(current)
            return
        if not self.chat_enabled:
            return  # nobody could vote: no new round
        pool = await self.store.suggestions(limit=self.settings.vote.options)
        if len(pool) >= min(self.settings.vote.min_suggestions, self.settings.vote.options):
            cfg = self.settings.vote
            new_round = await self.store.open_round(pool[: cfg.options], now, now + cfg.round_seconds)
            self._round = _RoundState()
            for option in new_round.options:
                self.hooks.prepare(option.text)  # any of them may win: encode them all now
            log.info("vote round %s open with %d options", new_round.id, len(new_round.options))
            listing = " | ".join(f"{i + 1}) {o.raw}" for i, o in enumerate(new_round.options))
            command = f"{self.settings.commands.prefix}{self.settings.commands.vote[0]}"
            await self._announce(f"Vote now with {command} <n> ({cfg.round_seconds:.0f}s): {listing}")

    async def _expire_redemptions(self, current: VoteRound | None) -> None:
        in_round = {o.id for o in current.options} if current is not None and not current.closed else set()
        expired = [(where, event) for where, event in self.redemptions.expired(self.clock(), "pool:")
                   if where.removeprefix("pool:") not in in_round]  # an option may still win
        if expired:
            await self.store.remove_suggestions([where.removeprefix("pool:") for where, _ in expired])
            await self._cancel(self.redemptions.settle_all(where for where, _ in expired), "expired")

    async def _finish_round(self, current: VoteRound) -> None:
        closed = await self.store.close_round(current.id)
        winner = self._winner(closed)
        if winner is None:
            # Nobody (or too few) voted: the options go back to the pool for the next round.
            again = await self.store.add_suggestions([
                Draft(o.text, o.raw, o.user_id, o.login, o.source, o.time) for o in closed.options])
            for option, back in zip(closed.options, again, strict=True):
                self.redemptions.moved(pool_place(option.id), pool_place(back.id))
            log.info("vote round %s: no winner (%d votes)", closed.id, sum(closed.tally))
            await self._announce("No winner this round: the suggestions stay in the pool")
            return
        entry = await self.store.enqueue(winner.text, f"@{winner.login} (vote)", winner.id, self.clock())
        self.hooks.queued()  # its text was prepared when the round opened
        self.redemptions.moved(pool_place(winner.id), queue_place(entry.entry_id))
        losers = [pool_place(o.id) for o in closed.options if o.id != winner.id]
        await self._cancel(self.redemptions.settle_all(losers), "outvoted or vetoed")
        log.info("vote round %s won by option from @%s with %d votes", closed.id, winner.login,
                 max(closed.tally))
        await self._announce(f"Winner: \"{winner.raw}\" by @{winner.login} ({max(closed.tally)} votes)")
        await self._report_depth()

    def _winner(self, closed: VoteRound) -> Suggestion | None:
        tally = [0 if i + 1 in self._round.vetoed else n for i, n in enumerate(closed.tally)]
        if not tally or sum(tally) < max(1, self.settings.vote.min_votes) or max(tally) == 0:
            return None
        best = max(tally)
        leaders = [i for i, n in enumerate(tally) if n == best]
        if self.settings.vote.tie_break == "random":
            import random

            return closed.options[random.choice(leaders)]
        return closed.options[min(leaders, key=lambda i: closed.options[i].time)]

    # --- the engine side -----------------------------------------------------------------------
    async def next_switch(self) -> QueuedPrompt | None:
        """The prompt to switch to at this block boundary, if any (not acknowledged yet)."""
        if self.paused:
            return None
        min_play = self.settings.queue.min_play_seconds if self.mode == "queue" else 0.0
        if not self.skip_requested and self.clock() - self.on_air_since < min_play:
            return None
        return await self.store.next_prompt()

    async def applied(self, prompt: QueuedPrompt) -> None:
        """The engine's first frame of `prompt` went out: acknowledge it and record it as playing."""
        await self.store.ack(prompt.entry_id)
        await self.store.set_now_playing(prompt)
        self.on_air_since = self.clock()
        self.skip_requested = False
        redeemed = self.redemptions.settle(queue_place(prompt.entry_id))
        if redeemed is not None and self.hooks.fulfill is not None:
            log.info("redemption %s of @%s fulfilled: on air", redeemed.redemption_id, redeemed.login)
            await self.hooks.fulfill(redeemed)
        await self._report_depth()

    async def _report_depth(self) -> int | None:
        # Only a gauge: a store that fails here must not turn a kept item into an error.
        try:
            depth = await self.store.queue_depth()
        except StoreUnavailable as exc:
            log.warning("queue depth not read: %s", exc)
            return None
        self.hooks.queue_depth(depth)
        return depth

    async def state(self) -> dict:
        """Round, tally, queue, pool and what is playing — for the API and the overlays."""
        current = await self.store.current_round()
        now_playing = await self.store.now_playing()
        return {
            "mode": self.mode,
            "chat_enabled": self.chat_enabled,
            "paused": self.paused,
            "now_playing": _prompt_dict(now_playing) if now_playing else None,
            "round": None if current is None else {
                "id": current.id, "closed": current.closed, "closes_at": current.closes_at,
                "options": [{"n": i + 1, "text": o.raw, "by": o.login, "votes": (current.tally or ())[i]
                             if i < len(current.tally) else 0, "vetoed": (i + 1) in self._round.vetoed}
                            for i, o in enumerate(current.options)],
            },
            "queue": [_prompt_dict(q) for q in await self.store.queued(limit=20)],
            "pool": [{"id": s.id, "text": s.raw, "by": s.login}
                     for s in await self.store.suggestions(limit=20)],
        }


def _intake_keys(pair: tuple[Intake, bool]) -> tuple[str, ...]:
    """What orders intakes: a voter's votes (the last one counts). Nothing else needs an order: of two
    deliveries of one message, whichever is stored first is the one, and they are the same."""
    intake = pair[0]
    return () if intake.option is None else (intake.user_id,)


def _prompt_dict(prompt: QueuedPrompt) -> dict:
    return {"text": prompt.text, "chosen_by": prompt.chosen_by, "time": prompt.time}
