"""Frames as I420 (planar YUV 4:2:0, BT.601 limited range), the format the frame ring carries.

The encoder wants YUV 4:2:0; converting once where the frame is made (the engine process, or the
GPU for LongLive) halves the bytes crossing the ring and takes the conversion off the output clock.
An I420 frame is one uint8 array [height * 3 // 2, width]: the Y plane, then U and V (each
[height // 2, width // 2]) packed row after row.
"""

from __future__ import annotations

import numpy as np


def i420_shape(width: int, height: int) -> tuple[int, int]:
    """The array shape of one I420 frame."""
    return height * 3 // 2, width


def planes(frame: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y [h, w], U and V [h/2, w/2] planes of an I420 array (no copy)."""
    flat = frame.reshape(-1)
    y_size, c_size = width * height, (width // 2) * (height // 2)
    y = flat[:y_size].reshape(height, width)
    u = flat[y_size:y_size + c_size].reshape(height // 2, width // 2)
    v = flat[y_size + c_size:y_size + 2 * c_size].reshape(height // 2, width // 2)
    return y, u, v


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [h, w, 3] -> I420 [h * 3 // 2, w] with swscale (what the encoder used to do per frame)."""
    import av  # imported here: the LongLive engine converts on the GPU and never needs it

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.reformat(format="yuv420p").to_ndarray()


def i420_to_rgb(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """I420 [h * 3 // 2, w] -> RGB uint8 [h, w, 3] (virtual camera, tests)."""
    import av

    video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame).reshape(i420_shape(width, height)),
                                       format="yuv420p")
    return video.to_ndarray(format="rgb24")
