"""What every chat source offers the steering core."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from chat.events import ChatEvent

Emit = Callable[[ChatEvent], Awaitable[None]]
"""Where a source delivers its events: called once per event, in arrival order; a source may run several
at once (the Twitch source does), so an emit must not assume the previous one has finished."""


class Delivery:
    """An emit that also takes several events at once: a busy source hands over what has piled up.

    Sources look for `many` (`getattr(emit, "many", None)`) and fall back to one call per event.
    """

    def __init__(self, one: Emit, many: Callable[[Sequence[ChatEvent]], Awaitable[None]]) -> None:
        self._one = one
        self._many = many

    async def __call__(self, event: ChatEvent) -> None:
        await self._one(event)

    async def many(self, events: Sequence[ChatEvent]) -> None:
        """Deliver `events` (in arrival order) in one call."""
        await self._many(events)


@runtime_checkable
class ChatSource(Protocol):
    """A place chat comes from (Twitch, the local control panel, ...).

    `run` is the only long-lived call: it connects, keeps the connection alive (reconnecting by itself) and
    emits every chat message as a `ChatEvent` until it is cancelled. `reply` and `refund` are best effort:
    they log what went wrong and never raise for network errors, so a flaky chat never stops the stream.
    """

    name: str

    async def run(self, emit: Emit) -> None:
        """Emit every chat message (and redemption) as a ChatEvent until cancelled; reconnects by itself."""
        ...

    async def reply(self, text: str, reply_to: ChatEvent | None = None) -> None:
        """Answer in chat (threaded under `reply_to` where the source can); best effort, never raises."""
        ...

    async def refund(self, event: ChatEvent) -> None:
        """Give back the channel points of a redemption event; a no-op for sources without them."""
        ...

    def status(self) -> dict[str, Any]:
        """At least: connected (bool), reconnects (int), last_error (str | None), messages (int)."""
        ...
