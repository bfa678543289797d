"""The LongLive weight files: where they come from, where they go, and checking them.

    DIR/LongLive-1.3B/models/longlive_base.pt, models/lora.pt
    DIR/Wan2.1-T2V-1.3B/config.json, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/

LongLive 2.0 (`--model longlive2`):

    DIR/LongLive-2.0-5B/model_bf16.pt   (the merged base + DMD-LoRA generator, {"generator": {"model.*"}})
    DIR/Wan2.2-TI2V-5B/config.json, Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

EXIT_UNREACHABLE = 3
EXIT_INCOMPLETE = 4


@dataclass(frozen=True)
class WeightSource:
    """One Hub repository and the files promptcast needs from it."""

    repo_id: str
    local: str
    patterns: tuple[str, ...]


SOURCES = (
    WeightSource("Efficient-Large-Model/LongLive-1.3B", "LongLive-1.3B",
                 ("models/longlive_base.pt", "models/lora.pt")),
    # The DiT safetensors is not needed: longlive_base.pt holds every DiT weight.
    WeightSource("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B",
                 ("config.json", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*")),
)


SOURCES_LONGLIVE2 = (
    # The README's quick start file; the FP8 path quantizes these bf16 weights at load (CUDA only).
    WeightSource("Efficient-Large-Model/LongLive-2.0-5B", "LongLive-2.0-5B", ("model_bf16.pt",)),
    # The DiT safetensors shards are not needed: model_bf16.pt holds every DiT weight.
    WeightSource("Wan-AI/Wan2.2-TI2V-5B", "Wan2.2-TI2V-5B",
                 ("config.json", "Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*")),
)


@dataclass(frozen=True)
class WeightPaths:
    """Every file the longlive backend loads, under one directory."""

    root: Path

    @property
    def longlive(self) -> Path:
        """LongLive's repository folder."""
        return self.root / SOURCES[0].local

    @property
    def wan(self) -> Path:
        """Wan2.1-T2V-1.3B's repository folder."""
        return self.root / SOURCES[1].local

    @property
    def base(self) -> Path:
        """LongLive generator weights."""
        return self.longlive / "models" / "longlive_base.pt"

    @property
    def lora(self) -> Path:
        """LongLive generator LoRA."""
        return self.longlive / "models" / "lora.pt"

    @property
    def dit_config(self) -> Path:
        """Wan's DiT config.json."""
        return self.wan / "config.json"

    @property
    def vae(self) -> Path:
        """Wan2.1 VAE."""
        return self.wan / "Wan2.1_VAE.pth"

    @property
    def text_encoder(self) -> Path:
        """UMT5-XXL encoder (bf16)."""
        return self.wan / "models_t5_umt5-xxl-enc-bf16.pth"

    @property
    def tokenizer(self) -> Path:
        """The umt5-xxl tokenizer folder."""
        return self.wan / "google" / "umt5-xxl"

    def files(self) -> list[Path]:
        """The single files that must exist (the tokenizer folder is checked separately)."""
        return [self.base, self.lora, self.dit_config, self.vae, self.text_encoder]

    def present(self) -> bool:
        """True when every file and the tokenizer folder exist (a cheap check: no loading)."""
        return all(p.is_file() for p in self.files()) and (self.tokenizer / "tokenizer.json").is_file()


@dataclass(frozen=True)
class WeightPaths2(WeightPaths):
    """Every file the longlive2 backend loads, under one directory."""

    @property
    def longlive(self) -> Path:
        """LongLive 2.0's repository folder."""
        return self.root / SOURCES_LONGLIVE2[0].local

    @property
    def wan(self) -> Path:
        """Wan2.2-TI2V-5B's repository folder."""
        return self.root / SOURCES_LONGLIVE2[1].local

    @property
    def base(self) -> Path:
        """The merged LongLive 2.0 generator (bf16)."""
        return self.longlive / "model_bf16.pt"

    @property
    def vae(self) -> Path:
        """Wan2.2 VAE."""
        return self.wan / "Wan2.2_VAE.pth"

    def files(self) -> list[Path]:
        """The single files that must exist (no LoRA file: 2.0 ships it merged)."""
        return [self.base, self.dit_config, self.vae, self.text_encoder]


