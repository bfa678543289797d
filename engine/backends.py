"""Backend selection: which engine generates the video, and why."""

from __future__ import annotations

from engine.interface import Engine
from engine.settings import EngineSettings

BACKENDS = ("preview",)


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run in this build or on this machine."""


def choose_backend(settings: EngineSettings) -> tuple[str, str]:
    """The backend to run and a one-line reason."""
    if settings.backend == "preview":
        return "preview", "engine.backend is 'preview'"
    if settings.backend == "longlive":
        raise BackendUnavailable(
            "engine.backend: 'longlive' is not available in this build yet; use 'preview' or 'auto'"
        )
    return "preview", "auto: this build has no LongLive backend yet, so the CPU preview engine runs"


def create_engine(name: str, settings: EngineSettings) -> Engine:
    """Construct the named backend at the configured size."""
    if name == "preview":
        from engine.preview import PreviewEngine

        return PreviewEngine(settings.width, settings.height, settings.fps)
    raise BackendUnavailable(f"unknown engine backend {name!r} (have: {', '.join(BACKENDS)})")
