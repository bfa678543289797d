"""Checkpoint loading as a specification (engine-spec §2.4-2.6).

Tiny checkpoints are written in each official on-disk layout from a seeded
`CausalWanModel(PRESETS["tiny"])` and read back through the real loader:

- Wan `diffusion_pytorch_model.safetensors`: DiT keys, no prefix.
- LongLive `longlive_base.pt`: `{"generator": {"model." + key: tensor}}`.
- LongLive `lora.pt`: `{"generator_lora": PEFT dict, "critic_lora": ..., "step": 3000}`.

Full-size (1.3B) compatibility is checked on the meta device, and with checkpoint files whose
tensors are stride-0 expansions of one scalar (the official key set and shapes in a file of a
few kB).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoints import (
    CheckpointError,
    LoRALinear,
    config_from_wan_json,
    load_dit,
    read_dit_state_dict,
    read_lora,
)
from engine.generator import StreamingGenerator
from engine.model import PRESETS, CausalWanModel, keeps_fp32, parameter_count

DATA = Path(__file__).parent / "data"
KEYS_JSON = DATA / "wan2.1-t2v-1.3b-dit-keys.json"
TINY_CKPT = DATA / "longlive-tiny" / "longlive_base_tiny.pt"
TINY = PRESETS["tiny"]
RANK = 4
# The Linear layers LongLive's LoRA adapts in every block (spec §2.5), spelled out independently.
TARGETS = (*(f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo"), "ffn.0", "ffn.2")
PEFT = "base_model.model."


# --- helpers -------------------------------------------------------------------------------------


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a randomly initialised tiny model (own contiguous copies)."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in CausalWanModel(TINY).state_dict().items()}


def save_longlive(path: Path, state: dict[str, torch.Tensor], prefix: str = "model.",
                  key: str = "generator") -> Path:
    """LongLive's generator format: {"generator": {"model.<key>": tensor}}."""
    torch.save({key: {prefix + k: v for k, v in state.items()}}, path)
    return path


def make_lora(state: dict[str, torch.Tensor], rank: int = RANK, seed: int = 1) -> dict[str, torch.Tensor]:
    """A PEFT-style generator adapter for every target: lora_A [r, in], lora_B [out, r] (B non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for i in range(TINY.num_layers):
        for target in TARGETS:
            out_dim, in_dim = state[f"blocks.{i}.{target}.weight"].shape
            lora[f"{PEFT}blocks.{i}.{target}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.1
            lora[f"{PEFT}blocks.{i}.{target}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.1
    return lora


def bad_critic() -> dict[str, torch.Tensor]:
    """A critic adapter that would fail every check if it were read: wrong shapes, wrong modules."""
    return {f"{PEFT}blocks.0.self_attn.q.lora_A.weight": torch.zeros(3, 7),
            f"{PEFT}blocks.0.self_attn.q.lora_B.weight": torch.zeros(5, 9),
            f"{PEFT}not_a_module.lora_A.weight": torch.zeros(1, 1)}


def save_lora(path: Path, generator_lora: dict[str, torch.Tensor] | None,
              critic_lora: dict[str, torch.Tensor] | None = None) -> Path:
    """LongLive's lora.pt: {"generator_lora": ..., "critic_lora": ..., "step": 3000}."""
    critic = bad_critic() if critic_lora is None else critic_lora
    obj: dict[str, object] = {"critic_lora": critic, "step": 3000}
    if generator_lora is not None:
        obj["generator_lora"] = generator_lora
    torch.save(obj, path)
    return path