MODELS: dict[str, tuple[tuple[WeightSource, ...], type[WeightPaths]]] = {
    "longlive": (SOURCES, WeightPaths),
    "longlive2": (SOURCES_LONGLIVE2, WeightPaths2),
}


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def download_weights(root: str | Path, endpoint: str | None = None,
                     say: Callable[[str], None] = print, model: str = "longlive") -> int:
    """Fetch exactly the files `model` needs (resumable, with progress bars); returns an exit code."""
    import huggingface_hub

    root = Path(root)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT")
    plans = []
    for source in MODELS[model][0]:
        try:
            infos = huggingface_hub.snapshot_download(source.repo_id, allow_patterns=list(source.patterns),
                                                      local_dir=root / source.local, dry_run=True,
                                                      endpoint=endpoint)
        except OSError as exc:
            say(f"cannot reach the Hugging Face Hub for {source.repo_id} ({endpoint or 'default endpoint'}): "
                f"{exc}\nCheck the network (or HF_ENDPOINT / HF_TOKEN) and run the command again; "
                f"finished files are kept and partial ones resume.")
            return EXIT_UNREACHABLE
        missing = [p for p in source.patterns
                   if not any(fnmatch(i.filename, p) for i in infos)]
        if missing:
            say(f"{source.repo_id} has no {', '.join(missing)}: the repository layout changed; "
                "nothing was downloaded")
            return EXIT_INCOMPLETE
        plans.append((source, infos))
    total = 0
    for source, infos in plans:
        for info in infos:
            size = getattr(info, "file_size", None)
            total += size or 0
            state = "present" if not getattr(info, "will_download", True) else "to fetch"
            say(f"  {source.repo_id}/{info.filename}: {_size(size)} ({state})")
    say(f"total {_size(total)} into {root}")
    for source, _ in plans:
        try:
            huggingface_hub.snapshot_download(source.repo_id, allow_patterns=list(source.patterns),
                                              local_dir=root / source.local, endpoint=endpoint)
        except OSError as exc:
            say(f"download of {source.repo_id} stopped: {exc}\nRun the command again to resume.")
            return EXIT_UNREACHABLE
    problems = check_weights(root, model)
    for problem in problems:
        say(f"  problem: {problem}")
    return EXIT_INCOMPLETE if problems else 0


def check_weights(root: str | Path, model: str = "longlive") -> list[str]:
    """Every problem with a weights directory: layout, then each file's keys and shapes (CPU, mmap)."""
    from engine.checkpoints import CheckpointError, config_from_wan_json, load_dit

    paths = MODELS[model][1](Path(root))
    problems = [f"{p}: missing" for p in paths.files() if not p.is_file()]
    if not (paths.tokenizer / "tokenizer.json").is_file():
        problems.append(f"{paths.tokenizer / 'tokenizer.json'}: missing")
    checks: list[tuple[Path, Callable[[], object]]] = []
    if model == "longlive2":
        if paths.dit_config.is_file() and paths.base.is_file():
            def dit2() -> None:
                from engine.longlive2.model import config_from_ti2v_json

                load_dit(config_from_ti2v_json(paths.dit_config), paths.base, device="meta")
            checks.append((paths.base, dit2))
    elif paths.dit_config.is_file() and paths.base.is_file() and paths.lora.is_file():
        def dit() -> None:
            cfg = config_from_wan_json(paths.dit_config)
            load_dit(cfg, paths.base, paths.lora, merge_lora=False, device="meta")
        checks.append((paths.base, dit))
    checks.extend(_extra_checks(paths))
    for path, run in checks:
        try:
            run()
        except CheckpointError as exc:
            problems.append(str(exc))
        except Exception as exc:  # anything else a broken file can raise is still a finding
            problems.append(f"{path}: {type(exc).__name__}: {exc}")
    return problems


def _extra_checks(paths: WeightPaths) -> list[tuple[Path, Callable[[], object]]]:
    """Checks of the VAE, text encoder and tokenizer files (built on the meta device: no memory)."""
    from engine.checkpoints import read_checkpoint
    from engine.text_encoder import PromptTokenizer, UMT5Config, load_umt5
    from engine.vae import VAEConfig, load_vae_decoder

    checks: list[tuple[Path, Callable[[], object]]] = []
    if paths.vae.is_file() and isinstance(paths, WeightPaths2):
        def vae22() -> None:
            from engine.longlive2.vae import load_vae22

            load_vae22(paths.vae, device="meta")
        checks.append((paths.vae, vae22))
    elif paths.vae.is_file():
        def vae() -> None:
            load_vae_decoder(paths.vae, VAEConfig.from_state_dict(read_checkpoint(paths.vae)), device="meta")
        checks.append((paths.vae, vae))
    text_len = _text_len(paths)
    if paths.text_encoder.is_file():
        def text_encoder() -> None:
            cfg = UMT5Config.from_state_dict(read_checkpoint(paths.text_encoder), text_len=text_len)
            load_umt5(paths.text_encoder, cfg, device="meta")
        checks.append((paths.text_encoder, text_encoder))
    if (paths.tokenizer / "tokenizer.json").is_file():
        checks.append((paths.tokenizer, lambda: PromptTokenizer.from_dir(paths.tokenizer, text_len=text_len)))
    return checks


def _text_len(paths: WeightPaths) -> int:
    """The DiT's text length (512 for Wan2.1), from its config when readable."""
    import json

    try:
        return int(json.loads(paths.dit_config.read_text())["text_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512
