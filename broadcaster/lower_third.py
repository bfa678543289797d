"""The on-air prompt burned into the video as a lower third (for channels without OBS overlays)."""

from __future__ import annotations

import textwrap

import numpy as np


class LowerThird:
    """Draws `text` over the bottom of frames; the caption is rendered once per text (Pillow)."""

    def __init__(self, width: int, height: int, max_chars: int = 60):
        self.width, self.height = width, height
        self.max_chars = max_chars
        self._text: str | None = None
        self._rgb: np.ndarray | None = None  # caption colours, [h, w, 3] float32
        self._alpha: np.ndarray | None = None  # [h, w, 1] float32
        self._top = height
        self._out = np.empty((height, width, 3), np.uint8)

    def _render(self, text: str) -> None:
        from PIL import Image, ImageDraw, ImageFont

        size = max(10, self.height // 24)
        font = ImageFont.load_default(size=size)
        lines = textwrap.wrap(text, width=self.max_chars)[:2] or [""]
        if len(textwrap.wrap(text, width=self.max_chars)) > 2:
            lines[-1] = lines[-1][: self.max_chars - 1] + "…"
        pad = size // 2
        band = len(lines) * int(size * 1.3) + 2 * pad
        image = Image.new("RGBA", (self.width, band), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, self.width, band), fill=(10, 12, 20, 170))
        for i, line in enumerate(lines):
            draw.text((pad * 2, pad + i * int(size * 1.3)), line, font=font, fill=(255, 255, 255, 255))
        rgba = np.asarray(image, np.float32) / 255.0
        self._rgb, self._alpha = rgba[..., :3] * 255.0, rgba[..., 3:4]
        self._top = self.height - band - self.height // 20
        self._text = text

    def apply(self, frame: np.ndarray, text: str) -> np.ndarray:
        """A copy of `frame` with the caption; `frame` itself is left untouched."""
        if not text:
            return frame
        if text != self._text:
            self._render(text)
        out = self._out
        np.copyto(out, frame)
        top, band = self._top, self._rgb.shape[0]
        region = out[top : top + band].astype(np.float32)
        out[top : top + band] = (region * (1 - self._alpha) + self._rgb * self._alpha).astype(np.uint8)
        return out