def lora_pair(lora: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    return lora[f"{PEFT}{module}.lora_A.weight"], lora[f"{PEFT}{module}.lora_B.weight"]


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def assert_refused(path: Path, *fragments: str, named: Path | None = None, **kwargs) -> str:
    """load_dit raises CheckpointError naming the file (`named`, default `path`) and each fragment."""
    with pytest.raises(CheckpointError) as info:
        load_dit(TINY, path, **kwargs)
    message = str(info.value)
    assert str(named or path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def first_block(model: CausalWanModel, prompt: torch.Tensor) -> torch.Tensor:
    gen = StreamingGenerator(model)
    gen.start(prompt, seed=0)
    return gen.next_block()


def keys_json() -> dict:
    return json.loads(KEYS_JSON.read_text())


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return tiny_state()


@pytest.fixture
def base_pt(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    return save_longlive(tmp_path / "longlive_base.pt", state)


@pytest.fixture
def lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return make_lora(state)


@pytest.fixture
def lora_pt(tmp_path: Path, lora: dict[str, torch.Tensor]) -> Path:
    return save_lora(tmp_path / "lora.pt", lora)


# --- official layouts load exactly ---------------------------------------------------------------


def test_wan_safetensors_without_prefix_loads_the_written_weights(tmp_path, state):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(state, str(path))
    assert_state_equal(load_dit(TINY, path), state)


def test_longlive_generator_pt_with_model_prefix_loads_the_written_weights(base_pt, state):
    assert_state_equal(load_dit(TINY, base_pt), state)


def test_shipped_tiny_longlive_checkpoint_loads_strictly():
    raw = torch.load(TINY_CKPT, map_location="cpu", weights_only=True)
    assert set(raw) == {"generator"} and all(k.startswith("model.") for k in raw["generator"])
    expected = {k.removeprefix("model."): v for k, v in raw["generator"].items()}
    assert len(expected) == 69
    assert_state_equal(load_dit(TINY, TINY_CKPT), expected)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                                    "model._orig_mod.", "_fsdp_wrapped_module.model."])
def test_wrapper_prefixes_are_stripped(tmp_path, state, prefix):
    path = save_longlive(tmp_path / "wrapped.pt", state, prefix=prefix)
    assert_state_equal(load_dit(TINY, path), state)


def test_a_checkpoint_with_only_a_model_dict_is_read_from_it(tmp_path, state):
    # LL1's fallback when there is neither 'generator' nor 'generator_ema'.
    path = save_longlive(tmp_path / "model.pt", state, key="model")
    assert_state_equal(load_dit(TINY, path), state)


def test_generator_ema_is_used_only_with_use_ema(tmp_path, state):
    ema = tiny_state(seed=7)
    path = tmp_path / "with_ema.pt"
    torch.save({"generator": {"model." + k: v for k, v in state.items()},
                "generator_ema": {"_fsdp_wrapped_module.model." + k: v for k, v in ema.items()}}, path)
    plain, averaged = read_dit_state_dict(path), read_dit_state_dict(path, use_ema=True)
    assert set(plain) == set(averaged) == set(state)
    assert all(torch.equal(plain[k], state[k]) for k in state)
    assert all(torch.equal(averaged[k], ema[k]) for k in ema)


def test_generator_ema_alone_is_refused_without_use_ema(tmp_path, state):
    path = save_longlive(tmp_path / "ema_only.pt", state, key="generator_ema")
    with pytest.raises(CheckpointError, match="generator"):
        read_dit_state_dict(path)


def test_loaded_model_is_ready_for_inference_in_the_requested_dtype_with_fp32_islands(base_pt):
    model = load_dit(TINY, base_pt, dtype=torch.bfloat16)
    assert not model.training
    named = dict(model.named_parameters())
    assert named and all(t.device.type == "cpu" and not t.requires_grad for t in named.values())
    islands = {k for k, t in named.items() if t.dtype == torch.float32}
    assert islands == {k for k in named if keeps_fp32(k)}
    assert {"time_embedding.0.weight", "blocks.0.modulation", "blocks.1.norm3.weight",
            "head.head.bias"} <= islands
    assert all(t.dtype == torch.bfloat16 for k, t in named.items() if k not in islands)
    assert named["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
def test_pt_weights_are_memory_mapped_not_copied(base_pt):
    # fp32 on the CPU needs no conversion, so every weight must be a page of the file's mapping
    # (one copy of the model in memory, shared with the page cache), not a heap copy.
    model = load_dit(TINY, base_pt)
    real = os.path.realpath(base_pt)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    assert ranges, f"{real} is not mapped"
    state = model.state_dict()
    outside = [k for k, v in state.items() if not any(lo <= v.data_ptr() < hi for lo, hi in ranges)]
    assert not outside


# --- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "scale"), [(None, 1.0), (RANK, 1.0), (2 * RANK, 2.0), (RANK / 2, 0.5)])
def test_merged_lora_adds_alpha_over_rank_times_b_a(base_pt, lora_pt, state, lora, alpha, scale):
    model = load_dit(TINY, base_pt, lora_pt, lora_alpha=alpha)
    a, b = lora_pair(lora, "blocks.1.ffn.0")  # non-square: A [r, 64], B [128, r]
    expected = state["blocks.1.ffn.0.weight"] + scale * (b @ a)
    torch.testing.assert_close(model.blocks[1].ffn[0].weight, expected, rtol=0, atol=1e-6)


def test_merged_lora_leaves_everything_else_unchanged(base_pt, lora_pt, state):
    loaded = load_dit(TINY, base_pt, lora_pt).state_dict()
    adapted = {f"blocks.{i}.{t}.weight" for i in range(TINY.num_layers) for t in TARGETS}
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k not in adapted)
    assert all(not torch.equal(loaded[k], state[k]) for k in adapted)


def test_lora_is_merged_in_fp32_before_the_cast(base_pt, lora_pt, state, lora):
    model = load_dit(TINY, base_pt, lora_pt, dtype=torch.bfloat16)
    a, b = lora_pair(lora, "blocks.0.self_attn.q")
    expected = (state["blocks.0.self_attn.q.weight"] + b @ a).to(torch.bfloat16)
    assert torch.equal(model.blocks[0].self_attn.q.weight, expected)


@pytest.mark.parametrize(("alpha", "scale"), [(None, 1.0), (2 * RANK, 2.0)])
def test_unmerged_lora_wraps_exactly_the_target_linears(base_pt, lora_pt, state, lora, alpha, scale):
    model = load_dit(TINY, base_pt, lora_pt, merge_lora=False, lora_alpha=alpha)
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(wrapped) == {f"blocks.{i}.{t}" for i in range(TINY.num_layers) for t in TARGETS}
    for name, module in wrapped.items():
        a, b = lora_pair(lora, name)
        assert module.scale == scale
        assert torch.equal(module.lora_A, a) and torch.equal(module.lora_B, b)
        assert torch.equal(module.base.weight, state[f"{name}.weight"])  # base weights not merged


@pytest.mark.parametrize("alpha", [None, 2 * RANK])
def test_unmerged_lora_forward_equals_merged_forward(base_pt, lora_pt, alpha):
    prompt = torch.randn(1, TINY.text_len, TINY.text_dim, generator=torch.Generator().manual_seed(3))
    merged = first_block(load_dit(TINY, base_pt, lora_pt, lora_alpha=alpha), prompt)
    unmerged = first_block(load_dit(TINY, base_pt, lora_pt, merge_lora=False, lora_alpha=alpha), prompt)
    base = first_block(load_dit(TINY, base_pt), prompt)
    assert (merged - base).abs().max() > 1e-3  # the adapter matters, so the comparison means something
    torch.testing.assert_close(unmerged, merged, rtol=0, atol=1e-5)


def test_critic_lora_is_ignored(tmp_path, base_pt, lora):
    with_bad_critic = save_lora(tmp_path / "bad_critic.pt", lora, critic_lora=bad_critic())
    with_no_critic = save_lora(tmp_path / "no_critic.pt", lora, critic_lora={})
    expected = load_dit(TINY, base_pt, with_no_critic).state_dict()
    assert_state_equal(load_dit(TINY, base_pt, with_bad_critic), expected)


# --- corrupted inputs: CheckpointError naming the file and the problem ---------------------------
# Every failure is a raise out of load_dit: no model, so no partially loaded model, is ever returned.


def test_missing_key_is_named(tmp_path, state):
    del state["blocks.1.ffn.2.bias"]
    assert_refused(save_longlive(tmp_path / "missing.pt", state), "missing", "blocks.1.ffn.2.bias")


def test_unexpected_key_is_named(tmp_path, state):
    state["blocks.1.extra.weight"] = torch.zeros(3)
    assert_refused(save_longlive(tmp_path / "unexpected.pt", state), "unexpected", "blocks.1.extra.weight")


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path, state):
    state["blocks.0.ffn.0.weight"] = torch.zeros(128, 32)  # the model has [128, 64]
    path = save_longlive(tmp_path / "shape.pt", state)
    assert_refused(path, "blocks.0.ffn.0.weight", "(128, 32)", "(128, 64)")


