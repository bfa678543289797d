"""The preview backend: a CPU engine that turns the prompt into an animated colour field with a caption.

It exists so a channel can be set up, tested and watched end to end without a GPU; it is not a stand-in
for the model's output quality. Everything is deterministic: frame n of a stream is a pure function of
the prompt state, the seed and n. See docs/preview-engine.md.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PreviewEngine"]

_TAU = 2.0 * math.pi
# The field is computed on a grid this many times coarser per side; the colour field is smooth, so
# detail is spent on the caption instead (the budget is a few ms per frame next to an encoder).
_DOWNSCALE = 4

# Colour words and the colours they pull the palette towards, in the order they add them.
_COLOUR_WORDS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((205, 25, 35),),
    "crimson": ((160, 10, 40),),
    "scarlet": ((225, 35, 25),),
    "orange": ((245, 130, 20),),
    "amber": ((255, 170, 10),),
    "gold": ((235, 185, 40),),
    "golden": ((235, 185, 40),),
    "yellow": ((250, 225, 50),),
    "green": ((40, 170, 70),),
    "emerald": ((20, 160, 100),),
    "forest": ((15, 70, 30), (60, 130, 50)),
    "jungle": ((20, 100, 40), (110, 170, 50)),
    "grass": ((90, 170, 50),),
    "leaf": ((70, 150, 40),),
    "leaves": ((70, 150, 40),),
    "teal": ((0, 130, 130),),
    "cyan": ((0, 200, 220),),
    "turquoise": ((40, 205, 195),),
    "aqua": ((40, 210, 220),),
    "blue": ((25, 70, 215),),
    "azure": ((40, 130, 240),),
    "sky": ((110, 170, 240),),
    "ocean": ((0, 50, 120), (0, 120, 180)),
    "sea": ((0, 70, 140), (20, 140, 190)),
    "water": ((20, 110, 190),),
    "navy": ((10, 20, 90),),
    "purple": ((115, 35, 170),),
    "violet": ((140, 70, 210),),
    "lavender": ((180, 150, 230),),
    "magenta": ((220, 30, 180),),
    "pink": ((245, 120, 180),),
    "rose": ((230, 80, 120),),
    "blossom": ((250, 190, 215),),
    "white": ((245, 245, 245),),
    "snow": ((235, 240, 250), (190, 205, 230)),
    "silver": ((190, 195, 205),),
    "grey": ((128, 128, 132),),
    "gray": ((128, 128, 132),),
    "fog": ((175, 180, 188),),
    "mist": ((175, 185, 195),),
    "black": ((8, 8, 10),),
    "dark": ((14, 14, 24),),
    "night": ((8, 12, 38), (35, 45, 100)),
    "midnight": ((8, 8, 35),),
    "neon": ((20, 5, 40), (255, 25, 200), (20, 235, 255)),
    "sunset": ((250, 135, 40), (225, 65, 100), (85, 35, 120)),
    "sunrise": ((250, 180, 90), (240, 120, 120), (120, 150, 210)),
    "dawn": ((250, 180, 90), (240, 120, 120), (120, 150, 210)),
    "fire": ((120, 10, 0), (230, 60, 10), (255, 190, 40)),
    "flame": ((120, 10, 0), (230, 60, 10), (255, 190, 40)),
    "lava": ((90, 5, 0), (220, 50, 0), (255, 160, 20)),
    "ice": ((200, 235, 250), (110, 180, 225)),
    "icy": ((200, 235, 250), (110, 180, 225)),
    "frozen": ((200, 235, 250), (110, 180, 225)),
    "desert": ((220, 180, 110), (185, 125, 65)),
    "sand": ((225, 195, 135),),
    "brown": ((115, 75, 40),),
    "earth": ((100, 70, 40),),
    "autumn": ((200, 90, 20), (140, 45, 20)),
    "space": ((4, 4, 18), (60, 20, 100), (195, 195, 255)),
    "galaxy": ((4, 4, 18), (90, 30, 130), (230, 170, 255)),
}
# Motion words: a prompt with more of one kind than the other moves slower or faster.
_CALM_WORDS = frozenset(
    [
        "calm",
        "slow",
        "still",
        "gentle",
        "quiet",
        "serene",
        "peaceful",
        "drift",
        "drifting",
        "lazy",
        "sleepy",
        "soft",
        "tranquil",
        "meditative",
    ]
)
_FAST_WORDS = frozenset(
    [
        "fast",
        "storm",
        "stormy",
        "chaos",
        "chaotic",
        "rush",
        "rushing",
        "racing",
        "wild",
        "frantic",
        "explosion",
        "exploding",
        "hyper",
        "energetic",
        "turbulent",
        "speed",
        "speeding",
        "frenzy",
    ]
)
_CALM_SPEED, _FAST_SPEED = 0.35, 2.6


def _words(prompt: str) -> list[str]:
    """Lower-case words of the prompt, with a trailing s or y dropped when only the stem is a colour word."""
    out = []
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word not in _COLOUR_WORDS and word[-1:] in ("s", "y") and word[:-1] in _COLOUR_WORDS:
            word = word[:-1]  # "flames" -> "flame", "snowy" -> "snow"
        out.append(word)
    return out


def _normalise(prompt: str) -> str:
    """The prompt as the look sees it: case and runs of whitespace do not change the picture."""
    return " ".join(prompt.lower().split())


class _Rng:
    """Uniform numbers drawn from a blake2b stream, stable across processes, platforms and versions."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("utf-8")
        self._buf = b""
        self._block = 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        """The next number in [lo, hi)."""
        if len(self._buf) < 8:
            self._buf += hashlib.blake2b(
                self._key, digest_size=64, person=b"promptcast-prev", salt=self._block.to_bytes(16, "little")
            ).digest()
            self._block += 1
        raw, self._buf = self._buf[:8], self._buf[8:]
        return lo + (hi - lo) * (int.from_bytes(raw, "little") / 2.0**64)


