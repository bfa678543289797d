"""The output clock, one `Pacer.step` at a time, with a real frame ring and a real H.264 encoder."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from broadcaster.encoder import StreamEncoder
from broadcaster.metrics import Metrics
from broadcaster.pacer import Pacer
from broadcaster.packets import AUDIO, VIDEO, EncodedPacket
from broadcaster.settings import EncoderSettings
from broadcaster.switches import SwitchTracker
from engine.ring import FrameRing

W, H = 64, 48


def frame(value: int) -> np.ndarray:
    """An I420 engine frame tagged with `value` in its first two luma bytes."""
    out = np.full((H * 3 // 2, W), 128, np.uint8)
    out[0, :2] = (value % 256, value // 256)
    return out


def value_of(pixels: np.ndarray) -> int:
    return int(pixels[0, 0]) + 256 * int(pixels[0, 1])


@dataclass
class Rig:
    pacer: Pacer
    ring: FrameRing
    metrics: Metrics
    switches: SwitchTracker
    sinks: list[list[EncodedPacket]]
    now: list[float] = field(default_factory=lambda: [100.0])
    on_air: list[int] = field(default_factory=list)  # the frame value each output frame showed

    def feed(self, values, prompt_seq: int = 0) -> None:
        for value in values:
            assert self.ring.try_write(frame(value), prompt_seq, 0)

    def step(self, count: int = 1) -> list[EncodedPacket]:
        packets: list[EncodedPacket] = []
        for _ in range(count):
            packets += self.pacer.step(self.pacer.frames_out)
            self.on_air.append(value_of(self.pacer.frame))
        return packets

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


@pytest.fixture
def make_rig() -> Iterator:
    made: list[tuple[StreamEncoder, FrameRing]] = []

    def make(engine_fps: float = 16, output_fps: float = 16, sinks: int = 1, depth: int = 64) -> Rig:
        settings = EncoderSettings(fps=output_fps, width=W, height=H, preset="ultrafast",
                                   video_bitrate_kbps=200, codec="libx264")
        encoder = StreamEncoder(settings, W, H, output_fps)
        ring = FrameRing.create(W, H, depth)
        made.append((encoder, ring))
        metrics = Metrics()
        now = [100.0]
        switches = SwitchTracker(metrics, clock=lambda: now[0])
        lists: list[list[EncodedPacket]] = [[] for _ in range(sinks)]
        pacer = Pacer(ring, encoder, [out.append for out in lists], metrics, switches, engine_fps)
        return Rig(pacer, ring, metrics, switches, lists, now)

    yield make
    for encoder, ring in made:
        encoder.close()
        ring.close()


def test_empty_ring_repeats_the_frame_and_counts_each_repeat(make_rig):
    rig = make_rig()

    rig.step(3)

    assert rig.pacer.repeated == 3
    assert rig.sample("promptcast_frames_repeated_total") == 3
    assert rig.sample("promptcast_frames_output_total") == 3


def test_empty_ring_still_produces_one_video_packet_per_tick(make_rig):
    rig = make_rig()

    packets = rig.step(5)

    assert [p.pts for p in packets if p.stream == VIDEO] == [0, 1, 2, 3, 4]


def test_frames_present_are_consumed_one_per_tick(make_rig):
    rig = make_rig()
    rig.feed(range(1, 6))

    fill = []
    for _ in range(5):
        rig.step()
        fill.append(len(rig.ring))

    assert rig.on_air == [1, 2, 3, 4, 5]
    assert fill == [4, 3, 2, 1, 0]
    assert rig.sample("promptcast_frames_repeated_total") == 0


def test_a_late_engine_repeats_its_last_frame(make_rig):
    rig = make_rig()
    rig.feed([1, 2])

    rig.step(4)

    assert rig.on_air == [1, 2, 2, 2]
    assert rig.sample("promptcast_frames_repeated_total") == 2


def test_frames_arriving_after_a_stall_are_shown_in_order_without_catching_up(make_rig):
    rig = make_rig()
    rig.feed([1])
    rig.step(3)  # two ticks late
    rig.feed([2, 3, 4])

    rig.step(3)

    assert rig.on_air == [1, 1, 1, 2, 3, 4]


def test_output_at_twice_the_engine_rate_shows_each_engine_frame_twice_without_repeats(make_rig):
    rig = make_rig(engine_fps=16, output_fps=32)
    rig.feed(range(1, 11))

    rig.step(20)

    shown = [v for v in rig.on_air if 1 <= v <= 10]
    runs = [(value, len(list(group))) for value, group in itertools.groupby(shown)]
    assert [value for value, _ in runs] == list(range(1, len(runs) + 1))
    assert len(runs) >= 9
    assert all(length == 2 for _, length in runs[:-1])
    assert rig.sample("promptcast_frames_repeated_total") == 0


def test_output_at_twice_the_engine_rate_consumes_half_a_frame_per_tick(make_rig):
    rig = make_rig(engine_fps=16, output_fps=32)
    rig.feed(range(1, 11))

    rig.step(10)

    assert len(rig.ring) == 5


def test_first_frame_of_a_new_prompt_observes_the_switch_latency(make_rig):
    rig = make_rig()
    rig.feed([1, 2], prompt_seq=0)
    rig.feed([3, 4], prompt_seq=1)
    rig.switches.decided(1, "a deep blue ocean under snow")
    rig.now[0] += 0.4

    rig.step(2)
    before = rig.sample("promptcast_switch_latency_seconds_count")
    rig.step()
    after = rig.sample("promptcast_switch_latency_seconds_count")
    rig.step()

    assert (before, after) == (0, 1)
    assert rig.sample("promptcast_switch_latency_seconds_count") == 1
    assert rig.sample("promptcast_switch_latency_seconds_sum") == pytest.approx(0.4)
    assert rig.sample("promptcast_prompt_switches_total") == 1
    assert rig.switches.on_air_seq == 1
    assert rig.switches.on_air_prompt == "a deep blue ocean under snow"


def test_a_switch_superseded_before_it_aired_observes_only_the_later_one(make_rig):
    rig = make_rig()
    rig.switches.decided(1, "first idea")
    rig.switches.decided(2, "second idea")
    rig.now[0] += 0.25
    rig.feed([1], prompt_seq=0)
    rig.feed([2], prompt_seq=2)

    rig.step(2)

    assert rig.sample("promptcast_switch_latency_seconds_count") == 1
    assert rig.sample("promptcast_prompt_switches_total") == 1
    assert rig.switches.on_air_prompt == "second idea"


def test_the_start_prompt_is_not_counted_as_a_switch(make_rig):
    rig = make_rig()
    rig.switches.decided(0, "the start prompt")
    rig.feed([1], prompt_seq=0)

    rig.step()

    assert rig.sample("promptcast_switch_latency_seconds_count") == 0
    assert rig.sample("promptcast_prompt_switches_total") == 0
    assert rig.switches.on_air_prompt == "the start prompt"


def test_packets_reach_every_sink_in_order(make_rig):
    rig = make_rig(sinks=3)
    rig.feed(range(1, 9))

    packets = rig.step(12)

    assert {p.stream for p in packets} == {VIDEO, AUDIO}
    assert all(sink == packets for sink in rig.sinks)


def test_every_tick_is_counted_and_its_encode_timed(make_rig):
    rig = make_rig()
    rig.feed([1, 2])

    rig.step(6)

    assert rig.pacer.frames_out == 6
    assert rig.sample("promptcast_frames_output_total") == 6
    assert rig.sample("promptcast_encode_seconds_count") == 6


@pytest.mark.parametrize(("engine_fps", "output_fps"), [(16, 16), (16, 24), (16, 32)])
def test_a_keyframe_every_two_seconds_of_output(make_rig, engine_fps, output_fps):
    rig = make_rig(engine_fps=engine_fps, output_fps=output_fps)
    rig.feed(range(1, 41))
    gop = 2 * output_fps
    ticks = 2 * gop + 5

    video = [p for p in rig.step(ticks) if p.stream == VIDEO]

    assert [p.pts for p in video] == list(range(ticks))
    assert [p.pts for p in video if p.keyframe] == [0, gop, 2 * gop]