def test_wrong_shape_in_safetensors_is_refused(tmp_path, state):
    state["head.modulation"] = torch.zeros(1, 6, 64)  # the model has [1, 2, 64]
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(state, str(path))
    assert_refused(path, "head.modulation", "(1, 6, 64)", "(1, 2, 64)")


@pytest.mark.parametrize(("content", "fragment"), [
    (lambda s: {"state": s}, "state"),
    (lambda s: list(s.values()), "list"),
    (lambda s: {"generator": {"model.x": 1}}, "generator"),
], ids=["unknown-top-level-key", "list", "generator-without-tensors"])
def test_wrong_container_is_refused(tmp_path, state, content, fragment):
    path = tmp_path / "wrong.pt"
    torch.save(content(state), path)
    assert_refused(path, fragment)


def test_truncated_pt_is_refused(base_pt):
    data = base_pt.read_bytes()
    base_pt.write_bytes(data[: len(data) // 2])
    assert_refused(base_pt, "truncated")


def test_truncated_safetensors_is_refused(tmp_path, state):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, "safetensors")


@pytest.mark.parametrize("name", ["longlive_base.pt", "diffusion_pytorch_model.safetensors"])
def test_empty_file_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert_refused(path, "empty file")


@pytest.mark.parametrize("name", ["longlive_base.pt", "diffusion_pytorch_model.safetensors"])
def test_missing_file_is_refused(tmp_path, name):
    assert_refused(tmp_path / name, "not found")


def test_top_level_dict_with_non_string_keys_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"state": torch.zeros(1), 0: torch.zeros(1), "x": [1]}, path)
    assert_refused(path, "generator")