@dataclass(frozen=True)
class _Look:
    """Everything the field depends on besides time; blends linearly so transitions are smooth.

    The phase of motion term i at time t is `omega[i] * t + phase[i]`: affine in t, so a blend of two
    looks is again a look, which is what lets a switch start from whatever is on screen.
    """

    palette: np.ndarray  # [3, 3] float64 RGB in 0..255, dark to bright end of the field
    waves: np.ndarray  # [2, 2] wave vectors of the two plane-wave terms, radians per frame height
    ripple: float  # radial frequency of the ripple term
    centre: np.ndarray  # [2] ripple centre (x, y) in frame heights
    warp: float  # how strongly the second wave bends the first
    omega: np.ndarray  # [3] angular speeds, radians per second
    phase: np.ndarray  # [3] phases at t = 0

    def blend(self, other: _Look, w: float) -> _Look:
        """The look a fraction w of the way from self to other."""

        def mix(a, b):
            return a + (b - a) * w

        return _Look(
            palette=mix(self.palette, other.palette),
            waves=mix(self.waves, other.waves),
            ripple=mix(self.ripple, other.ripple),
            centre=mix(self.centre, other.centre),
            warp=mix(self.warp, other.warp),
            omega=mix(self.omega, other.omega),
            phase=mix(self.phase, other.phase),
        )

    def phases_near(self, other: _Look, t: float) -> _Look:
        """This look with each phase moved by whole turns to lie within half a turn of other's at t.

        The picture is the same, but interpolating towards it no longer sweeps through the many turns
        that separate the two phases late in a long stream.
        """
        gap = self.omega * t + self.phase - (other.omega * t + other.phase)
        return _Look(
            self.palette,
            self.waves,
            self.ripple,
            self.centre,
            self.warp,
            self.omega,
            self.phase - _TAU * np.round(gap / _TAU),
        )

    def rebased(self, t: float, turns: np.ndarray) -> _Look:
        """This look with its clock restarted at t: the same picture at t + t', phases less `turns`."""
        return replace(self, phase=self.omega * t + self.phase - turns)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (255.0 * r, 255.0 * g, 255.0 * b)


