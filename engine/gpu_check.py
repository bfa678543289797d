"""The GPU host's self-check, engine mode: the real loaders and block loop at full size, timed.

    scripts/gpu_check.sh                      # on a CUDA host: 1.3B, bf16, compile on and off
    python -m engine.gpu_check --device cpu --size tiny --no-compile   # the same code anywhere

Needs PyTorch and this repository's `engine/` only (no PyAV, no pydantic, no tokenizer:
prompts are random token ids, which cost the encoder exactly what text does). It

1. writes random weights in the official formats at the chosen size (DiT + LoRA + VAE +
   UMT5-XXL; `engine.random_weights`), unless `--weights` already holds them;
2. loads them through the real loaders (timed: the load a channel start pays);
3. runs the stream eagerly: first block, steady blocks with VAE decode (FPS), then
   prompt switches timed from the new prompt's text encode to its first decoded block
   (encode + recache + block + decode);
4. does the same with `torch.compile` unless `--no-compile`;
5. reports peak GPU memory, and the tiny preset on CUDA against the CPU.

It writes `gpu-check.json` and `gpu-check.md` (a table with the card's name) in `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from engine.checkpoints import config_from_wan_json, load_dit, read_checkpoint
from engine.generator import StreamConfig, StreamingGenerator
from engine.model import PRESETS
from engine.random_weights import write_random_weights
from engine.sampler import SamplerConfig
from engine.text_encoder import PRESETS as T5_PRESETS
from engine.text_encoder import UMT5Config, load_umt5
from engine.vae import PRESETS as VAE_PRESETS
from engine.vae import StreamingDecoder, VAEConfig, load_vae_decoder
from engine.weights import WeightPaths

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIZES = {  # DiT preset, UMT5 preset, VAE preset, frame size (w, h)
    "1.3b": ("1.3b", "umt5-xxl", "wan2.1", (832, 480)),
    "tiny": ("tiny", "tiny", "tiny", (96, 64)),
}
TARGET_FPS, GOAL_FPS = 24.0, 36.0  # issue targets on one H100, with VAE decode


def default_weights(size: str) -> Path:
    """Where the random weights of a size are written and reused."""
    return Path("out/gpu-check/weights") / size


class Clock:
    """Wall time of a piece of work, waiting for the device so GPU time is counted."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn):
        """Run fn(); return (result, seconds)."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def sync(self) -> None:
        """Wait for queued device work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _ensure_weights(root: Path, size: str, device: torch.device, lora_rank: int) -> tuple[WeightPaths, float]:
    paths = WeightPaths(root)
    if paths.base.is_file() and paths.vae.is_file() and paths.text_encoder.is_file() and paths.lora.is_file():
        return paths, 0.0
    dit, t5, vae, _ = SIZES[size]
    started = time.perf_counter()
    # Drawn on the device (fast), saved from host memory one file at a time.
    write_random_weights(root, PRESETS[dit], t5=T5_PRESETS[t5], vae=VAE_PRESETS[vae], lora_rank=lora_rank,
                         device=device if device.type == "cuda" else "cpu")
    return paths, time.perf_counter() - started


