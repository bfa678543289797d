"""The shared-memory frame ring between the engine process and the broadcaster."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator

import numpy as np
import pytest

from engine.ring import FrameRing

W, H = 16, 8


def frame(value: int) -> np.ndarray:
    """An I420 frame whose bytes all hold `value` (mod 256), with a marker in its first two bytes."""
    out = np.full((H * 3 // 2, W), value % 256, np.uint8)
    out[0, :3] = (value % 256, (value // 256) % 256, 7)
    return out


def value_of(pixels: np.ndarray) -> int:
    return int(pixels[0, 0]) + 256 * int(pixels[0, 1])


@pytest.fixture
def ring() -> Iterator[FrameRing]:
    ring = FrameRing.create(W, H, depth=4)
    yield ring
    ring.close()


def read(ring: FrameRing) -> tuple[int, tuple[int, int]] | None:
    out = np.empty(ring.frame_shape, np.uint8)
    tag = ring.read_into(out)
    return None if tag is None else (value_of(out), tag)


def test_new_ring_is_empty(ring):
    assert len(ring) == 0
    assert read(ring) is None


def test_frames_are_read_in_the_order_written(ring):
    for i in range(3):
        assert ring.try_write(frame(i), 0, 0)

    assert [read(ring)[0] for _ in range(3)] == [0, 1, 2]
    assert read(ring) is None


def test_pixels_arrive_intact(ring):
    pixels = np.random.default_rng(5).integers(0, 256, (H * 3 // 2, W), dtype=np.uint8)
    ring.try_write(pixels, 0, 0)
    out = np.zeros_like(pixels)

    ring.read_into(out)

    np.testing.assert_array_equal(out, pixels)


def test_order_holds_across_many_wrap_arounds(ring):
    got = []
    for i in range(50):
        assert ring.try_write(frame(i), 0, i)
        if i % 3 == 2:
            while (item := read(ring)) is not None:
                got.append(item[0])
    while (item := read(ring)) is not None:
        got.append(item[0])

    assert got == list(range(50))


def test_full_ring_refuses_another_frame(ring):
    for i in range(ring.depth):
        assert ring.try_write(frame(i), 0, 0)

    assert ring.try_write(frame(99), 0, 0) is False
    assert len(ring) == ring.depth


def test_refused_frame_does_not_overwrite_the_oldest(ring):
    for i in range(ring.depth):
        ring.try_write(frame(i), 0, 0)
    ring.try_write(frame(99), 0, 0)

    assert [read(ring)[0] for _ in range(ring.depth)] == [0, 1, 2, 3]


def test_reading_one_frame_frees_one_slot(ring):
    for i in range(ring.depth):
        ring.try_write(frame(i), 0, 0)
    read(ring)

    assert ring.try_write(frame(4), 0, 0) is True
    assert ring.try_write(frame(5), 0, 0) is False


def test_prompt_seq_and_block_tags_are_preserved(ring):
    tags = [(0, 0), (0, 1), (3, 1), (2**40, 7)]
    for i, (seq, block) in enumerate(tags):
        ring.try_write(frame(i), seq, block)

    assert [read(ring)[1] for _ in tags] == tags


def test_len_counts_unread_frames(ring):
    ring.try_write(frame(0), 0, 0)
    ring.try_write(frame(1), 0, 0)
    read(ring)

    assert len(ring) == 1


def test_write_gives_up_on_a_full_ring_when_told_to_stop(ring):
    for i in range(ring.depth):
        ring.try_write(frame(i), 0, 0)

    assert ring.write(frame(9), 0, 0, should_stop=lambda: True) is False
    assert len(ring) == ring.depth


def test_write_waits_for_a_slot_and_then_succeeds(ring):
    for i in range(ring.depth):
        ring.try_write(frame(i), 0, 0)
    polls = []

    def stop_after_freeing_a_slot() -> bool:
        polls.append(1)
        if len(polls) == 3:
            read(ring)
        return False

    assert ring.write(frame(9), 0, 0, should_stop=stop_after_freeing_a_slot, poll_s=0.0) is True
    assert len(polls) == 3
    assert [read(ring)[0] for _ in range(ring.depth)] == [1, 2, 3, 9]


def test_second_handle_attached_by_name_sees_the_frames(ring):
    other = FrameRing.attach(ring.name)
    try:
        assert (other.width, other.height, other.depth) == (W, H, 4)
        ring.try_write(frame(1), 5, 6)
        ring.try_write(frame(2), 5, 7)

        assert read(other) == (1, (5, 6))
        assert len(ring) == 1  # the read position is shared too
        assert read(ring) == (2, (5, 7))
    finally:
        other.close()


def test_frames_written_through_an_attached_handle_reach_the_owner(ring):
    other = FrameRing.attach(ring.name)
    try:
        other.try_write(frame(42), 1, 2)
    finally:
        other.close()

    assert read(ring) == (42, (1, 2))


def test_heartbeat_age_is_huge_before_the_first_beat(ring):
    assert ring.heartbeat_age() > 1.0


def test_heartbeat_age_restarts_at_each_beat(ring):
    ring.beat()
    fresh = ring.heartbeat_age()
    time.sleep(0.05)
    later = ring.heartbeat_age()

    assert 0 <= fresh < later < 5
    assert later >= 0.05


def test_write_beats(ring):
    ring.write(frame(0), 0, 0)

    assert ring.heartbeat_age() < 1.0


def test_beat_is_visible_through_another_handle(ring):
    other = FrameRing.attach(ring.name)
    try:
        other.beat()
        assert ring.heartbeat_age() < 1.0
    finally:
        other.close()


def test_closing_an_attached_handle_keeps_the_memory(ring):
    ring.try_write(frame(3), 0, 0)
    FrameRing.attach(ring.name).close()

    again = FrameRing.attach(ring.name)
    try:
        assert read(again) == (3, (0, 0))
    finally:
        again.close()


def test_closing_the_owner_unlinks_the_memory():
    ring = FrameRing.create(W, H, depth=2)
    name = ring.name

    ring.close()

    with pytest.raises(FileNotFoundError):
        FrameRing.attach(name)


def _spawned_writer(name: str, count: int) -> None:
    ring = FrameRing.attach(name)
    try:
        for i in range(count):
            if not ring.write(frame(i), i // 10, i, poll_s=0.0005):
                raise SystemExit(3)
    finally:
        ring.close()


def test_frames_from_a_spawned_writer_process_arrive_in_order():
    count = 300
    ring = FrameRing.create(W, H, depth=4)  # much shallower than count: the writer must wait
    process = multiprocessing.get_context("spawn").Process(target=_spawned_writer, args=(ring.name, count))
    got: list[tuple[int, tuple[int, int]]] = []
    try:
        process.start()
        deadline = time.monotonic() + 20
        while len(got) < count and time.monotonic() < deadline:
            item = read(ring)
            if item is None:
                time.sleep(0.0005)
            else:
                got.append(item)
        process.join(10)
    finally:
        if process.is_alive():
            process.kill()
            process.join()
        ring.close()

    assert process.exitcode == 0
    assert [v for v, _ in got] == [i % 65536 for i in range(count)]
    assert [t for _, t in got] == [(i // 10, i) for i in range(count)]


def test_frames_dropped_by_a_cut_are_skipped_and_counted_and_later_frames_still_arrive(ring):
    for i in range(3):
        ring.try_write(frame(i), 0, 0)
    read(ring)
    ring.drop_unread()
    ring.try_write(frame(10), 1, 1)

    assert read(ring) == (10, (1, 1))
    assert ring.skipped == 2
    assert read(ring) is None


def test_a_taken_frame_stays_in_place_until_the_next_take_and_holds_its_slot(ring):
    for i in range(4):
        ring.try_write(frame(i), 0, i)
    view, tag = ring.take()

    assert (value_of(view), tag) == (0, (0, 0))
    assert len(ring) == 3
    assert ring.try_write(frame(9), 0, 9) is False  # the held slot is still in use
    ring.take()
    assert value_of(view) == 0  # untouched until the writer gets the slot back
    assert ring.try_write(frame(9), 0, 9) is True
    assert value_of(view) == 9  # the slot was reused: a view must not outlive its take
    ring.release()
