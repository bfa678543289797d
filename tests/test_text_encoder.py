"""UMT5 text encoder: golden vectors from Wan2.1's own t5.py, tokenizer, cache, loader errors.

The data in tests/data/umt5-tiny/ (weights, inputs, expected output, tokenizer) is described
in its README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.checkpoints import CheckpointError
from engine.model import PRESETS as DIT_PRESETS
from engine.text_encoder import (
    PRESETS,
    PromptTokenizer,
    TextEncoder,
    UMT5Config,
    UMT5Encoder,
    clean_prompt,
    load_umt5,
    relative_position_buckets,
)

DATA = Path(__file__).parent / "data" / "umt5-tiny"
WEIGHTS = DATA / "umt5_tiny.pth"
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(DATA / "inputs.safetensors")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(DATA / "expected.safetensors")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    with safe_open(DATA / "inputs.safetensors", "pt") as f:
        return json.loads(f.metadata()["prompts"])


@pytest.fixture(scope="module")
def encoder() -> UMT5Encoder:
    return load_umt5(WEIGHTS, "tiny", device="cpu", dtype=torch.float32)


@pytest.fixture
def tokenizer() -> PromptTokenizer:
    pytest.importorskip("tokenizers")
    pytest.importorskip("ftfy")
    return PromptTokenizer.from_dir(DATA, text_len=TINY.text_len)


@pytest.fixture
def text_encoder(encoder: UMT5Encoder, tokenizer: PromptTokenizer) -> TextEncoder:
    return TextEncoder(encoder, tokenizer, device="cpu", dtype=torch.float32, cache_size=3)


def test_golden_output_matches_wan_reference(encoder, inputs, expected):
    out = encoder(inputs["ids"], inputs["mask"])
    assert out.shape == expected["context"].shape
    assert (out - expected["context"]).abs().max().item() <= 1e-4


def test_relative_position_buckets_match_reference_at_512_tokens(expected):
    # The golden run only covers 16 tokens; the reference bucket of every offset -511..511
    # checks the log-spaced buckets at the real text length.
    table = relative_position_buckets(512, num_buckets=32, max_distance=128)
    pos = torch.arange(512)
    offset = pos[None, :] - pos[:, None]
    rel = expected["rel"]
    assert torch.equal(table, expected["buckets_rel"][offset - rel[0]])


def test_tokenizer_matches_reference_ids_and_mask(tokenizer, prompts, inputs):
    # Reference: Wan's HuggingfaceTokenizer(clean="whitespace", seq_len=16) via transformers.
    ids, mask = tokenizer(prompts)
    assert torch.equal(ids, inputs["ids"])
    assert torch.equal(mask, inputs["mask"])


def test_text_encoder_reproduces_golden_one_prompt_at_a_time(text_encoder, prompts, expected):
    for i, prompt in enumerate(prompts):
        out = text_encoder.encode(prompt)
        assert (out[0] - expected["context"][i]).abs().max().item() <= 1e-4


def test_encode_shape_and_zero_rows_past_real_tokens(text_encoder, tokenizer):
    out = text_encoder.encode("a red cat")
    assert out.shape == (1, TINY.text_len, TINY.dim)
    assert tokenizer.tokens("a red cat") == ["\u2581a", "\u2581red", "\u2581cat", "</s>"]
    assert out[0, :4].abs().sum(dim=1).min() > 0
    assert torch.count_nonzero(out[0, 4:]) == 0


def test_repeated_prompt_returns_cached_tensor_without_running_model(text_encoder):
    first = text_encoder.encode("a blue car at night")
    assert text_encoder.model_calls == 1
    again = text_encoder.encode("a blue car at night")
    assert again is first
    assert text_encoder.model_calls == 1


def test_different_prompts_give_different_embeddings(text_encoder):
    a = text_encoder.encode("a red cat")
    b = text_encoder.encode("a blue dog")
    assert text_encoder.model_calls == 2
    assert not torch.allclose(a, b)


def test_lru_evicts_least_recently_used_at_capacity(text_encoder):
    for prompt in ("a cat", "a dog", "a car"):
        text_encoder.encode(prompt)
    text_encoder.encode("a cat")  # refresh: "a dog" is now the oldest
    text_encoder.encode("a fox")
    assert len(text_encoder) == 3
    assert "a dog" not in text_encoder
    assert all(p in text_encoder for p in ("a cat", "a car", "a fox"))
    calls = text_encoder.model_calls
    text_encoder.encode("a dog")
    assert text_encoder.model_calls == calls + 1


def test_prepare_fills_cache_so_encode_is_a_hit(text_encoder):
    prepared = text_encoder.prepare("neon street in the rain")
    assert "neon street in the rain" in text_encoder
    assert text_encoder.model_calls == 1
    assert text_encoder.encode("neon street in the rain") is prepared
    assert text_encoder.model_calls == 1


@pytest.mark.parametrize(("raw", "clean"), [
    ("a &amp;amp; b &lt;i&gt;", "a & b <i>"),  # unescaped twice
    ("  a\t\tred\n\ncat\u3000at\u00a0night  ", "a red cat at night"),
    ("caf\u00c3\u00a9 Schr\u00c3\u00b6dinger", "caf\u00e9 Schr\u00f6dinger"),  # UTF-8 read as Latin-1
])
def test_prompt_cleaning(raw, clean):
    pytest.importorskip("ftfy")
    assert clean_prompt(raw) == clean


def test_truncation_keeps_eos_as_last_token(tokenizer):
    long = "the red fox and the blue dog jump over the city at sunset in the rain on the street"
    ids, mask = tokenizer(long)
    assert ids.shape == mask.shape == (1, TINY.text_len)
    assert mask.all()
    assert ids[0, -1].item() == tokenizer.eos_id
    assert (ids[0, :-1] != tokenizer.eos_id).all()


def test_short_prompt_is_padded_with_pad_id(tokenizer):
    ids, mask = tokenizer("a cat")
    assert ids[0, 2].item() == tokenizer.eos_id
    assert mask[0].tolist() == [1] * 3 + [0] * (TINY.text_len - 3)
    assert (ids[0, 3:] == tokenizer.pad_id).all()


def test_load_umt5_casts_to_requested_dtype(inputs, expected):
    model = load_umt5(WEIGHTS, "tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(inputs["ids"], inputs["mask"])
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected["context"]).abs().max().item() < 0.1


def _save(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "umt5.pth"
    torch.save(state, path)
    return path


def test_loader_error_names_file_and_missing_key(tmp_path):
    state = torch.load(WEIGHTS, weights_only=True)
    del state["blocks.1.ffn.gate.0.weight"]
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"umt5\.pth.*missing: blocks\.1\.ffn\.gate\.0\.weight"):
        load_umt5(path, "tiny")


def test_loader_error_names_shape_mismatch(tmp_path):
    wider = UMT5Config(vocab=TINY.vocab, dim=TINY.dim, dim_attn=TINY.dim_attn, dim_ffn=128,
                       num_heads=TINY.num_heads, num_layers=TINY.num_layers, text_len=TINY.text_len)
    with pytest.raises(CheckpointError, match=r"umt5_tiny\.pth.*shape mismatch: blocks\.0\.ffn\.fc1\.weight"):
        load_umt5(WEIGHTS, wider)


def test_loader_error_names_unexpected_key(tmp_path):
    state = torch.load(WEIGHTS, weights_only=True)
    state["pos_embedding.embedding.weight"] = torch.zeros(32, 2)  # a shared_pos (T5 v1.1) table
    with pytest.raises(CheckpointError, match=r"unexpected: pos_embedding\.embedding\.weight"):
        load_umt5(_save(tmp_path, state), "tiny")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_loader_error_names_unreadable_file(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"broken\.pth"):
        load_umt5(path, "tiny")


def test_loader_error_names_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.pth: file not found"):
        load_umt5(tmp_path / "absent.pth", "tiny")


def test_tokenizer_folder_errors_name_file(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not found"):
        PromptTokenizer.from_dir(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match=r"only spiece\.model"):
        PromptTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a readable"):
        PromptTokenizer.from_dir(tmp_path)


def test_cpu_placement_keeps_encoder_on_cpu_and_moves_output(encoder, tokenizer):
    # "meta" stands in for the GPU on a CPU-only machine: only the result goes there.
    text = TextEncoder(encoder, tokenizer, device="meta", dtype=torch.float32, placement="cpu")
    out = text.encode("a red cat")
    assert out.device.type == "meta"
    assert out.shape == (1, TINY.text_len, TINY.dim)
    assert {p.device.type for p in text.encoder.parameters()} == {"cpu"}


def test_tiny_preset_feeds_tiny_dit():
    assert TINY.dim == DIT_PRESETS["tiny"].text_dim
    assert TINY.text_len == DIT_PRESETS["tiny"].text_len


def test_umt5_xxl_keys_shapes_and_parameter_count():
    # Key set and shapes as listed in engine-spec §6.
    d, ffn, heads = 4096, 10240, 64
    want = {"token_embedding.weight": (256384, d), "norm.weight": (d,)}
    for i in range(24):
        b = f"blocks.{i}."
        want |= {b + "norm1.weight": (d,), b + "norm2.weight": (d,), b + "ffn.gate.0.weight": (ffn, d),
                 b + "ffn.fc1.weight": (ffn, d), b + "ffn.fc2.weight": (d, ffn),
                 b + "pos_embedding.embedding.weight": (32, heads)}
        want |= {f"{b}attn.{p}.weight": (d, d) for p in "qkvo"}
    with torch.device("meta"):
        model = UMT5Encoder("umt5-xxl")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