class Pipeline:
    """DiT + UMT5 + streaming VAE loaded from files; prompts are random token ids."""

    def __init__(self, paths: WeightPaths, frame: tuple[int, int], device: torch.device, dtype: torch.dtype,
                 steps: tuple[int, ...]):
        width, height = frame
        self.device, self.dtype = device, dtype
        cfg = config_from_wan_json(paths.dit_config, height // 8, width // 8)
        self.dit = load_dit(cfg, paths.base, paths.lora, device=device, dtype=dtype)
        t5_cfg = UMT5Config.from_state_dict(read_checkpoint(paths.text_encoder), text_len=cfg.text_len)
        self.t5 = load_umt5(paths.text_encoder, t5_cfg, device=device, dtype=dtype)
        vae_cfg = VAEConfig.from_state_dict(read_checkpoint(paths.vae))
        self.decoder = StreamingDecoder(load_vae_decoder(paths.vae, vae_cfg, device=device, dtype=dtype))
        self.cfg, self.steps = cfg, steps
        self.vocab = min(t5_cfg.vocab, 32000)
        self._ids = torch.Generator().manual_seed(0)

    def prompt(self) -> torch.Tensor:
        """A fresh 'prompt': random ids of a typical length, encoded by UMT5 (rows past it zero)."""
        ids = torch.zeros(1, self.cfg.text_len, dtype=torch.long)
        length = min(60, self.cfg.text_len)
        ids[0, :length] = torch.randint(1, self.vocab, (length,), generator=self._ids)
        mask = (ids > 0).long()
        with torch.inference_mode():
            return self.t5(ids.to(self.device), mask.to(self.device))

    def stream(self, model) -> StreamingGenerator:
        """A generator over `model` (eager or compiled) as the engine runs it."""
        sampler = SamplerConfig(denoising_steps=self.steps)
        return StreamingGenerator(model, sampler, StreamConfig(rope_mode="relative"))

    def block(self, gen: StreamingGenerator) -> int:
        """One block generated and decoded; returns its pixel frames."""
        with torch.inference_mode():
            return self.decoder.decode_block(gen.next_block()).shape[0]


def run_stream(pipe: Pipeline, model, blocks: int, switches: int, clock: Clock) -> dict:
    """First block, steady FPS with decode, and switch latencies for one model (eager or compiled)."""
    gen = pipe.stream(model)
    pipe.decoder.reset()
    first_prompt = pipe.prompt()
    gen.start(first_prompt, seed=0)
    _, first_s = clock(lambda: pipe.block(gen))
    frames, steady_s = 0, 0.0
    dit_s = 0.0
    for _ in range(max(1, blocks - 1)):
        latents, t_dit = clock(gen.next_block)
        pixels, t_vae = clock(lambda latents=latents: pipe.decoder.decode_block(latents))
        frames += pixels.shape[0]
        steady_s += t_dit + t_vae
        dit_s += t_dit
    latencies = []
    for _ in range(switches):
        def switch() -> int:
            gen.switch_prompt(pipe.prompt())  # text encode ...
            return pipe.block(gen)  # ... + recache + block + decode
        _, seconds = clock(switch)
        latencies.append(seconds)
    steady_blocks = max(1, blocks - 1)
    return {
        "first_block_s": round(first_s, 3),
        "steady_fps_with_vae": round(frames / steady_s, 2),
        "dit_ms_per_block": round(dit_s / steady_blocks * 1000, 1),
        "vae_ms_per_block": round((steady_s - dit_s) / steady_blocks * 1000, 1),
        "switch_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "switch_p95_s": round(_percentile(latencies, 95), 3) if latencies else None,
        "switches": len(latencies),
    }


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def cuda_matches_cpu() -> float:
    """Largest difference between the tiny preset run on CUDA and on the CPU (fp32, same draws)."""
    from engine.random_weights import random_dit

    def run(device: str) -> torch.Tensor:
        model = random_dit(PRESETS["tiny"], device, torch.float32, seed=0)
        gen = StreamingGenerator(model)
        gen.start(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)).to(device), seed=0)
        gen.noise.generator = torch.Generator("cpu").manual_seed(0)  # same draws on both devices
        gen.noise.device = "cpu"
        out = []
        for b in range(6):
            if b == 4:
                other = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2))
                gen.switch_prompt(other.to(device))
            out.append(gen.next_block().cpu())
        return torch.cat(out, 1)

    return (run("cuda") - run("cpu")).abs().max().item()