def test_lora_missing_module_is_named(tmp_path, base_pt, lora):
    del lora[f"{PEFT}blocks.1.ffn.2.lora_A.weight"], lora[f"{PEFT}blocks.1.ffn.2.lora_B.weight"]
    path = save_lora(tmp_path / "lora.pt", lora)
    assert_refused(base_pt, "missing", "blocks.1.ffn.2", lora=path, named=path)


def test_lora_module_with_only_one_half_is_missing(tmp_path, base_pt, lora):
    del lora[f"{PEFT}blocks.0.cross_attn.v.lora_B.weight"]
    path = save_lora(tmp_path / "lora.pt", lora)
    assert_refused(base_pt, "missing", "blocks.0.cross_attn.v", lora=path, named=path)


def test_lora_unexpected_module_is_named(tmp_path, base_pt, lora):
    lora[f"{PEFT}head.head.lora_A.weight"] = torch.zeros(RANK, 64)
    lora[f"{PEFT}head.head.lora_B.weight"] = torch.zeros(64, RANK)
    path = save_lora(tmp_path / "lora.pt", lora)
    assert_refused(base_pt, "unexpected", "head.head", lora=path, named=path)


@pytest.mark.parametrize(("a_shape", "b_shape"), [
    ((RANK, 64), (128, 2 * RANK)),  # ranks of A and B disagree
    ((RANK, 32), (128, RANK)),  # A's input width is not the Linear's
    ((RANK, 64), (64, RANK)),  # B's output width is not the Linear's
    ((128, RANK), (RANK, 64)),  # A and B swapped (transposed layout)
], ids=["rank-mismatch", "wrong-in", "wrong-out", "transposed"])
def test_lora_wrong_shapes_are_named(tmp_path, base_pt, lora, a_shape, b_shape):
    lora[f"{PEFT}blocks.1.ffn.0.lora_A.weight"] = torch.zeros(a_shape)  # Linear(64 -> 128)
    lora[f"{PEFT}blocks.1.ffn.0.lora_B.weight"] = torch.zeros(b_shape)
    path = save_lora(tmp_path / "lora.pt", lora)
    assert_refused(base_pt, "blocks.1.ffn.0", str(a_shape), str(b_shape), lora=path, named=path)


