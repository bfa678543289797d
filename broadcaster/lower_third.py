"""The on-air prompt burned into the video as a lower third (for channels without OBS overlays)."""

from __future__ import annotations

import textwrap

import numpy as np

from engine.yuv import i420_shape, planes

# BT.601 limited range, as swscale converts for the encoder: RGB 0..255 -> Y, U, V rows.
_TO_YUV = np.array([[0.2568, 0.5041, 0.0979], [-0.1482, -0.2910, 0.4392], [0.4392, -0.3678, -0.0714]],
                   np.float32)
_YUV_OFFSET = np.array([16.0, 128.0, 128.0], np.float32)


class LowerThird:
    """Draws `text` over the bottom of I420 frames; the caption is rendered once per text (Pillow).

    Blending is done in YUV: the conversion from RGB is affine, so `frame * (1 - a) + caption * a`
    gives the same picture as blending in RGB, with the caption's alpha averaged over each 2x2
    block for the chroma planes.
    """

    def __init__(self, width: int, height: int, max_chars: int = 60):
        self.width, self.height = width, height
        self.max_chars = max_chars
        self._text: str | None = None
        self._rgb: np.ndarray | None = None  # caption colours, [h, w, 3] float32
        # Per plane (Y, U, V): what of the frame is kept (1 - alpha) and what the caption adds.
        self._keep: list[np.ndarray] = []
        self._add: list[np.ndarray] = []
        self._top = height
        self._out = np.empty(i420_shape(width, height), np.uint8)

    def _render(self, text: str) -> None:
        from PIL import Image, ImageDraw, ImageFont

        size = max(10, self.height // 24)
        font = ImageFont.load_default(size=size)
        lines = textwrap.wrap(text, width=self.max_chars)[:2] or [""]
        if len(textwrap.wrap(text, width=self.max_chars)) > 2:
            lines[-1] = lines[-1][: self.max_chars - 1] + "…"
        pad = size // 2
        band = (len(lines) * int(size * 1.3) + 2 * pad + 1) // 2 * 2  # even: whole chroma rows
        image = Image.new("RGBA", (self.width, band), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, self.width, band), fill=(10, 12, 20, 170))
        for i, line in enumerate(lines):
            draw.text((pad * 2, pad + i * int(size * 1.3)), line, font=font, fill=(255, 255, 255, 255))
        rgba = np.asarray(image, np.float32) / 255.0
        self._rgb, alpha = rgba[..., :3] * 255.0, rgba[..., 3]
        yuv = self._rgb @ _TO_YUV.T + _YUV_OFFSET
        self._top = max(0, (self.height - band - self.height // 20) // 2 * 2)
        half = alpha.reshape(band // 2, 2, self.width // 2, 2).mean(axis=(1, 3))
        premul = (yuv * alpha[..., None]).reshape(band // 2, 2, self.width // 2, 2, 3).mean(axis=(1, 3))
        self._keep = [1.0 - alpha, 1.0 - half, 1.0 - half]
        self._add = [yuv[..., 0] * alpha + 0.5, premul[..., 1] + 0.5, premul[..., 2] + 0.5]  # +0.5: rounds
        self._text = text

    def apply(self, frame: np.ndarray, text: str) -> np.ndarray:
        """A copy of the I420 `frame` with the caption; `frame` itself is left untouched."""
        if not text:
            return frame
        if text != self._text:
            self._render(text)
        out = self._out
        np.copyto(out, frame)
        band = self._rgb.shape[0]
        for k, plane in enumerate(planes(out, self.width, self.height)):
            top = self._top if k == 0 else self._top // 2
            rows = plane[top : top + (band if k == 0 else band // 2)]
            rows[...] = (rows * self._keep[k] + self._add[k]).astype(np.uint8)
        return out
