"""Backend selection: which engine generates the video, and why."""

from __future__ import annotations

from collections.abc import Callable

from engine.interface import Engine
from engine.settings import EngineSettings
from engine.weights import WeightPaths, WeightPaths2

BACKENDS = ("preview", "longlive", "longlive2")
LONGLIVE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run in this build or on this machine."""


def _cuda() -> str | None:
    """The CUDA device name, or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _longlive_blocker(settings: EngineSettings) -> str | None:
    """Why LongLive cannot run with these settings, or None."""
    paths = WeightPaths(settings.weights_dir)
    if not paths.present():
        return (f"LongLive weights not found in {settings.weights_dir} "
                f"(run `promptcast download-weights --dir {settings.weights_dir}`)")
    if settings.width % LONGLIVE_MULTIPLE or settings.height % LONGLIVE_MULTIPLE:
        return (f"engine size {settings.width}x{settings.height} is not a multiple of {LONGLIVE_MULTIPLE} "
                "(LongLive needs latent sizes divisible by the patch)")
    return None


def _longlive2_blocker(settings: EngineSettings) -> str | None:
    """Why LongLive 2.0 cannot run with these settings, or None (sizes are checked by the settings)."""
    paths = WeightPaths2(settings.weights_dir)
    if not paths.present():
        return (f"LongLive 2.0 weights not found in {settings.weights_dir} "
                f"(run `promptcast download-weights --model longlive2 --dir {settings.weights_dir}`)")
    if settings.fp8:
        from engine.longlive2.model import fp8_blocker

        gpu = settings.device != "cpu" and _cuda() is not None
        blocker = fp8_blocker("cuda" if gpu else "cpu")
        if blocker:
            return f"engine.fp8: {blocker}"
    return None


def _cuda_blocker(settings: EngineSettings) -> str | None:
    """Why `device: cuda` cannot be honoured by this torch build, or None."""
    if settings.device != "cuda" or _cuda() is not None:
        return None
    import torch

    if torch.version.cuda is None:
        return (f"engine.device is 'cuda' but this PyTorch ({torch.__version__}) is a CPU-only build; "
                "install the CUDA build of torch for your driver (docs/engine.md#cuda), or set device: cpu")
    return (f"engine.device is 'cuda' but PyTorch (CUDA {torch.version.cuda}) sees no GPU; check the driver "
            "with `nvidia-smi` (and `--gpus all` under Docker), or set device: cpu")


def choose_backend(settings: EngineSettings) -> tuple[str, str]:
    """The backend to run and a one-line reason."""
    if settings.backend == "preview":
        return "preview", "engine.backend is 'preview'"
    if settings.backend == "longlive2":
        blocker = _longlive2_blocker(settings) or _cuda_blocker(settings)
        if blocker:
            raise BackendUnavailable(f"engine.backend: 'longlive2' cannot start: {blocker}")
        gpu = _cuda() if settings.device != "cpu" else None
        where = f"CUDA {gpu}" if gpu else "the CPU (slow: for small test sizes only)"
        return "longlive2", f"engine.backend is 'longlive2', on {where}"
    blocker = _longlive_blocker(settings) or _cuda_blocker(settings)
    if settings.backend == "longlive":
        if blocker:
            raise BackendUnavailable(f"engine.backend: 'longlive' cannot start: {blocker}")
        gpu = _cuda() if settings.device != "cpu" else None
        where = f"CUDA {gpu}" if gpu else "the CPU (slow: for small test sizes only)"
        return "longlive", f"engine.backend is 'longlive', on {where}"
    gpu = _cuda() if settings.device != "cpu" else None
    if gpu is None:
        return "preview", "auto: no CUDA GPU, so the CPU preview engine runs (LongLive needs a GPU)"
    if blocker:
        return "preview", f"auto: {blocker}; the preview engine runs"
    return "longlive", f"auto: CUDA {gpu} and the LongLive weights in {settings.weights_dir}"


def create_engine(name: str, settings: EngineSettings, report: Callable[[dict], None] | None = None,
                  heartbeat: Callable[[], None] | None = None) -> Engine:
    """Construct the named backend at the configured size (`report`: load progress; `heartbeat`: liveness)."""
    if name == "preview":
        from engine.preview import PreviewEngine

        block = settings.preview_block_frames
        # Transitions keep LongLive's 0.75 s cross-fade whatever the block length: a short block only
        # means the switch starts sooner.
        return PreviewEngine(settings.width, settings.height, settings.fps, first_block_frames=block,
                             block_frames=block, transition_frames=12, caption=settings.preview_caption)
    if name == "longlive":
        from engine.longlive import LongLiveEngine

        return LongLiveEngine(settings, report=report, heartbeat=heartbeat)
    if name == "longlive2":
        from engine.longlive2.backend import LongLive2Engine

        return LongLive2Engine(settings, report=report, heartbeat=heartbeat)
    raise BackendUnavailable(f"unknown engine backend {name!r} (have: {', '.join(BACKENDS)})")
