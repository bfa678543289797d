"""Chat typed into this service's own control panel or API."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any

from chat.events import ChatEvent, Role
from chat.settings import LocalSourceSettings
from chat.sources.base import Emit

log = logging.getLogger(__name__)


class LocalSource:
    """A chat source fed by the control API: `say` queues a message, `run` emits it.

    Messages said while nothing runs wait in a bounded queue (`asyncio.QueueFull` past `max_pending`).
    Replies are kept (the last `max_replies`) for the control panel to show.
    """

    def __init__(self, settings: LocalSourceSettings | None = None, *, name: str = "local",
                 max_pending: int = 1000, max_replies: int = 100) -> None:
        self.settings = settings or LocalSourceSettings()
        self.name = name
        self._queue: asyncio.Queue[ChatEvent] = asyncio.Queue(maxsize=max_pending)
        # (text, id of the message replied to)
        self.replies: deque[tuple[str, str | None]] = deque(maxlen=max_replies)
        self._running = False
        self._messages = 0

    def event(self, login: str, text: str, roles: Iterable[Role] = frozenset({Role.BROADCASTER}), *,
              user_id: str | None = None, display_name: str | None = None) -> ChatEvent:
        """The event for one message as if `login` had typed it (counted as received)."""
        self._messages += 1
        return ChatEvent(
            source=self.name,
            message_id=uuid.uuid4().hex,
            user_id=user_id or f"{self.name}:{login}",
            login=login,
            display_name=display_name or login,
            text=text,
            time=time.time(),
            roles=frozenset(roles) or frozenset({Role.VIEWER}),
        )

    async def say(self, login: str, text: str, roles: Iterable[Role] = frozenset({Role.BROADCASTER}), *,
                  user_id: str | None = None, display_name: str | None = None) -> ChatEvent:
        """Queue one message as if `login` had typed it; returns the event that `run` will emit."""
        event = self.event(login, text, roles, user_id=user_id, display_name=display_name)
        self._queue.put_nowait(event)
        return event

    def reply_to(self, event: ChatEvent) -> str | None:
        """The last reply given to `event`, if any (what the control API shows the sender)."""
        return next((text for text, to in reversed(self.replies) if to == event.message_id), None)

    async def run(self, emit: Emit) -> None:
        self._running = True
        try:
            while True:
                event = await self._queue.get()
                try:
                    await emit(event)
                except Exception:  # a consumer bug must not stop the source
                    log.exception("%s: emit failed for message %s", self.name, event.message_id)
        finally:
            self._running = False

    async def reply(self, text: str, reply_to: ChatEvent | None = None) -> None:
        self.replies.append((text, reply_to.message_id if reply_to is not None else None))
        log.info("%s reply: %s", self.name, text)

    async def refund(self, event: ChatEvent) -> None:
        """The local panel has no channel points: nothing to give back."""

    def status(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "kind": "local",
            "connected": self._running,
            "reconnects": 0,
            "last_error": None,
            "messages": self._messages,
            "pending": self._queue.qsize(),
        }
