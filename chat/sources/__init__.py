"""Chat sources: where viewers' messages come from (Twitch EventSub, the local control panel)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chat.settings import LocalSourceSettings, TwitchSourceSettings
from chat.sources.base import ChatSource, Emit
from chat.sources.local import LocalSource

if TYPE_CHECKING:
    from chat.sources.twitch import TwitchSource

__all__ = ["ChatSource", "Emit", "LocalSource", "TwitchSource", "create_source"]


def create_source(settings: LocalSourceSettings | TwitchSourceSettings) -> ChatSource:
    """The source one `chat.sources` entry describes."""
    if isinstance(settings, TwitchSourceSettings):
        from chat.sources.twitch import TwitchSource

        return TwitchSource(settings)
    return LocalSource(settings)


def __getattr__(name: str) -> Any:
    # twitchio is imported only by those who use Twitch.
    if name == "TwitchSource":
        from chat.sources.twitch import TwitchSource

        return TwitchSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
