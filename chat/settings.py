"""Settings of the steering sections (`chat:` and `store:` in the channel YAML)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LocalSourceSettings(BaseModel):
    """Chat typed into the control panel or API of this service."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["local"] = "local"


class TwitchSourceSettings(BaseModel):
    """Twitch chat read over EventSub; secrets come from the environment (`${VAR}`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["twitch"] = "twitch"
    channel: str = Field(min_length=1, max_length=25, pattern=r"^[A-Za-z0-9_]+$")
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    user_token: str = Field(min_length=1)


ChatSourceSettings = Annotated[LocalSourceSettings | TwitchSourceSettings, Field(discriminator="kind")]


class ChatSettings(BaseModel):
    """How viewers steer the channel."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["vote", "queue", "manual"] = "vote"
    sources: list[ChatSourceSettings] = Field(default_factory=lambda: [LocalSourceSettings()])


class StoreSettings(BaseModel):
    """Where suggestions, votes and the prompt queue live."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url
