"""Settings of the engine section (`engine:` in the channel YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineSettings(BaseModel):
    """Which backend generates the video, at what size and rate, and how it is supervised."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "preview", "longlive", "longlive2"] = Field(
        "auto", description="longlive: LongLive 1.0 (Wan2.1 1.3B, 832x480, 16 fps); longlive2: LongLive 2.0 "
                            "(Wan2.2-TI2V-5B, 1280x704, 24 fps; never chosen by auto)",
    )
    width: int = Field(832, ge=16, le=4096, description="generated frame width in pixels (even)")
    height: int = Field(480, ge=16, le=4096, description="generated frame height in pixels (even)")
    fps: float = Field(16.0, gt=0, le=120, description="the engine's native frame rate")
    seed: int = Field(0, ge=0)
    weights_dir: Path = Path("./weights")
    prompt: str = Field(
        "a calm ocean at sunset, gentle waves, cinematic",
        max_length=2000,
        description="the prompt the stream starts with",
    )
    ring_frames: int = Field(
        24, ge=2, le=240,
        description="capacity of the shared-memory frame ring; the engine fills it only to slack_frames "
                    "plus what covers its own block time (engine/process.py)",
    )
    slack_frames: int = Field(
        2, ge=1, le=120,
        description="frames the engine keeps queued beyond its block time: jitter cover, and the part of "
                    "a switch's delay that does not depend on the engine",
    )
    switch_cut: bool = Field(
        False,
        description="false: frames already made for the old prompt play out first (no jump); true: they "
                    "are dropped when the new prompt's first block is ready (sooner, with a visible jump)",
    )
    preview_block_frames: int = Field(
        3, ge=1, le=48,
        description="preview engine: frames per block, i.e. how often it can take a switch "
                    "(12 reproduces LongLive's block timing)",
    )
    preview_caption: bool = Field(
        True, description="preview engine: draw the prompt as a caption (off when OBS shows /overlay/now)",
    )
    heartbeat_timeout_s: float = Field(
        10.0, gt=0,
        description="running phase: an engine silent this long after its first block is restarted",
    )
    startup_timeout_s: float = Field(
        120.0, gt=0,
        description="loading phase: an engine whose load reports no progress for this long is restarted",
    )
    load_max_mb_s: float | None = Field(
        None, gt=0,
        description="cap the weight-loading rate (MB/s) so a channel starting on a shared host leaves "
                    "disk bandwidth to the running ones; default: as fast as the disk goes",
    )
    warmup_timeout_s: float | None = Field(
        None, gt=0,
        description="warm-up phase (load done -> first block, compile included): its limit; "
                    "default 300 s, 1200 s with compile: true",
    )
    max_restart_backoff_s: float = Field(30.0, gt=0)
    # LongLive backend
    steps: list[int] = Field(
        default_factory=lambda: [1000, 750, 500, 250],
        min_length=1, max_length=8, description="denoising steps (warped as LongLive does); fewer = faster",
    )
    global_sink: bool = Field(True, description="keep the first frames as sink across prompt switches")
    rope_mode: Literal["relative", "absolute"] = Field(
        "relative", description="relative: unbounded streams; absolute: as the reference, max 1024 latents",
    )
    reanchor_drift_threshold: float = Field(
        0.0, ge=0, description="re-anchor the sink when the latent drift score passes this; 0 = off",
    )
    reanchor_every_blocks: int = Field(
        0, ge=0, description="re-anchor the sink after this many blocks without one; 0 = off",
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: CUDA bf16, CPU fp32")
    text_encoder_device: Literal["gpu", "cpu"] = Field(
        "gpu", description="gpu: UMT5 resident (11.4 GB, fast switches); cpu: saves GPU memory",
    )
    text_encoder_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="dtype UMT5 is loaded and run in; auto: the model dtype on the GPU, fp32 on the CPU "
                            "(22.7 GB of host memory for UMT5-XXL; bf16 halves it)",
    )
    merge_lora: bool = True
    compile: bool = Field(False, description="torch.compile the DiT (slower start, faster blocks)")
    # LongLive 2.0 backend (docs/engine-longlive2.md)
    switch_mode: Literal["prompt", "recache"] = Field(
        "prompt",
        description="longlive2: how a prompt switch reaches the stream. prompt: as the reference, the next "
                    "block's prompt (a prompt starting 'The scene transitions. ' is a shot cut); recache: "
                    "also re-encode the cached window with the new prompt (as LongLive 1.0)",
    )
    start_image: Path | None = Field(
        None, description="longlive2: a picture (PNG/JPEG) the stream starts from (image-to-video)",
    )
    sampling_steps: int = Field(4, ge=1, le=8, description="longlive2: UniPC steps per block (2.0: 4)")
    fp8: bool = Field(
        False, description="longlive2: TorchAO float8 block linears (CUDA, capability >= 8.9, torchao)",
    )

    @property
    def effective_warmup_timeout_s(self) -> float:
        """The warm-up limit in force (compiling takes minutes, so its default is longer)."""
        if self.warmup_timeout_s is not None:
            return self.warmup_timeout_s
        return 1200.0 if self.compile else 300.0

    @model_validator(mode="after")
    def _valid_steps(self) -> EngineSettings:
        steps = self.steps
        descending = steps == sorted(set(steps), reverse=True)
        if not descending or any(not 0 < s <= 1000 for s in steps):
            raise ValueError(f"steps must be distinct values in 1..1000, highest first; got {steps}")
        return self

    @model_validator(mode="after")
    def _longlive2(self) -> EngineSettings:
        if self.backend != "longlive2":
            for name in ("start_image", "fp8"):
                if name in self.model_fields_set and getattr(self, name):
                    raise ValueError(f"{name} needs backend: longlive2 (got backend: {self.backend})")
            return self
        # 2.0's native size and rate unless the channel says otherwise.
        defaults = {"width": 1280, "height": 704, "fps": 24.0}
        for name, value in defaults.items():
            if name not in self.model_fields_set:
                setattr(self, name, value)
        for name in ("width", "height"):
            if getattr(self, name) % 32:
                raise ValueError(f"longlive2 needs {name} a multiple of 32 (VAE 16 x patch 2), "
                                 f"got {getattr(self, name)}; e.g. 1280x704, 832x480, 640x352")
        if self.reanchor_drift_threshold > 0:
            raise ValueError("reanchor_drift_threshold is not implemented for longlive2; "
                             "use reanchor_every_blocks or on-demand re-anchors")
        if self.start_image is not None and not self.start_image.is_file():
            raise ValueError(f"start_image {self.start_image} is not a file")
        return self

    @model_validator(mode="after")
    def _even_size(self) -> EngineSettings:
        for name in ("width", "height"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even (H.264 4:2:0), got {getattr(self, name)}")
        return self
