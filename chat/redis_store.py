"""The Redis steering store: production state and the bus between channel processes.

Every key lives under `promptcast:<channel>:`, so several channels share one Redis. The
suggestion pool and the prompt queue are Redis Streams; the queue is read through a
consumer group and an entry leaves it only when `ack` is called (after the engine applied
the switch), so a crash or restart of either side loses nothing. Votes go through one Lua
script, so one user has one vote per round however many processes count them. Layout,
rules and limits: docs/store.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from chat.events import Draft, Ingested, Intake, QueuedPrompt, Suggestion, VoteOutcome, VoteRound
from chat.memory_store import HISTORY_LENGTH, MAX_POOL, RoundNotFound, RoundStillOpen, ingested
from chat.store import StoreUnavailable  # one type for every store, so the API can answer 503

__all__ = ["QUEUE_GROUP", "RedisStore", "RoundNotFound", "RoundStillOpen", "StoreUnavailable"]

QUEUE_GROUP = "players"  # the consumer group every channel process reads the prompt queue through
_CHANNEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STREAM_ID = re.compile(r"^\d+-\d+$")


# Opening a round: refuse while one is open; new id; fresh counters; options leave the pool.
# KEYS: round, round:votes, round:seq, suggestions.  ARGV: options JSON, opened_at, closes_at, n, ids...
_OPEN_ROUND = """
local current = redis.call('HMGET', KEYS[1], 'id', 'closed')
if current[1] and current[2] ~= '1' then return {0, current[1]} end
local id = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2])
local n = tonumber(ARGV[4])
local fields = {'id', id, 'options', ARGV[1], 'opened_at', ARGV[2], 'closes_at', ARGV[3],
                'closed', '0', 'n', n}