def _shifted(rgb: tuple[float, ...], dh: float, s_mul: float, v_mul: float) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    # A brighter companion of black or a dark grey would stay invisible without a floor.
    v = v * v_mul if v_mul <= 1.0 else max(v * v_mul, 0.35)
    return _hsv(h + dh, s * s_mul, v)


def _palette(words: list[str], rng: _Rng) -> np.ndarray:
    """Three colours from the prompt's colour words, filled in (or wholly picked) by the hash."""
    found: list[tuple[int, int, int]] = []
    for word in words:
        for colour in _COLOUR_WORDS.get(word, ()):
            if colour not in found:
                found.append(colour)
    found = found[:3]
    dh = rng.uniform(-0.06, 0.06)
    if len(found) == 3:
        colours = [tuple(float(c) for c in rgb) for rgb in found]
    elif len(found) == 2:
        colours = [_shifted(found[0], dh, 1.1, 0.35), *[tuple(float(c) for c in rgb) for rgb in found]]
    elif len(found) == 1:
        base = found[0]
        colours = [
            _shifted(base, dh, 1.1, 0.3),
            tuple(float(c) for c in base),
            _shifted(base, -dh, 0.7, 1.35),
        ]
    else:
        hue = rng.uniform()
        spread = (0.08, 0.5, 0.33)[int(rng.uniform(0, 3))]  # analogous, complementary or triadic
        colours = [
            _hsv(hue, rng.uniform(0.6, 0.9), rng.uniform(0.15, 0.3)),
            _hsv(hue + spread * 0.5, rng.uniform(0.6, 0.85), rng.uniform(0.65, 0.85)),
            _hsv(hue + spread, rng.uniform(0.35, 0.6), rng.uniform(0.9, 1.0)),
        ]
    return np.array(colours, dtype=np.float64)


def _look(prompt: str, seed: int) -> _Look:
    """The look for a prompt and seed: palette and motion from the prompt, motion phases from the seed."""
    words = _words(prompt)
    rng = _Rng("prompt:" + _normalise(prompt))
    palette = _palette(words, rng)
    calm = sum(w in _CALM_WORDS for w in words)
    fast = sum(w in _FAST_WORDS for w in words)
    speed = _CALM_SPEED if calm > fast else _FAST_SPEED if fast > calm else 1.0
    speed *= rng.uniform(0.85, 1.15)
    angles = [rng.uniform(0.0, _TAU), rng.uniform(0.0, _TAU)]
    norms = [rng.uniform(4.0, 8.0), rng.uniform(5.0, 10.0)]
    waves = np.array([[n * math.cos(a), n * math.sin(a)] for n, a in zip(norms, angles, strict=True)])
    ripple = rng.uniform(6.0, 13.0)
    centre = np.array([rng.uniform(0.3, 1.3), rng.uniform(0.2, 0.8)])
    warp = rng.uniform(0.8, 1.6) * (1.3 if fast > calm else 0.8 if calm > fast else 1.0)
    omega = np.array([speed * rng.uniform(0.6, 1.2) * (1 if rng.uniform() < 0.5 else -1) for _ in range(3)])
    prompt_phase = np.array([rng.uniform(0.0, _TAU) for _ in range(3)])
    seed_rng = _Rng(f"seed:{seed}")
    seed_phase = np.array([seed_rng.uniform(0.0, _TAU) for _ in range(3)])
    return _Look(palette, waves, ripple, centre, warp, omega, (prompt_phase + seed_phase) % _TAU)


