"""`promptcast_chat_source_*` metrics: each chat source's `status()`, read when Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chat.sources.base import ChatSource

# (metric name, help, status key, counter?) for the numbers every source may report
_NUMBERS = (
    ("connected", "1 while the source receives chat", "connected", False),
    ("reconnects", "Connections made again after one was lost", "reconnects", True),
    ("session_reconnects", "Twitch session_reconnect hand-overs", "session_reconnects", True),
    ("messages", "Chat messages the source delivered", "messages", True),
    ("redemptions", "Channel-point redemptions the source delivered", "redemptions", True),
    ("duplicates_dropped", "EventSub re-deliveries dropped", "duplicates_dropped", True),
    ("replies_sent", "Chat replies sent", "replies_sent", True),
    ("replies_dropped", "Chat replies dropped (over the limit, or not connected)", "replies_dropped", True),
    ("replies_failed", "Chat replies Twitch refused or that failed", "replies_failed", True),
    ("reply_limit", "Chat replies allowed per 30 s (by the bot's role)", "reply_limit", False),
    ("last_message_age_seconds", "Seconds since the last chat message", "last_message_age_s", False),
)


class SourceCollector(Collector):
    """Reads the sources' status at every scrape: no state of its own, nothing to keep in step."""

    def __init__(self, sources: Sequence[ChatSource]) -> None:
        self._sources = sources

    def describe(self) -> Iterable[Metric]:
        return []  # generated at scrape time; an empty description keeps the registry from calling collect

    def collect(self) -> Iterator[Metric]:
        statuses = [status for status in map(_status, self._sources) if status is not None]
        for name, help_text, key, counter in _NUMBERS:
            family_type = CounterMetricFamily if counter else GaugeMetricFamily
            family = family_type(f"promptcast_chat_source_{name}", help_text, labels=["source", "kind"])
            for status in statuses:
                value = status.get(key)
                if isinstance(value, bool | int | float):
                    family.add_metric([str(status.get("source")), str(status.get("kind"))], float(value))
            yield family
        revoked = GaugeMetricFamily("promptcast_chat_source_revoked",
                                    "1 for each subscription Twitch revoked (until a reload)",
                                    labels=["source", "subscription", "reason"])
        for status in statuses:
            for subscription, reason in (status.get("revoked") or {}).items():
                revoked.add_metric([str(status.get("source")), subscription, reason], 1.0)
        yield revoked


def _status(source: ChatSource) -> dict[str, Any] | None:
    try:
        return source.status()
    except Exception:  # a scrape must never fail because one source cannot say how it is
        return None