def test_lora_file_without_generator_lora_is_refused(tmp_path, base_pt, lora):
    path = save_lora(tmp_path / "lora.pt", None, critic_lora=lora)  # a valid adapter, under the wrong name
    assert_refused(base_pt, "generator_lora", lora=path, named=path)


def test_lora_file_that_is_a_base_checkpoint_is_refused(base_pt):
    assert_refused(base_pt, "generator_lora", lora=base_pt)


# --- full size (1.3B) without the memory ---------------------------------------------------------


def test_1_3b_model_has_exactly_the_official_keys_and_shapes():
    official = keys_json()
    with torch.device("meta"):
        model = CausalWanModel(PRESETS["1.3b"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(shape) for k, shape in official["keys"].items()}
    assert len(ours) == official["num_tensors"] == 825


def test_1_3b_parameter_count():
    assert parameter_count(PRESETS["1.3b"]) == keys_json()["num_params"] == 1_418_996_800


def test_1_3b_lora_expected_keys_are_the_peft_names_of_every_target():
    official = keys_json()
    expected = official["lora_generator_expected"]
    shapes = {k: tuple(s) for k, s in official["keys"].items()}
    ours = {}
    for i in range(PRESETS["1.3b"].num_layers):
        for target in TARGETS:
            out_dim, in_dim = shapes[f"blocks.{i}.{target}.weight"]
            ours[f"{PEFT}blocks.{i}.{target}.lora_A.weight"] = (256, in_dim)
            ours[f"{PEFT}blocks.{i}.{target}.lora_B.weight"] = (out_dim, 256)
    assert ours == {k: tuple(s) for k, s in expected["keys"].items()}
    assert len(ours) == expected["num_tensors"] == 600
    assert sum(a * b for a, b in ours.values()) == expected["num_params"]


def test_1_3b_official_layouts_load_at_full_size(tmp_path):
    # The official key sets at their real shapes; every tensor is a stride-0 view of one scalar,
    # so the files are a few kB and nothing is materialised.
    official = keys_json()
    scalar = torch.zeros(())
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: scalar.expand(s) for k, s in official["keys"].items()}}, base)
    lora_keys = official["lora_generator_expected"]["keys"]
    lora = save_lora(tmp_path / "lora.pt", {k: scalar.expand(s) for k, s in lora_keys.items()})
    cfg = PRESETS["1.3b"]
    adapters = read_lora(lora, cfg)
    assert len(adapters) == 300
    model = load_dit(cfg, base, lora, merge_lora=False)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 300
    assert all(m.lora_A.shape[0] == 256 and m.scale == 1.0 for m in wrapped)
    assert model.blocks[29].ffn[2].lora_A.shape == (256, 8960)
    assert sum(p.numel() for p in model.parameters()) == official["num_params"] + 349_962_240


# --- config.json ---------------------------------------------------------------------------------


WAN_1_3B_CONFIG = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
                   "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
                   "num_layers": 30, "out_dim": 16, "text_len": 512}


def test_wan_config_json_reads_as_the_1_3b_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(WAN_1_3B_CONFIG))
    assert config_from_wan_json(path) == PRESETS["1.3b"]


def test_i2v_config_json_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**WAN_1_3B_CONFIG, "model_type": "i2v"}))
    with pytest.raises(CheckpointError) as info:
        config_from_wan_json(path)
    assert str(path) in str(info.value) and "i2v" in str(info.value)


def test_shipped_tiny_config_json_reads_as_the_tiny_preset():
    cfg = config_from_wan_json(DATA / "longlive-tiny" / "config.json", TINY.latent_height, TINY.latent_width)
    assert cfg == TINY


def test_generator_dict_with_non_string_keys_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"generator": {0: torch.zeros(1)}}, path)
    assert_refused(path, "non-string keys")
