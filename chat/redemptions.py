"""Channel-point redemptions on their way to the air: each one ends FULFILLED or CANCELED (refunded).

A redemption becomes a suggestion (vote, manual) or a queued prompt (queue). Steering tells this ledger
where it went (`track`), where it moved (`moved`: into a round, back to the pool, into the queue) and how
it ended (`settle`). The rule: FULFILLED when the prompt reaches the air; CANCELED, which refunds the
viewer's points, when it never will: refused at intake, outvoted, vetoed, banned, or not on air within
`expire_s`. Kept in the channel process: after a restart, open redemptions stay in the broadcaster's
request queue on Twitch (docs/chat.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chat.events import ChatEvent


@dataclass
class _Open:
    event: ChatEvent
    since: float  # when it was redeemed (the clock steering runs on)


class Redemptions:
    """Open redemptions by where they are now: `pool:<suggestion id>` or `queue:<entry id>`."""

    def __init__(self, expire_s: float) -> None:
        self.expire_s = expire_s
        self._open: dict[str, _Open] = {}

    def __len__(self) -> int:
        return len(self._open)

    def track(self, where: str, event: ChatEvent, now: float) -> None:
        """`event` (a redemption) is now at `where`."""
        self._open[where] = _Open(event, now)

    def moved(self, before: str, after: str) -> None:
        """What was at `before` is now at `after` (no-op when nothing was)."""
        found = self._open.pop(before, None)
        if found is not None:
            self._open[after] = found

    def settle(self, where: str) -> ChatEvent | None:
        """The redemption at `where`, which ends now (None when there was none)."""
        found = self._open.pop(where, None)
        return found.event if found is not None else None

    def settle_all(self, places: Iterable[str]) -> list[ChatEvent]:
        """The redemptions at any of `places`, which end now."""
        return [event for event in map(self.settle, places) if event is not None]

    def expired(self, now: float, where_prefix: str = "") -> list[tuple[str, ChatEvent]]:
        """Open redemptions (at places starting with `where_prefix`) redeemed `expire_s` or more ago."""
        return [(where, o.event) for where, o in self._open.items()
                if where.startswith(where_prefix) and now - o.since >= self.expire_s]


def pool(suggestion_id: str) -> str:
    """The ledger place of a suggestion in the pool (or a round)."""
    return f"pool:{suggestion_id}"


def queue(entry_id: str) -> str:
    """The ledger place of a queued prompt."""
    return f"queue:{entry_id}"