for i = 1, n do
  fields[#fields + 1] = 'c' .. i
  fields[#fields + 1] = 0
end
redis.call('HSET', KEYS[1], unpack(fields))
if #ARGV > 4 then redis.call('XDEL', KEYS[4], unpack(ARGV, 5)) end
return {1, id}
"""

# One vote. KEYS: round, round:votes.  ARGV: round id, user id, option, last_vote_counts (1/0), now or ''.
# Returns {accepted (1/0), reason, count of option 1, ..., count of option n}.
_CAST_VOTE = """
local r = redis.call('HMGET', KEYS[1], 'id', 'closed', 'closes_at', 'n')
if not r[1] then return {0, 'no_round'} end
if r[1] ~= ARGV[1] then
  local asked, current = tonumber(ARGV[1]), tonumber(r[1])
  if asked and current and asked < current then return {0, 'round_closed'} end
  return {0, 'no_round'}
end
local n = tonumber(r[4])
local function answer(accepted, reason)
  local names = {}
  for i = 1, n do names[i] = 'c' .. i end
  local counts = redis.call('HMGET', KEYS[1], unpack(names))
  local out = {accepted, reason}
  for i = 1, n do out[i + 2] = tonumber(counts[i]) or 0 end
  return out
end
if r[2] == '1' then return answer(0, 'round_closed') end
if ARGV[5] ~= '' and tonumber(ARGV[5]) >= tonumber(r[3]) then return answer(0, 'round_closed') end
local option = tonumber(ARGV[3])
if not option or option ~= math.floor(option) or option < 1 or option > n then
  return answer(0, 'bad_option')
end
local previous = tonumber(redis.call('HGET', KEYS[2], ARGV[2]))
local reason = 'counted'
if previous then
  if previous == option then return answer(1, 'unchanged') end
  if ARGV[4] ~= '1' then return answer(0, 'unchanged') end
  redis.call('HINCRBY', KEYS[1], 'c' .. previous, -1)
  reason = 'changed'
end
redis.call('HSET', KEYS[2], ARGV[2], option)
redis.call('HINCRBY', KEYS[1], 'c' .. option, 1)
return answer(1, reason)
"""

# A batch of chat events in one step: each message id is recorded (SET NX: a repeat is a duplicate and
# does nothing else), and each vote among them is counted by the rules of _CAST_VOTE against the round
# open now. The counters are read once and written once per batch. Being one script, a vote and its
# message id are stored together or not at all: a redelivery after a failed batch is counted once.
# The items travel as one flat JSON array and the codes come back as one string: at thousands of events
# a second, one Redis argument (or one Lua table) per field costs more than the work itself.
# KEYS: round, round:votes, banned.  ARGV: with_banned (1/0), the seen-key prefix, ttl ms,
# last_vote_counts (1/0), JSON [seen key suffix, user id, option or null, now or null, ...] (4 per item).
# The seen keys are built here from the prefix (so, like the rest of the layout, not for Redis Cluster).
# Returns {codes joined by ',', tally after the batch, banned texts (when asked)}.
_INGEST = """
local r = redis.call('HMGET', KEYS[1], 'id', 'closed', 'closes_at', 'n')
local open = r[1] and r[2] ~= '1'
local n = tonumber(r[4]) or 0
local closes_at = tonumber(r[3])
local counts = {}
if open then
  local names = {}
  for i = 1, n do names[i] = 'c' .. i end
  local stored = redis.call('HMGET', KEYS[1], unpack(names))
  for i = 1, n do counts[i] = tonumber(stored[i]) or 0 end
end
local null = cjson.null
local prefix, ttl, last_counts = ARGV[2], ARGV[3], ARGV[4] == '1'
local changed = false
local codes = {}
local flat = cjson.decode(ARGV[5])
for i = 1, #flat / 4 do
  local at = i * 4 - 3
  local option, now = flat[at + 2], flat[at + 3]
  local code
  if not redis.call('SET', prefix .. flat[at], '1', 'NX', 'PX', ttl) then
    code = 'duplicate'
  elseif option == null then
    code = 'new'
  elseif not open then
    code = 'no_round'
  elseif now ~= null and now >= closes_at then
    code = 'round_closed'
  elseif option ~= math.floor(option) or option < 1 or option > n then
    code = 'bad_option'
  else
    local user = flat[at + 1]
    local previous = tonumber(redis.call('HGET', KEYS[2], user))
    if previous == option then
      code = 'unchanged'
    elseif previous and not last_counts then
      code = 'kept'
    else
      if previous then
        counts[previous] = counts[previous] - 1
        code = 'changed'
      else
        code = 'counted'
      end
      counts[option] = counts[option] + 1
      redis.call('HSET', KEYS[2], user, option)
      changed = true
    end
  end
  codes[i] = code
end
if changed then
  local fields = {}
  for i = 1, n do
    fields[#fields + 1] = 'c' .. i
    fields[#fields + 1] = counts[i]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
end
local banned = {}
if ARGV[1] == '1' then banned = redis.call('SMEMBERS', KEYS[3]) end
return {table.concat(codes, ','), counts, banned}
"""

# Close: after this no vote counts (cast_vote checks `closed` in the same single-threaded step).
# KEYS: round.  ARGV: round id.  Returns the round hash, or nil for another id.
_CLOSE_ROUND = """
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'closed', '1')
return redis.call('HGETALL', KEYS[1])
"""

# The oldest unacknowledged entry: the oldest pending one (claimed for this consumer, whoever
# had it), else the next undelivered one. KEYS: queue.  ARGV: group, consumer.
_NEXT_PROMPT = """
for _ = 1, 100 do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1)
  if #pending == 0 then break end
  local id = pending[1][1]
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
  if claimed[1] and type(claimed[1][2]) == 'table' then return claimed[1] end
  redis.call('XACK', KEYS[1], ARGV[1], id)  -- the entry was deleted: drop it from the pending list
end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if not read then return false end
return read[1][2][1]
"""

# Acknowledge and delete in one step, so `queued` (XRANGE) lists exactly the unacknowledged ones.
# KEYS: queue.  ARGV: group, entry id.
_ACK = """
redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _num(value: float) -> str:
    """A float as text that both Lua's tonumber and Python's float read back exactly."""
    value = float(value)
    if math.isnan(value):
        raise ValueError("NaN is not a time")
    if math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return repr(value)


def _option_arg(option: object) -> int | None:
    """A vote's option as the ingest script takes it: None for no vote, 0 for anything not an int."""
    if option is None:
        return None
    return option if isinstance(option, int) and not isinstance(option, bool) else 0


def _fields(flat: list[Any]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _suggestion(entry_id: str, f: dict[str, str]) -> Suggestion:
    return Suggestion(id=entry_id, text=f["text"], raw=f["raw"], user_id=f["user_id"], login=f["login"],
                      source=f["source"], time=float(f["time"]))


def _prompt(entry_id: str, f: dict[str, str]) -> QueuedPrompt:
    return QueuedPrompt(entry_id=entry_id, text=f["text"], chosen_by=f["chosen_by"],
                        suggestion_id=f.get("suggestion_id"), time=float(f["time"]))


def _prompt_from_json(data: str) -> QueuedPrompt:
    return QueuedPrompt(**json.loads(data))


def _round(h: dict[str, str]) -> VoteRound:
    n = int(h["n"])
    return VoteRound(id=h["id"], options=tuple(Suggestion(**o) for o in json.loads(h["options"])),
                     opened_at=float(h["opened_at"]), closes_at=float(h["closes_at"]),
                     closed=h["closed"] == "1",
                     tally=tuple(int(h.get(f"c{i}", 0)) for i in range(1, n + 1)))


class RedisStore:
    """`SteeringStore` in Redis for one channel; safe to share between tasks of one event loop."""

    def __init__(self, url: str, channel: str, max_connections: int = 20, *, consumer: str = "player",
                 op_timeout: float = 8.0, pool_timeout: float = 5.0, socket_timeout: float = 3.0,
                 retries: int = 4, health_check_interval: float = 15.0, max_pool: int = MAX_POOL,
                 history_length: int = HISTORY_LENGTH) -> None:
        """Connect lazily to `url` (redis://, rediss://, unix://); nothing is sent before the first call.

        `consumer` names this reader in the queue's consumer group; a process that restarts
        with the same name (or any name: pending entries are claimed) resumes where it was.
        Each call takes at most about `op_timeout` seconds, else StoreUnavailable.
        """
        if not _CHANNEL.match(channel):
            raise ValueError(f"channel {channel!r}: 1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.channel = channel
        self.prefix = f"promptcast:{channel}:"
        self.consumer = consumer
        self._url = redact_url(url)
        self._op_timeout = op_timeout
        self._max_pool = max_pool
        self._history_length = history_length
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout, 2.0),
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
            retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
            health_check_interval=health_check_interval,
            client_name=f"promptcast:{channel}",  # CLIENT LIST shows whose connections these are
        )
        self._redis = Redis(connection_pool=self._pool)
        self._open_round = self._redis.register_script(_OPEN_ROUND)
        self._cast_vote = self._redis.register_script(_CAST_VOTE)
        self._close_round = self._redis.register_script(_CLOSE_ROUND)
        self._next_prompt = self._redis.register_script(_NEXT_PROMPT)
        self._ack = self._redis.register_script(_ACK)
        self._ingest = self._redis.register_script(_INGEST)
        self._group_ready = False
        k = self.key
        self._k_suggestions, self._k_queue = k("suggestions"), k("queue")
        self._k_round, self._k_votes, self._k_seq = k("round"), k("round:votes"), k("round:seq")
        self._k_now, self._k_history, self._k_banned = k("now"), k("history"), k("banned")

    def key(self, name: str) -> str:
        """The full Redis key of one of this channel's keys (`promptcast:<channel>:<name>`)."""
        return self.prefix + name

    def __repr__(self) -> str:
        return f"RedisStore({self._url!r}, channel={self.channel!r})"

    @contextlib.asynccontextmanager
    async def _call(self, what: str) -> AsyncIterator[None]:
        """Bound the call in time and turn connection trouble into StoreUnavailable."""
        try:
            async with asyncio.timeout(self._op_timeout):
                yield
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            where = f"redis store {self._url} ({self.channel})"
            raise StoreUnavailable(f"{where}: {what} failed: {detail}") from exc

    # -- suggestions --------------------------------------------------------------------------

    async def add_suggestion(self, text: str, raw: str, user_id: str, login: str, source: str,
                             time: float) -> Suggestion:
        """Add to the pool; returns it with its id (the stream entry id)."""
        return (await self.add_suggestions([Draft(text, raw, user_id, login, source, time)]))[0]

    async def add_suggestions(self, drafts: list[Draft]) -> list[Suggestion]:
        """Add several to the pool in one pipelined round trip (XADDs, in order); returns them with ids."""
        if not drafts:
            return []
        async with self._call("add_suggestions"), self._redis.pipeline(transaction=False) as pipe:
            for d in drafts:
                pipe.xadd(self._k_suggestions, {"text": d.text, "raw": d.raw, "user_id": d.user_id,
                                                "login": d.login, "source": d.source, "time": _num(d.time)},
                          maxlen=self._max_pool, approximate=True)
            ids = await pipe.execute()
        return [d.stored(entry_id) for entry_id, d in zip(ids, drafts, strict=True)]

    async def suggestions(self, limit: int = 100) -> list[Suggestion]:
        """The pool, oldest first."""
        if limit <= 0:
            return []
        async with self._call("suggestions"):
            entries = await self._redis.xrange(self._k_suggestions, count=limit)
        return [_suggestion(entry_id, f) for entry_id, f in entries]

    async def remove_suggestions(self, ids: list[str]) -> None:
        """Drop suggestions (used in a round, vetoed, banned); unknown ids are ignored."""
        ids = [i for i in ids if _STREAM_ID.match(i)]
        if ids:
            async with self._call("remove_suggestions"):
                await self._redis.xdel(self._k_suggestions, *ids)

    # -- vote rounds --------------------------------------------------------------------------

    async def open_round(self, options: list[Suggestion], opened_at: float, closes_at: float) -> VoteRound:
        """Start a vote round; RoundStillOpen if the previous one is open. Its options leave the pool."""
        if not options:
            raise ValueError("a round needs at least one option")
        options_json = json.dumps([asdict(o) for o in options])
        ids = [o.id for o in options if _STREAM_ID.match(o.id)]
        async with self._call("open_round"):
            ok, round_id = await self._open_round(
                keys=[self._k_round, self._k_votes, self._k_seq, self._k_suggestions],
                args=[options_json, _num(opened_at), _num(closes_at), len(options), *ids])
        if not ok:
            raise RoundStillOpen(f"round {round_id} is still open")
        return VoteRound(id=str(round_id), options=tuple(options), opened_at=float(opened_at),
                         closes_at=float(closes_at), tally=(0,) * len(options))

    async def current_round(self) -> VoteRound | None:
        """The open round, or the last closed one until a new one opens; tally included."""
        async with self._call("current_round"):
            h = await self._redis.hgetall(self._k_round)
        return _round(h) if h else None

    async def cast_vote(self, round_id: str, user_id: str, option: int, last_vote_counts: bool = True,
                        now: float | None = None) -> VoteOutcome:
        """One vote per user per round, atomically (one Lua script); `option` is 1-based.

        Reasons: counted (first vote), changed (a different option replaced the earlier
        vote), unchanged (same option again: accepted; or a different one while the first
        vote counts: refused), no_round, round_closed (closed, or `now` >= closes_at),
        bad_option.
        """
        valid = isinstance(option, int) and not isinstance(option, bool)
        args = [round_id, user_id, option if valid else 0, 1 if last_vote_counts else 0,
                "" if now is None else _num(now)]
        async with self._call("cast_vote"):
            accepted, reason, *tally = await self._cast_vote(keys=[self._k_round, self._k_votes], args=args)
        return VoteOutcome(bool(accepted), reason, tuple(int(c) for c in tally))

    async def ingest(self, items: list[Intake], bans: bool = False) -> tuple[list[Ingested], list[str]]:
        """Record a batch of message ids and count the votes among them in one round trip (one script).

        See `SteeringStore.ingest`.
        """
        if not items and not bans:
            return [], []
        groups: dict[tuple[int, bool], list[int]] = {}  # item indexes; one script call each (one in practice)
        for index, item in enumerate(items):
            groups.setdefault((max(1, int(item.ttl_s * 1000)), bool(item.last_vote_counts)), []).append(index)
        codes = [""] * len(items)
        tally: tuple[int, ...] = ()
        banned: list[str] = []
        async with self._call("ingest"):
            for (ttl_ms, last_counts), group in groups.items() or {(1, True): []}.items():
                flat: list[Any] = []
                for index in group:
                    item = items[index]
                    flat += (f"{item.source}:{item.message_id}", item.user_id, _option_arg(item.option),
                             None if item.now is None else float(item.now))
                joined, counts, banned = await self._ingest(
                    keys=[self._k_round, self._k_votes, self._k_banned],
                    args=[1 if bans else 0, self.key("seen:"), ttl_ms, 1 if last_counts else 0,
                          json.dumps(flat, allow_nan=False)])
                for index, code in zip(group, joined.split(",") if joined else [], strict=True):
                    codes[index] = code
                tally = tuple(int(c) for c in counts)
        return ingested(items, codes, tally), sorted(banned) if bans else []

    async def close_round(self, round_id: str) -> VoteRound:
        """Close the round (no vote counts after this) and return it with its final tally.

        Closing a closed round returns it again; RoundNotFound for any other id.
        """
        async with self._call("close_round"):
            flat = await self._close_round(keys=[self._k_round], args=[round_id])
        if not flat:
            raise RoundNotFound(f"no round {round_id!r}")
        return _round(_fields(flat))

    # -- prompt queue -------------------------------------------------------------------------

    async def _ensure_group(self, force: bool = False) -> None:
        if self._group_ready and not force:
            return
        try:
            # From id 0: entries added before the group existed are delivered too.
            await self._redis.xgroup_create(self._k_queue, QUEUE_GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def enqueue(self, text: str, chosen_by: str, suggestion_id: str | None,
                      time: float) -> QueuedPrompt:
        """Append to the prompt queue."""
        fields = {"text": text, "chosen_by": chosen_by, "time": _num(time)}
        if suggestion_id is not None:
            fields["suggestion_id"] = suggestion_id
        async with self._call("enqueue"):
            entry_id = await self._redis.xadd(self._k_queue, fields)
        return QueuedPrompt(entry_id=entry_id, text=text, chosen_by=chosen_by, suggestion_id=suggestion_id,
                            time=float(time))

    async def next_prompt(self) -> QueuedPrompt | None:
        """The oldest unacknowledged entry (the same one again until it is acknowledged).

        Pending entries (delivered, not acknowledged, possibly to a consumer that has since
        died) come first and are claimed for this consumer; then new ones.
        """
        async with self._call("next_prompt"):
            await self._ensure_group()
            try:
                entry = await self._next_prompt(keys=[self._k_queue], args=[QUEUE_GROUP, self.consumer])
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The group vanished (Redis restarted without persistence, or the key was deleted).
                await self._ensure_group(force=True)
                entry = await self._next_prompt(keys=[self._k_queue], args=[QUEUE_GROUP, self.consumer])
        if not entry:
            return None
        entry_id, flat = entry
        return _prompt(entry_id, _fields(flat))

    async def ack(self, entry_id: str) -> None:
        """The engine applied this entry: acknowledge and delete it for good (unknown ids: no-op)."""
        if not _STREAM_ID.match(entry_id):
            return
        async with self._call("ack"):
            await self._ack(keys=[self._k_queue], args=[QUEUE_GROUP, entry_id])

    async def queued(self, limit: int = 50) -> list[QueuedPrompt]:
        """Unacknowledged entries (pending and undelivered), oldest first."""
        if limit <= 0:
            return []
        async with self._call("queued"):
            entries = await self._redis.xrange(self._k_queue, count=limit)
        return [_prompt(entry_id, f) for entry_id, f in entries]

    async def queue_depth(self) -> int:
        """How many entries wait (delivered but unacknowledged ones included)."""
        async with self._call("queue_depth"):
            return int(await self._redis.xlen(self._k_queue))

    # -- on air -------------------------------------------------------------------------------

    async def set_now_playing(self, prompt: QueuedPrompt) -> None:
        """Record what is on air (for overlays) and append it to the capped history."""
        data = json.dumps(asdict(prompt))
        async with self._call("set_now_playing"), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k_now, data)
            pipe.lpush(self._k_history, data)
            pipe.ltrim(self._k_history, 0, self._history_length - 1)
            await pipe.execute()

    async def now_playing(self) -> QueuedPrompt | None:
        """What is on air."""
        async with self._call("now_playing"):
            data = await self._redis.get(self._k_now)
        return _prompt_from_json(data) if data else None

    async def history(self, limit: int = 50) -> list[QueuedPrompt]:
        """What was played, newest first."""
        if limit <= 0:
            return []
        async with self._call("history"):
            items = await self._redis.lrange(self._k_history, 0, limit - 1)
        return [_prompt_from_json(item) for item in items]

    # -- moderation ---------------------------------------------------------------------------

    async def ban(self, text: str) -> None:
        """Ban a prompt text (moderator `!banprompt`); matched after normalisation by moderation."""
        async with self._call("ban"):
            await self._redis.sadd(self._k_banned, text)

    async def banned(self) -> list[str]:
        """Banned prompt texts, sorted."""
        async with self._call("banned"):
            return sorted(await self._redis.smembers(self._k_banned))

    async def seen_message(self, source: str, message_id: str, ttl_s: float = 600) -> bool:
        """True if this message id was seen within ttl_s (records it otherwise): at-least-once delivery."""
        key = self.key(f"seen:{source}:{message_id}")
        async with self._call("seen_message"):
            created = await self._redis.set(key, 1, nx=True, px=max(1, int(ttl_s * 1000)))
        return not created

    async def close(self) -> None:
        """Release connections (the data stays in Redis)."""
        with contextlib.suppress(Exception):
            await self._redis.aclose()
        await self._pool.disconnect()
