"""`promptcast bench chat [--redis URL]`: chat events through the path the service runs them on.

Events go through the Twitch source's pump (`chat.sources.pump.Pump`) into `Steering.handle_many`
(parse, duplicate check, votes, moderation, the batched store step). Two runs, each on a channel of
its own and each checked exactly at the end (the tally must equal every viewer's last vote, every
suggestion must be in the pool; otherwise this raises):

- **throughput**: the whole stream queued at once (a backlog bigger than any Twitch chat makes), the
  pump handing over what piled up: votes/s, events/s, and latency from the pump taking an event to
  everything it changed being stored;
- **latency at a steady load**: the same kind of stream offered at `paced_rate` events/s, latency from
  an event's arrival to everything stored.

With Redis, the pipelined ceiling of the same client library (SET NX PX in pipelines of 1000) is
measured in the same run, for scale.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from chat.events import ChatEvent, Role
from chat.redis_store import redact_url
from chat.settings import ChatSettings
from chat.sources.base import Delivery
from chat.sources.pump import Pump
from chat.steering import Steering
from chat.store import SteeringStore

OPTIONS = 4


@dataclass
class _Stream:
    """Events in delivery order and what the tally must be once they are all handled."""

    events: list[ChatEvent] = field(default_factory=list)
    votes: int = 0
    prompts: int = 0
    last: dict[int, int] = field(default_factory=dict)  # viewer -> their last vote

    @property
    def expected(self) -> tuple[int, ...]:
        return tuple(sum(1 for o in self.last.values() if o == option) for option in range(1, OPTIONS + 1))


def _event(user: int, text: str, message_id: str) -> ChatEvent:
    return ChatEvent(source="bench", message_id=message_id, user_id=str(user), login=f"v{user}",
                     display_name=f"v{user}", text=text, time=time.time(), roles=frozenset({Role.VIEWER}))


def _stream(viewers: int, rng: random.Random) -> _Stream:
    """Every viewer votes, a quarter vote again later, 2 % of the votes come twice, 1 in 25 is a prompt."""
    plan = [("vote", user, f"!vote {rng.randint(1, OPTIONS)}") for user in range(viewers)]
    for user in rng.sample(range(viewers), viewers // 4):
        plan.insert(rng.randint(user + 1, len(plan)), ("vote", user, f"!vote {rng.randint(1, OPTIONS)}"))
    for index in rng.sample(range(len(plan)), len(plan) // 50):
        plan.insert(rng.randint(index + 1, len(plan)), ("again", index, ""))
    for n in range(len(plan) // 24):
        plan.insert(rng.randint(0, len(plan)), ("prompt", n, f"!prompt viewer {n} suggests a calm lake"))
    stream = _Stream()
    for position, (kind, ref, text) in enumerate(plan):
        if kind == "again":  # the same notification again: the same message id
            stream.events.append(stream.events[min(ref, len(stream.events) - 1)])
            continue
        stream.events.append(_event(ref + (10**8 if kind == "prompt" else 0), text, f"m{position}"))
        if kind == "vote":
            stream.votes += 1
            stream.last[ref] = int(text.split()[1])
        else:
            stream.prompts += 1
    return stream


def _store(redis_url: str | None, name: str) -> SteeringStore:
    if redis_url:
        from chat.redis_store import RedisStore

        return RedisStore(redis_url, f"bench-{os.getpid()}-{name}", max_connections=20)
    from chat.memory_store import MemoryStore

    return MemoryStore()


async def _run(redis_url: str | None, name: str, stream: _Stream, paced_rate: float | None) -> dict:
    """One channel, one stream through the pump; elapsed seconds, latencies, and the exactness check."""
    store = _store(redis_url, name)
    settings = ChatSettings(mode="vote", vote={"options": OPTIONS, "min_suggestions": OPTIONS,
                                               "round_seconds": 600},
                            moderation={"rate_limit_per_minute": 10_000, "flood_messages": 10_000,
                                        "duplicate_window_seconds": 0})
    steering = Steering(settings, store)
    for n in range(OPTIONS):
        await steering.handle(_event(10**9 + n, f"!prompt a scene number {n} with a red fox", f"setup{n}"))
    await steering.tick()
    queue: asyncio.Queue[ChatEvent] = asyncio.Queue()
    arrived: dict[int, float] = {}  # id(event) -> when it was queued (paced run)
    latencies: list[float] = []
    done = asyncio.Event()
    total = len(stream.events)

    async def many(batch: Sequence[ChatEvent]) -> None:  # what the service's emit does, timed
        taken = time.perf_counter()
        await steering.handle_many(batch)
        now = time.perf_counter()
        latencies.extend(now - arrived.get(id(e), taken) for e in batch)
        if len(latencies) >= total:
            done.set()

    async def one(event: ChatEvent) -> None:
        await many((event,))

    pump = asyncio.create_task(Pump(queue, Delivery(one, many)).run())
    t0 = time.perf_counter()
    if paced_rate is None:
        for event in stream.events:
            queue.put_nowait(event)
    else:
        tick = 0.005  # a small burst every 5 ms: how chat arrives off the socket
        for start in range(0, total, max(1, int(paced_rate * tick))):
            await asyncio.sleep(max(0.0, t0 + start / paced_rate - time.perf_counter()))
            for event in stream.events[start:start + max(1, int(paced_rate * tick))]:
                arrived[id(event)] = time.perf_counter()
                queue.put_nowait(event)
    await done.wait()
    elapsed = time.perf_counter() - t0
    pump.cancel()
    current = await store.current_round()
    pool = len(await store.suggestions(limit=10**6))
    await store.close()
    tally = tuple(current.tally) if current else ()
    return {"elapsed": elapsed, "latencies": sorted(latencies), "tally": tally,
            "exact": tally == stream.expected and pool == stream.prompts,
            "detail": f"tally {list(tally)} (expected {list(stream.expected)}), {pool} of "
                      f"{stream.prompts} suggestions in the pool",
            "batch": steering._intake.items / max(1, steering._intake.batches)}


def _ms(latencies: list[float], share: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * share))] * 1000


def bench_chat(redis_url: str | None = None, viewers: int = 20_000, paced_rate: float = 5_000,
               seed: int = 5, ceiling_commands: int = 100_000) -> str:
    """Votes/s, events/s and latency on the memory store or a Redis; see the module docstring."""
    from broadcaster.bench import machine

    rng = random.Random(seed)
    burst, steady = _stream(viewers, rng), _stream(max(1, int(paced_rate * 2 / 1.35)), rng)

    async def both() -> tuple[dict, dict, float | None]:
        fast = await _run(redis_url, "throughput", burst, None)
        paced = await _run(redis_url, "paced", steady, paced_rate)
        ceiling = await _redis_pipelined_ceiling(redis_url, ceiling_commands) if redis_url else None
        return fast, paced, ceiling

    fast, paced, ceiling = asyncio.run(both())
    votes_per_s = burst.votes / fast["elapsed"]
    store = f"redis ({redact_url(redis_url)})" if redis_url else "memory"
    lines = [
        f"bench chat: {len(burst.events)} events ({burst.votes} votes from {viewers} viewers, "
        f"{len(burst.events) - burst.votes - burst.prompts} redelivered, {burst.prompts} suggestions) "
        f"through the Twitch source's pump (up to 256 events a call, 4 calls at once), store {store}",
        f"machine: {machine()}",
        f"votes: {votes_per_s:,.0f} votes/s; events: {len(burst.events) / fast['elapsed']:,.0f} events/s "
        f"(all queued at once); latency p50 {_ms(fast['latencies'], 0.5):.1f} ms, p99 "
        f"{_ms(fast['latencies'], 0.99):.1f} ms; {fast['batch']:.0f} events per store batch",
        f"at a steady {paced_rate:,.0f} events/s ({len(steady.events)} events): latency p50 "
        f"{_ms(paced['latencies'], 0.5):.1f} ms, p99 {_ms(paced['latencies'], 0.99):.1f} ms "
        f"(arrival to stored); {paced['batch']:.0f} events per store batch",
        f"exact: {fast['detail']}; steady run: {paced['detail']}",
    ]
    if ceiling:
        lines.append(f"redis pipelined ceiling (same client library, SET NX PX, pipelines of 1000): "
                     f"{ceiling:,.0f} commands/s; votes/s is {votes_per_s / ceiling:.1%} of it")
    if not (fast["exact"] and paced["exact"]):
        raise RuntimeError("\n".join([*lines, "bench chat: a tally is not exact"]))
    return "\n".join(lines)


async def _redis_pipelined_ceiling(url: str, commands: int = 100_000, depth: int = 1000) -> float:
    """Plain pipelined commands per second from redis.asyncio on `url` (its keys expire within a minute)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    prefix = f"bench-ceiling-{os.getpid()}:"
    try:
        t0 = time.perf_counter()
        for start in range(0, commands, depth):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(start, start + depth):
                    pipe.set(f"{prefix}{i}", 1, nx=True, px=60_000)
                await pipe.execute()
        return commands / (time.perf_counter() - t0)
    finally:
        await client.aclose()
