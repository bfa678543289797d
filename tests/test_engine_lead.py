"""How far ahead the engine process runs: its block time plus slack, more when a switch is pending."""

from __future__ import annotations

import numpy as np

from engine.process import Lead, as_i420


def test_with_no_history_the_engine_keeps_only_the_slack():
    assert Lead(16, slack=2).frames() == 2


def test_the_lead_covers_the_slowest_recent_block_and_forgets_it_after_four():
    lead = Lead(16, slack=2)
    lead.observe(0.5)  # a slow block on a busy machine
    assert lead.frames() == 8 + 2
    for _ in range(4):
        lead.observe(0.1)
    assert lead.frames() == 2 + 2


def test_a_pending_switch_starts_the_block_earlier_by_what_switch_blocks_cost_extra():
    lead = Lead(16, slack=2)
    for _ in range(3):
        lead.observe(0.25)
    lead.observe(0.55, switched=True)  # recache: 0.3 s on top of a typical block

    assert lead.frames() == 4 + 2
    assert lead.frames(switching=True) == round(0.55 * 16) + 2


def test_rgb_blocks_are_converted_and_i420_blocks_pass_through():
    class Rgb:
        pass

    class Yuv:
        frame_format = "i420"

    rgb = np.zeros((2, 8, 16, 3), np.uint8)
    assert [f.shape for f in as_i420(Rgb(), rgb)] == [(12, 16), (12, 16)]
    yuv = np.full((2, 12, 16), 7, np.uint8)
    assert all(f is yuv[i] or np.shares_memory(f, yuv) for i, f in enumerate(as_i420(Yuv(), yuv)))