def check(size: str = "1.3b", device: str = "cuda", dtype: str | None = None, blocks: int = 8,
          switches: int = 10, compile_model: bool = True, weights: Path | None = None,
          steps: tuple[int, ...] = (1000, 750, 500, 250), lora_rank: int = 256) -> dict:
    """Run the engine-mode check; returns the report as plain data."""
    dev = torch.device(device)
    torch_dtype = DTYPES[dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    clock = Clock(dev)
    root = weights or default_weights(size)
    paths, write_s = _ensure_weights(root, size, dev, lora_rank if size == "1.3b" else 4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    frame = SIZES[size][3]
    pipe, load_s = clock(lambda: Pipeline(paths, frame, dev, torch_dtype, steps))
    files = (paths.base, paths.lora, paths.text_encoder, paths.vae)
    report = {
        "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "size": size, "dtype": str(torch_dtype).removeprefix("torch."),
        "frame": f"{frame[0]}x{frame[1]}", "steps": list(steps), "date": time.strftime("%Y-%m-%d"),
        "weights_gb": round(sum(p.stat().st_size for p in files) / 1e9, 2),
        "write_weights_s": round(write_s, 1), "load_s": round(load_s, 1),
        "eager": run_stream(pipe, pipe.dit, blocks, switches, clock),
    }
    if compile_model:
        compiled = torch.compile(pipe.dit)
        report["compiled"] = run_stream(pipe, compiled, blocks, switches, clock)
    if dev.type == "cuda":
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        report["cuda_vs_cpu_max_diff"] = cuda_matches_cpu()
    else:
        report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return report


def markdown(report: dict) -> str:
    """The report as a markdown table (docs/benchmarks.md takes it as it is)."""
    rows = [("card", report["card"]), ("torch", report["torch"]),
            ("model", f"{report['size']} {report['dtype']} at {report['frame']}, steps {report['steps']}"),
            ("weights", f"{report['weights_gb']} GB, written in {report['write_weights_s']} s, "
                        f"loaded in {report['load_s']} s")]
    for mode in ("eager", "compiled"):
        run = report.get(mode)
        if run is None:
            continue
        rows += [(f"{mode}: first block", f"{run['first_block_s']} s"),
                 (f"{mode}: steady FPS with VAE decode", f"{run['steady_fps_with_vae']} "
                  f"(DiT {run['dit_ms_per_block']} ms + VAE {run['vae_ms_per_block']} ms per block; "
                  f"target {TARGET_FPS:.0f}, goal {GOAL_FPS:.0f})"),
                 (f"{mode}: prompt switch p50 / p95", f"{run['switch_p50_s']} / {run['switch_p95_s']} s "
                  f"over {run['switches']} (encode + recache + block + decode)")]
    for key, label in (("peak_gpu_memory_gib", "peak GPU memory"), ("peak_rss_gib", "peak host RSS")):
        if key in report:
            rows.append((label, f"{report[key]} GiB"))
    if "cuda_vs_cpu_max_diff" in report:
        rows.append(("CUDA vs CPU (tiny, fp32)", f"max |diff| {report['cuda_vs_cpu_max_diff']:.2e}"))
    for key, label in (("nvenc", "NVENC used"), ("engine_restarts", "engine restarts (service)"),
                       ("service", "service")):
        if key in report:
            rows.append((label, str(report[key])))
    lines = [f"### gpu_check on {report['card']} ({report['date']})", "", "| what | measured |", "|---|---|"]
    return "\n".join([*lines, *(f"| {k} | {v} |" for k, v in rows)]) + "\n"


def write_report(report: dict, out: Path) -> None:
    """gpu-check.json and gpu-check.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))


def parser() -> argparse.ArgumentParser:
    """Command-line options (shared with the service mode)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--blocks", type=int, default=8, help="blocks per run (the first is the warm-up)")
    p.add_argument("--switches", type=int, default=10, help="prompt switches timed per run")
    p.add_argument("--steps", default="1000,750,500,250", help="denoising steps, comma-separated")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    p.add_argument("--lora-rank", type=int, default=256, help="rank of the written LoRA (LongLive's: 256)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder to reuse or write")
    p.add_argument("--out", type=Path, default=Path("out/gpu-check"), help="where the JSON and table go")
    return p


def run(args: argparse.Namespace) -> dict | None:
    """Run engine mode for parsed options, write and print the report; None when CUDA is asked but absent."""
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; on a GPU host install the CUDA build of torch, or run "
              "--device cpu --size tiny for a rehearsal")
        return None
    report = check(args.size, args.device, args.dtype, args.blocks, args.switches, not args.no_compile,
                   args.weights, tuple(int(s) for s in args.steps.split(",")), args.lora_rank)
    write_report(report, args.out)
    print(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    """Engine mode entry point."""
    return 0 if run(parser().parse_args(argv)) is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
