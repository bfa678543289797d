"""The prompt burned into the video as a lower third."""

from __future__ import annotations

import numpy as np

from broadcaster.encoder import StreamEncoder
from broadcaster.lower_third import LowerThird
from broadcaster.metrics import Metrics
from broadcaster.pacer import Pacer
from broadcaster.settings import EncoderSettings
from broadcaster.switches import SwitchTracker
from engine.ring import FrameRing


def _frame(h=96, w=128, value=200):
    return np.full((h * 3 // 2, w), value, np.uint8)  # I420, as the ring carries


def test_the_caption_darkens_a_band_at_the_bottom_and_leaves_the_top_alone():
    frame = _frame()
    out = LowerThird(128, 96).apply(frame, "a red fox in the snow")
    luma = out[:96]
    assert np.array_equal(luma[:40], frame[:40])
    band = luma[60:92]
    assert band.min() < 100  # the dark box
    assert band.max() > 220  # white text (Y 235 is white in limited range)


def test_the_caption_blended_in_yuv_shows_white_text_over_an_unchanged_picture_in_rgb():
    from engine.yuv import i420_to_rgb, rgb_to_i420

    frame = rgb_to_i420(np.full((96, 128, 3), (40, 160, 40), np.uint8))
    rgb = i420_to_rgb(LowerThird(128, 96).apply(frame, "a red fox in the snow"), 128, 96)
    band = rgb[60:92].astype(int)
    assert (band.max(axis=(0, 1)) > 200).all()  # white glyphs: every channel high
    assert abs(int(rgb[10, 10, 1]) - 160) <= 3  # the picture above is the picture


def test_the_source_frame_is_never_modified():
    frame = _frame()
    LowerThird(128, 96).apply(frame, "a red fox in the snow")
    assert (frame == 200).all()


def test_an_empty_prompt_draws_nothing():
    frame = _frame()
    assert LowerThird(128, 96).apply(frame, "") is frame


def test_a_long_prompt_is_cut_to_two_lines():
    third = LowerThird(128, 96, max_chars=10)
    third.apply(_frame(), "one two three four five six seven eight nine ten eleven")
    assert third._rgb.shape[0] < 96 // 2


def test_the_pacer_encodes_the_captioned_frame_when_burn_in_is_on(monkeypatch):
    ring = FrameRing.create(64, 48, 4)
    try:
        settings = EncoderSettings(preset="ultrafast", video_bitrate_kbps=200, burn_in_prompt=True)
        encoder = StreamEncoder(settings, 64, 48, 16)
        metrics = Metrics()
        switches = SwitchTracker(metrics)
        switches.decided(0, "a red fox")
        pacer = Pacer(ring, encoder, [], metrics, switches, engine_fps=16)
        seen = []
        real = encoder.encode
        monkeypatch.setattr(encoder, "encode",
                            lambda frame, i, seq=0: seen.append(frame.copy()) or real(frame, i, seq))
        ring.try_write(np.full((72, 64), 200, np.uint8), 0, 0)
        pacer.step(0)
        assert not (seen[0] == 200).all()  # the caption is in what was encoded
        assert (pacer.frame == 200).all()  # the engine frame itself is untouched
    finally:
        ring.close()