def _ease(x: float) -> float:
    """Smoothstep: starts and ends at rest, so neither end of a transition shows a kink in the motion."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


class _Caption:
    """A caption layer: premultiplied colour and coverage as float32, placed at (top, left) in the frame."""

    __slots__ = ("alpha", "keep", "left", "premul", "premul_round", "top")

    def __init__(self, premul: np.ndarray, alpha: np.ndarray, top: int, left: int) -> None:
        self.premul = premul  # [h, w, 3] colour times alpha, 0..255
        self.alpha = alpha  # [h, w, 1] 0..1
        self.top = top
        self.left = left
        # Per-frame compositing runs on [h, w * 3] rows with nothing broadcast: numpy's inner loops are
        # then long and vectorised, several times faster than broadcasting [h, w, 1] over 3 channels.
        h, w = alpha.shape[:2]
        self.keep = np.ascontiguousarray(np.broadcast_to(1.0 - alpha, (h, w, 3))).reshape(h, w * 3)
        self.premul_round = (premul + np.float32(0.5)).reshape(h, w * 3)  # +0.5: the uint8 cast rounds

    def weighted(self, w: float) -> _Caption:
        """This layer with its opacity scaled by w."""
        return _Caption(self.premul * np.float32(w), self.alpha * np.float32(w), self.top, self.left)

    def over(self, under: _Caption) -> _Caption:
        """This layer composited over `under`, as one layer covering both."""
        top, left = min(self.top, under.top), min(self.left, under.left)
        bottom = max(self.top + self.alpha.shape[0], under.top + under.alpha.shape[0])
        right = max(self.left + self.alpha.shape[1], under.left + under.alpha.shape[1])
        premul = np.zeros((bottom - top, right - left, 3), np.float32)
        alpha = np.zeros((bottom - top, right - left, 1), np.float32)
        for layer in (under, self):
            ys = slice(layer.top - top, layer.top - top + layer.alpha.shape[0])
            xs = slice(layer.left - left, layer.left - left + layer.alpha.shape[1])
            keep = 1.0 - layer.alpha
            premul[ys, xs] = premul[ys, xs] * keep + layer.premul
            alpha[ys, xs] = alpha[ys, xs] * keep + layer.alpha
        return _Caption(premul, alpha, top, left)

    def composite(self, frame: np.ndarray, scratch: np.ndarray, w: float = 1.0) -> None:
        """Draw this layer, its opacity scaled by w, onto a contiguous uint8 [H, W, 3] frame in place."""
        h, wd = self.alpha.shape[:2]
        rows = frame.reshape(frame.shape[0], -1)
        region = rows[self.top : self.top + h, 3 * self.left : 3 * (self.left + wd)]
        out = scratch[: h * wd * 3].reshape(h, wd * 3)
        np.multiply(region, self.keep, out=out)
        out += self.premul_round
        if w < 1.0:
            # Fading is a lerp from the bare frame to the fully captioned one, which needs no copy of
            # the layer scaled by w.
            out -= region
            out *= np.float32(w)
            out += region
        region[...] = out


def _fit(text: str, font, max_width: float, suffix: str = "") -> int:
    """Length of the longest prefix of text that, with suffix, is at most max_width wide."""
    lo, hi = 0, len(text)
    while lo < hi:  # bisect: each measurement is a FreeType layout, so keep them few
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + suffix) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _wrap(text: str, font, max_width: float, max_lines: int = 2) -> list[str]:
    """Greedy word wrap to at most max_lines lines, ending in an ellipsis when text is cut."""
    words = text.split()
    # Laying out a string costs about its length, so lines are planned from word widths and each
    # finished line is measured once (kerning across a space can make the sum a pixel off).
    space = font.getlength(" ")
    lines: list[str] = []
    i = 0
    while i < len(words) and len(lines) < max_lines:
        first = words[i]
        if font.getlength(first) > max_width:
            # A single word wider than the frame: break it, carrying the rest to the next line.
            cut = max(1, _fit(first, font, max_width))
            if cut < len(first):
                words[i : i + 1] = [first[:cut], first[cut:]]
        end, width = i + 1, font.getlength(words[i])
        while end < len(words) and width + space + (w := font.getlength(words[end])) <= max_width:
            width += space + w
            end += 1
        while end > i + 1 and font.getlength(" ".join(words[i:end])) > max_width:
            end -= 1
        lines.append(" ".join(words[i:end]))
        i = end
    if i < len(words):
        last = lines[-1]
        lines[-1] = last[: _fit(last, font, max_width, "…")].rstrip() + "…"
    return lines


class PreviewEngine:
    """A CPU engine drawing a prompt-coloured, prompt-paced moving field with the prompt as a caption."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: float = 16.0,
        first_block_frames: int = 9,
        block_frames: int = 12,
        transition_frames: int | None = None,
        caption: bool = True,
    ) -> None:
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2:
                raise ValueError(f"{name} must be a positive even integer (H.264 4:2:0), got {value!r}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        if transition_frames is None:
            transition_frames = block_frames
        for name, value in (
            ("first_block_frames", first_block_frames),
            ("block_frames", block_frames),
            ("transition_frames", transition_frames),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        self.width = width
        self.height = height
        self.fps = float(fps)
        self.first_block_frames = first_block_frames
        self.block_frames = block_frames
        self.transition_frames = transition_frames
        self.caption = caption  # False: no text on the picture (an OBS overlay shows the prompt instead)

        # Coarse grid: frame coordinates in units of frame height, so the picture does not depend on size.
        self._lw = -(-width // _DOWNSCALE)
        self._lh = -(-height // _DOWNSCALE)
        self._xs = ((np.arange(self._lw) + 0.5) * _DOWNSCALE / height).astype(np.float32)
        self._ys = ((np.arange(self._lh) + 0.5) * _DOWNSCALE / height).astype(np.float32)
        dx = (self._xs - self._xs.mean()) / (self._xs[-1] - self._xs[0] + 1e-6)
        dy = (self._ys - self._ys.mean()) / (self._ys[-1] - self._ys[0] + 1e-6)
        self._vignette = (1.0 - 0.9 * np.add.outer(dy * dy, dx * dx)).astype(np.float32)
        self._small = np.empty((self._lh, self._lw, 3), np.float32)
        # Bilinear weights with pixel centres aligned: output pixel x samples coarse x' = (x + 0.5) / f - 0.5.
        src = (np.arange(width) + 0.5) / _DOWNSCALE - 0.5
        col0 = np.clip(np.floor(src), 0, self._lw - 1).astype(np.intp)
        col1 = np.minimum(col0 + 1, self._lw - 1)
        colw = np.where(src < 0, 0.0, src - np.floor(src))
        self._col0 = (col0[:, None] * 3 + np.arange(3)).ravel()
        self._col1 = (col1[:, None] * 3 + np.arange(3)).ravel()
        self._colw = np.repeat(colw, 3).astype(np.float32)
        # Coarse rows after the horizontal pass, padded with a copy of the edge row at each end.
        self._rows = np.empty((self._lh + 2, width * 3), np.float32)
        self._step = np.empty((self._lh + 1, width * 3), np.float32)
        self._tmp = np.empty((self._lh, width * 3), np.float32)
        self._work = [np.empty((self._lh, self._lw), np.float32) for _ in range(4)]
        self._scratch = np.empty(height * width * 3, np.float32)  # caption compositing; fits any caption
        self._row_phases = []
        for k in range(_DOWNSCALE):
            offset = (k + 0.5) / _DOWNSCALE - 0.5
            base = math.floor(offset)
            self._row_phases.append((base + 1, np.float32(offset - base)))
        self._font = ImageFont.load_default(size=max(8, round(height * 0.05)))
        self._captions: dict[str, _Caption | None] = {}
        self.reanchors = 0
        self._clear()

    # -- Engine protocol ---------------------------------------------------------------------------

    def start(self, prompt: str, seed: int) -> None:
        """Begin a new stream following `prompt`, deterministic for `seed`."""
        self._clear()
        self._seed = int(seed)
        self._prompt = prompt
        self._to = _look(prompt, self._seed)
        self._to_caption = self._caption(prompt)
        self._started = True

    def next_block(self) -> np.ndarray:
        """Generate the next block: uint8 RGB frames shaped [T, height, width, 3]."""
        if not self._started:
            raise RuntimeError("PreviewEngine.next_block() called before start(prompt, seed)")
        if self._pending is not None:
            self._begin_transition(self._pending)
            self._pending = None
        if self._pending_reanchor:
            self._pending_reanchor = False
            self._rebase()
        count = self.first_block_frames if self._frame == 0 else self.block_frames
        block = np.empty((count, self.height, self.width, 3), np.uint8)
        for i in range(count):
            self._render(self._frame + i, block[i])
        self._frame += count
        if self._from is not None and self._frame >= self._end:
            self._from = self._from_caption = None
        return block

    def switch_prompt(self, prompt: str) -> None:
        """Follow `prompt` from the next block on, without a cut."""
        if not self._started:
            raise RuntimeError("PreviewEngine.switch_prompt() called before start(prompt, seed)")
        self._pending = prompt

    def reanchor(self) -> None:
        """Restart the motion clock at the next block, without a cut (LongLive: renew the attention sink).

        The preview has no attention sink; what it has is a clock whose phase arguments grow all
        stream long. Re-anchoring folds the elapsed motion into the phases and counts time from
        the current frame again, the analogue of LongLive's positions returning near 0: the
        picture continues exactly. It keeps the re-anchor path (API, schedule, counters) testable
        on any machine.
        """
        if not self._started:
            raise RuntimeError("PreviewEngine.reanchor() called before start(prompt, seed)")
        self._pending_reanchor = True

    def reset(self) -> None:
        """Drop all stream state; `start` must be called before the next block."""
        self._clear()

    # -- extras ------------------------------------------------------------------------------------

    def prepare_prompt(self, prompt: str) -> None:
        """Draw a likely next prompt's caption now, so the switch to it costs no drawing."""
        self._caption(prompt)

    @property
    def prompt(self) -> str | None:
        """The prompt being followed (or switched to), None before start."""
        return self._pending if self._pending is not None else self._prompt

    @property
    def frame_index(self) -> int:
        """Index of the next frame to be generated since start."""
        return self._frame

    # -- internals ---------------------------------------------------------------------------------

    def _clear(self) -> None:
        self._started = False
        self._seed = 0
        self._prompt: str | None = None
        self._pending: str | None = None
        self._frame = 0
        self._origin = 0  # the frame the motion clock counts from (moved by reanchor)
        self._pending_reanchor = False
        self._to: _Look | None = None
        self._to_caption: _Caption | None = None
        # While a transition runs: the look and caption on screen when it began, and its frame span.
        self._from: _Look | None = None
        self._from_caption: _Caption | None = None
        self._begin = self._end = 0

    def _rebase(self) -> None:
        """Move the clock's origin to the next frame; the look (and a running blend) stays the same."""
        n = self._frame
        if n == 0:
            return  # nothing shown yet: the clock is already fresh
        t = (n - self._origin) / self.fps
        # Both ends of a running transition drop the same whole turns, so their blend is unchanged.
        turns = _TAU * np.floor((self._to.omega * t + self._to.phase) / _TAU)
        self._to = self._to.rebased(t, turns)
        if self._from is not None:
            self._from = self._from.rebased(t, turns)
        self._origin = n
        self.reanchors += 1

    def _look_on_clock(self, prompt: str) -> _Look:
        """The prompt's look with phases for the current clock, so re-anchors never change the video."""
        look = _look(prompt, self._seed)
        t0 = self._origin / self.fps
        return look.rebased(t0, _TAU * np.floor((look.omega * t0 + look.phase) / _TAU))

    def _weight(self, n: int) -> float:
        """How far frame n is through the running transition; the first frame already moves."""
        return _ease((n - self._begin + 1) / self.transition_frames)

    def _begin_transition(self, prompt: str) -> None:
        if prompt == self._prompt:
            return  # already on (or heading to) it; restarting would dim the caption for nothing
        n = self._frame
        if n == 0:
            self.start(prompt, self._seed)  # nothing shown yet, so there is nothing to blend from
            return
        last = n - 1  # the frame now on screen: the new transition starts from exactly that
        if self._from is not None and self._weight(last) < 1.0:
            w = self._weight(last)
            shown = self._from.blend(self._to, w)
            layers = []
            if self._from_caption is not None:
                layers.append(self._from_caption.weighted(1.0 - w))
            if self._to_caption is not None:
                layers.append(self._to_caption.weighted(w))
            shown_caption = layers[-1].over(layers[0]) if len(layers) == 2 else next(iter(layers), None)
        else:
            shown, shown_caption = self._to, self._to_caption
        t = (n - self._origin) / self.fps
        self._prompt = prompt
        self._to = self._look_on_clock(prompt)
        self._to_caption = self._caption(prompt)
        self._from = shown.phases_near(self._to, t)
        self._from_caption = shown_caption
        self._begin, self._end = n, n + self.transition_frames

    def _render(self, n: int, out: np.ndarray) -> None:
        """Draw frame n of the stream into out (uint8 [height, width, 3])."""
        w = self._weight(n) if self._from is not None else 1.0
        look = self._to if w >= 1.0 else self._from.blend(self._to, w)
        self._field(look, (n - self._origin) / self.fps, out)
        if w >= 1.0:
            if self._to_caption is not None:
                self._to_caption.composite(out, self._scratch)
            return
        if self._from_caption is not None:
            self._from_caption.composite(out, self._scratch, 1.0 - w)
        if self._to_caption is not None:
            self._to_caption.composite(out, self._scratch, w)

    def _field(self, look: _Look, t: float, out: np.ndarray) -> None:
        """The coloured field of `look` at time t, upscaled into out."""
        # Phases are reduced in float64 so hours into a stream float32 still resolves the motion.
        p1, p2, p3 = (np.float32(v) for v in (look.omega * t + look.phase) % _TAU)
        (k1x, k1y), (k2x, k2y) = (map(np.float32, row) for row in look.waves)
        cx, cy = (np.float32(v) for v in look.centre)
        xs, ys = self._xs, self._ys
        # All work goes to preallocated buffers: fresh multi-MB temporaries page-fault every frame,
        # which on a small VM costs more than the arithmetic.
        wave2, wave1, ripple, tmp = self._work
        np.add.outer(k2y * ys, k2x * xs + p2, out=wave2)
        np.sin(wave2, out=wave2)
        np.add.outer(k1y * ys, k1x * xs + p1, out=wave1)
        np.multiply(wave2, np.float32(look.warp), out=tmp)
        wave1 += tmp
        np.sin(wave1, out=wave1)
        np.add.outer((ys - cy) ** 2, (xs - cx) ** 2, out=ripple)
        np.sqrt(ripple, out=ripple)
        ripple *= np.float32(look.ripple)
        ripple += p3
        np.multiply(wave1, np.float32(0.7), out=tmp)
        ripple += tmp
        np.sin(ripple, out=ripple)
        # u in -1..1 walks the palette dark -> mid -> bright; shade adds relief and a vignette.
        u = wave1
        u *= np.float32(0.55)
        ripple *= np.float32(0.45)
        u += ripple
        lo = np.add(u, np.float32(1.0), out=ripple)
        np.clip(lo, 0.0, 1.0, out=lo)
        hi = np.clip(u, 0.0, 1.0, out=u)
        shade = wave2
        shade *= np.float32(0.12)
        shade += np.float32(0.88)
        shade *= self._vignette
        lo *= shade
        hi *= shade
        small = self._small
        c0, c1, c2 = look.palette.astype(np.float32)
        # One channel at a time: scalar-times-plane loops vectorise; [h, w, 1] x [3] broadcasts do not.
        for c in range(3):
            np.multiply(lo, c1[c] - c0[c], out=tmp)
            small[..., c] = tmp
            np.multiply(hi, c2[c] - c1[c], out=tmp)
            small[..., c] += tmp
            np.multiply(shade, c0[c], out=tmp)
            tmp += np.float32(0.5)  # interpolation keeps the offset, so the final uint8 cast rounds
            small[..., c] += tmp
        self._upscale(small, out)

    def _upscale(self, small: np.ndarray, out: np.ndarray) -> None:
        """Bilinear upscale of the coarse float32 image into the uint8 frame (pixel centres aligned)."""
        # Rows first: gather both neighbours of every output byte, so the loops run over whole rows.
        # (mode="clip" lets take write into `out` without an intermediate copy.)
        flat = small.reshape(self._lh, self._lw * 3)
        rows, step, tmp = self._rows, self._step, self._tmp
        inner = rows[1:-1]
        np.take(flat, self._col0, axis=1, out=inner, mode="clip")
        np.take(flat, self._col1, axis=1, out=tmp, mode="clip")
        tmp -= inner
        tmp *= self._colw
        inner += tmp
        rows[0], rows[-1] = rows[1], rows[-2]  # edge rows repeat, as the columns' do
        # Then columns: every f-th output row sits at the same fraction between two coarse rows, so each
        # phase is one multiply-add over the coarse image, written straight into the frame's rows.
        np.subtract(rows[1:], rows[:-1], out=step)
        frame = out.reshape(self.height, self.width * 3)
        for k, (base, w) in enumerate(self._row_phases):
            dst = frame[k::_DOWNSCALE]
            np.multiply(step[base : base + self._lh], w, out=tmp)
            tmp += rows[base : base + self._lh]
            dst[...] = tmp[: dst.shape[0]]

    def _caption(self, prompt: str) -> _Caption | None:
        """The caption layer for prompt, drawn once with Pillow and cached per prompt text."""
        text = " ".join(prompt.split()) if self.caption else ""
        if text in self._captions:
            return self._captions[text]
        layer = self._draw_caption(text) if text else None
        if len(self._captions) >= 8:  # a two-line caption at 832x480 holds a few MB of float32
            self._captions.clear()
        self._captions[text] = layer
        return layer

    def _draw_caption(self, text: str) -> _Caption | None:
        font = self._font
        size = getattr(font, "size", 11)
        pad = max(2, round(size * 0.45))
        margin = max(2, round(self.height * 0.04))
        line_h = round(size * 1.25)
        max_width = self.width - 2 * margin - 2 * pad
        if max_width < 2 * size or line_h + 2 * pad > self.height:
            return None  # a thumbnail-sized frame has no room for legible text
        lines = _wrap(text, font, max_width)
        text_w = max(math.ceil(font.getlength(line)) for line in lines)
        box_w = min(self.width - 2 * margin, text_w + 2 * pad)
        box_h = len(lines) * line_h + 2 * pad
        left = (self.width - box_w) // 2
        top = max(0, self.height - margin - box_h)
        # Pillow draws only coverage masks (the box once, the text once); the shadow is the text mask
        # shifted, and the layers are combined with numpy, which is cheaper than RGBA compositing.
        box = Image.new("L", (box_w, box_h), 0)
        ImageDraw.Draw(box).rounded_rectangle((0, 0, box_w - 1, box_h - 1), radius=pad, fill=150)
        ink = Image.new("L", (box_w, box_h), 0)
        draw = ImageDraw.Draw(ink)
        for i, line in enumerate(lines):
            draw.text(((box_w - font.getlength(line)) / 2, pad + i * line_h), line, font=font, fill=255)
        a_box = np.asarray(box, dtype=np.float32) / np.float32(255.0)
        a_ink = np.asarray(ink, dtype=np.float32) / np.float32(255.0)
        offset = max(1, round(size / 14))
        a_shadow = np.zeros_like(a_ink)
        a_shadow[offset:, offset:] = a_ink[:-offset, :-offset] * np.float32(0.9)
        # White ink over a black shadow over a black box: only the ink adds colour.
        alpha = 1.0 - (1.0 - a_box) * (1.0 - a_shadow) * (1.0 - a_ink)
        # A frame too small for the box gets the part of it that fits.
        alpha = alpha[: self.height - top, : self.width - left, None]
        premul = np.repeat(
            a_ink[: self.height - top, : self.width - left, None] * np.float32(255.0), 3, axis=2
        )
        return _Caption(premul, alpha, top, left)
