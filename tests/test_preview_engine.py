"""The preview engine: block structure, prompt-following, determinism and smooth prompt switches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import ImageFont

from engine.interface import Engine
from engine.preview import PreviewEngine, _wrap

W, H = 128, 96


def started(prompt: str, seed: int = 0, **kwargs) -> PreviewEngine:
    engine = PreviewEngine(W, H, **kwargs)
    engine.start(prompt, seed)
    return engine


def blocks(engine: PreviewEngine, count: int) -> list[np.ndarray]:
    return [engine.next_block() for _ in range(count)]


def diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 8-bit levels."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_it_implements_the_engine_protocol():
    assert isinstance(PreviewEngine(W, H), Engine)


def test_first_block_has_9_frames_then_blocks_have_12():
    first, second, third = blocks(started("a calm ocean"), 3)
    assert first.shape == (9, H, W, 3)
    assert second.shape == third.shape == (12, H, W, 3)
    assert first.dtype == np.uint8


def test_block_sizes_follow_the_constructor():
    first, second = blocks(started("x", first_block_frames=3, block_frames=5), 2)
    assert (len(first), len(second)) == (3, 5)


def test_frames_are_not_static():
    block = started("a calm ocean").next_block()
    assert diff(block[0], block[-1]) > 0.5


def test_same_prompt_and_seed_give_bit_identical_frames_across_instances():
    a = blocks(started("neon city at night", seed=7), 3)
    b = blocks(started("neon city at night", seed=7), 3)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_different_seeds_give_different_frames():
    a = started("neon city at night", seed=1).next_block()
    b = started("neon city at night", seed=2).next_block()
    assert diff(a, b) > 5


def test_colour_words_bias_the_palette():
    def blue_minus_red(prompt: str) -> float:
        frames = np.concatenate(blocks(started(prompt), 2)).astype(np.float64)
        return frames[..., 2].mean() - frames[..., 0].mean()

    assert blue_minus_red("deep blue ocean") > 40
    assert blue_minus_red("red fire") < -40


def test_green_words_make_green_the_strongest_channel():
    frames = started("a quiet green forest").next_block().astype(np.float64)
    red, green, blue = frames[..., :3].mean(axis=(0, 1, 2))
    assert green > red and green > blue


def test_fast_words_move_faster_than_calm_words():
    def motion(prompt: str) -> float:
        block = blocks(started(prompt), 2)[1]
        # The caption band is static; measure the field above it.
        field = block[:, : H // 2]
        return float(np.mean([diff(field[i], field[i + 1]) for i in range(len(field) - 1)]))

    assert motion("blue storm, chaos") > 2 * motion("calm still blue")


def test_motion_is_continuous_across_block_boundaries():
    first, second = blocks(started("sunset over the sea"), 2)
    inside = max(diff(first[i], first[i + 1]) for i in range(len(first) - 1))
    assert diff(first[-1], second[0]) <= 1.5 * inside


def test_caption_draws_bright_text_near_the_bottom():
    frame = started("deep blue ocean").next_block()[0]
    # The field of this palette never gets above ~100 in its weakest channel; the white text does.
    white = (frame.min(axis=2) > 180).sum(axis=1)
    assert white[H // 2 :].sum() > 10
    assert white[: H // 2].sum() == 0


def test_empty_prompt_draws_no_caption():
    # Palettes picked by the hash keep every colour's weakest channel below ~170, so only text gets there.
    frames = np.concatenate(blocks(started(""), 2))
    assert not (frames.min(axis=3) > 180).any()


def test_caption_shows_the_prompt_as_typed_while_the_look_ignores_case():
    lower = started("deep blue ocean").next_block()[0]
    title = started("Deep Blue Ocean").next_block()[0]
    changed_rows = np.nonzero((lower != title).any(axis=(1, 2)))[0]
    assert changed_rows.size > 0
    assert changed_rows.min() >= H // 2


def test_long_captions_wrap_to_two_lines_ending_in_an_ellipsis():
    font = ImageFont.load_default(size=16)
    text = " ".join(["word"] * 60)
    lines = _wrap(text, font, 200)
    assert len(lines) == 2
    assert lines[1].endswith("…")
    assert all(font.getlength(line) <= 200 for line in lines)


@pytest.mark.parametrize(("width", "height"), [(16, 16), (64, 48), (832, 480)])
def test_very_long_prompts_render_at_any_size(width, height):
    engine = PreviewEngine(width, height)
    engine.start("a sprawling fantasy landscape with castles and dragons " * 20, 0)
    assert engine.next_block().shape == (9, height, width, 3)


def test_short_captions_stay_on_one_line():
    assert _wrap("deep blue ocean", ImageFont.load_default(size=16), 400) == ["deep blue ocean"]


def test_switch_leaves_the_current_block_untouched_when_called_between_blocks():
    switched, steady = started("deep blue ocean"), started("deep blue ocean")
    before = switched.next_block()
    switched.switch_prompt("red fire")
    assert np.array_equal(before, steady.next_block())


def test_switch_starts_at_the_first_frame_of_the_next_block_and_is_smooth():
    switched, steady, target = started("deep blue ocean"), started("deep blue ocean"), started("red fire")
    blocks(switched, 2)
    blocks(steady, 2)
    blocks(target, 2)
    switched.switch_prompt("red fire")
    first = switched.next_block()[0]
    unswitched, new = steady.next_block()[0], target.next_block()[0]
    between_prompts = diff(unswitched, new)
    assert 0 < diff(first, unswitched) < 0.1 * between_prompts


def test_switch_blends_gradually_over_the_transition():
    switched, target = started("deep blue ocean"), started("red fire")
    blocks(switched, 1)
    blocks(target, 1)
    switched.switch_prompt("red fire")
    transition, fresh = switched.next_block(), target.next_block()
    distances = [diff(a, b) for a, b in zip(transition, fresh, strict=True)]
    assert all(x >= y for x, y in itertools.pairwise(distances))
    steps = [diff(transition[i], transition[i + 1]) for i in range(len(transition) - 1)]
    assert max(steps) < 0.35 * distances[0]


@pytest.mark.parametrize(
    ("old", "new"),
    [("deep blue ocean", "red fire"), ("", "neon city at night"), ("neon city at night", "")],
)
def test_after_the_transition_frames_equal_a_fresh_engine_with_the_new_prompt(old, new):
    switched, fresh = started(old, seed=3), started(new, seed=3)
    blocks(switched, 2)
    blocks(fresh, 2)
    switched.switch_prompt(new)
    transition, fresh_transition = switched.next_block(), fresh.next_block()
    assert not np.array_equal(transition[0], fresh_transition[0])
    assert np.array_equal(transition[-1], fresh_transition[-1])
    for a, b in zip(blocks(switched, 2), blocks(fresh, 2), strict=True):
        assert np.array_equal(a, b)


def test_transitions_longer_than_a_block_also_end_exactly_on_the_new_prompt():
    switched, fresh = (
        started("deep blue ocean", transition_frames=30),
        started("red fire", transition_frames=30),
    )
    blocks(switched, 1)
    blocks(fresh, 1)
    switched.switch_prompt("red fire")
    during = blocks(switched, 3)  # frames 9..44; the transition's last frame is 38
    fresh_during = blocks(fresh, 3)
    assert not np.array_equal(during[1], fresh_during[1])
    after, fresh_after = blocks(switched, 2), blocks(fresh, 2)
    for a, b in zip(after, fresh_after, strict=True):
        assert np.array_equal(a, b)


def test_switching_again_mid_transition_continues_from_what_is_on_screen():
    engine = started("deep blue ocean", transition_frames=24)
    blocks(engine, 2)
    engine.switch_prompt("red fire")
    halfway = engine.next_block()
    engine.switch_prompt("green forest")
    after = engine.next_block()
    steps = [diff(halfway[i], halfway[i + 1]) for i in range(len(halfway) - 1)]
    assert diff(halfway[-1], after[0]) <= max(steps)


def test_switching_again_mid_transition_ends_exactly_on_the_last_prompt():
    engine, fresh = (
        started("deep blue ocean", transition_frames=24),
        started("green forest", transition_frames=24),
    )
    blocks(engine, 2)
    engine.switch_prompt("red fire")
    engine.next_block()
    engine.switch_prompt("green forest")
    blocks(engine, 2)  # the 24 frames of the second transition
    blocks(fresh, 5)
    assert np.array_equal(engine.next_block(), fresh.next_block())


def test_switching_to_the_current_prompt_changes_nothing():
    switched, steady = started("deep blue ocean"), started("deep blue ocean")
    blocks(switched, 1)
    blocks(steady, 1)
    switched.switch_prompt("deep blue ocean")
    assert np.array_equal(switched.next_block(), steady.next_block())


def test_switch_before_the_first_block_starts_on_the_new_prompt():
    engine = started("deep blue ocean")
    engine.switch_prompt("red fire")
    assert np.array_equal(engine.next_block(), started("red fire").next_block())


def test_next_block_before_start_raises():
    with pytest.raises(RuntimeError, match="start"):
        PreviewEngine(W, H).next_block()


def test_switch_prompt_before_start_raises():
    with pytest.raises(RuntimeError, match="start"):
        PreviewEngine(W, H).switch_prompt("red fire")


def test_reset_requires_start_again():
    engine = started("deep blue ocean")
    engine.next_block()
    engine.reset()
    with pytest.raises(RuntimeError):
        engine.next_block()


def test_start_after_reset_begins_a_fresh_stream():
    engine = started("deep blue ocean", seed=4)
    blocks(engine, 2)
    engine.switch_prompt("red fire")
    engine.next_block()
    engine.reset()
    engine.start("neon city", 9)
    first, second = blocks(engine, 2)
    fresh_first, fresh_second = blocks(started("neon city", seed=9), 2)
    assert len(first) == 9
    assert np.array_equal(first, fresh_first) and np.array_equal(second, fresh_second)


@pytest.mark.parametrize(("width", "height"), [(0, 48), (-2, 48), (63, 48), (64, 47), (64.0, 48), (True, 48)])
def test_sizes_must_be_positive_even_integers(width, height):
    with pytest.raises(ValueError):
        PreviewEngine(width, height)


def test_sizes_not_divisible_by_four_are_rendered_in_full():
    engine = PreviewEngine(130, 98)
    engine.start("sunset", 0)
    block = engine.next_block()
    assert block.shape == (9, 98, 130, 3)
    assert block[:, -1].any() and block[:, :, -1].any()


def test_frame_index_counts_generated_frames():
    engine = started("x")
    blocks(engine, 3)
    assert engine.frame_index == 9 + 12 + 12


def test_with_the_caption_off_the_picture_is_the_same_except_where_the_caption_was():
    captioned, bare = PreviewEngine(320, 192), PreviewEngine(320, 192, caption=False)
    for engine in (captioned, bare):
        engine.start("a red fire storm at night", seed=3)
    with_text, without = captioned.next_block()[0], bare.next_block()[0]

    assert np.array_equal(with_text[:100], without[:100])  # the caption sits near the bottom
    assert not np.array_equal(with_text[150:], without[150:])
    bare.prepare_prompt("a blue ocean")  # nothing to draw, and no error
