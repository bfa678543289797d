"""UniPC multistep sampler for flow matching, as LongLive 2.0 uses it per block (docs/engine-longlive2.md).

The reference builds a fresh `FlowUniPCMultistepScheduler(shift=1)` per block and calls
`set_timesteps(4, shift=5)`: 2nd-order UniP predictor + UniC corrector ("bh2", predicting
x0), lower order on the final step, final sigma 0. It draws no noise, so a block is a
deterministic function of its initial noise. This is the same algorithm, written for the one
configuration 2.0 uses (any order; coefficients computed once, on the host, in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class UniPCConfig:
    """The 2.0 defaults: 4 steps, shift 5, order 2."""

    steps: int = 4
    shift: float = 5.0
    order: int = 2
    num_train_timesteps: int = 1000


def schedule(cfg: UniPCConfig) -> tuple[list[float], list[int]]:
    """(sigmas incl. the final 0, as float32 values; integer timesteps fed to the DiT)."""
    n = cfg.num_train_timesteps
    # The scheduler's training grid without shift: sigma_max = 1 - 1/n stored in float32, sigma_min = 0.
    sigma_max = float(np.float32(1.0 - 1.0 / n))
    base = np.linspace(sigma_max, 0.0, cfg.steps + 1)[:-1]
    shifted = cfg.shift * base / (1 + (cfg.shift - 1) * base)
    timesteps = [int(t) for t in (shifted * n).astype(np.int64)]
    sigmas = [float(s) for s in np.concatenate([shifted, [0.0]]).astype(np.float32)]
    return sigmas, timesteps


def _lambda(sigma: float) -> float:
    """log-SNR of the flow-matching path x_t = (1 - sigma) x0 + sigma eps."""
    return math.log(1.0 - sigma) - math.log(sigma)


def _coefficients(hh: float, order: int, rks: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's linear system (R, b) for B(h) = expm1(hh) ("bh2")."""
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(rows, dtype=np.float64), np.array(b, dtype=np.float64)


class UniPCBlock:
    """The sampler state of one block: call `step` once per timestep, in order."""

    def __init__(self, cfg: UniPCConfig, sigmas: list[float]):
        self.cfg = cfg
        self.sigmas = sigmas
        self.x0s: list[torch.Tensor] = []  # model outputs converted to x0, newest last
        self.last_sample: torch.Tensor | None = None
        self.order = 0  # the predictor order of the previous step (= the next corrector's order)

    def step(self, index: int, flow: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x at the next sigma, x0 prediction) from the flow prediction at step `index`."""
        sigma = self.sigmas[index]
        x0 = sample - sigma * flow
        if index > 0 and self.last_sample is not None:
            sample = self._correct(index, x0)
        self.x0s = ([*self.x0s, x0])[-self.cfg.order:]
        steps = len(self.sigmas) - 1
        self.order = min(self.cfg.order, steps - index, index + 1)
        self.last_sample = sample
        return self._predict(index, sample), x0

    def _differences(self, s0: float, t: float,
                     past: list[float]) -> tuple[float, list[float], list[torch.Tensor]]:
        """(-h, the ratios r_k, the scaled x0 differences D_k) for a step from sigma s0 to t.

        `past` are the sigmas of the older x0 predictions (newest first), self.x0s[-2], [-3], ...
        """
        lam_s0 = _lambda(s0)
        h = _lambda(t) - lam_s0
        m0 = self.x0s[-1]
        rks = [(_lambda(s) - lam_s0) / h for s in past]
        d1s = [(self.x0s[-(i + 2)] - m0) / rk for i, rk in enumerate(rks)]
        return -h, rks, d1s

    def _predict(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """UniP: multistep prediction from sigma[index] to sigma[index + 1]."""
        s0, t = self.sigmas[index], self.sigmas[index + 1]
        m0 = self.x0s[-1]
        if t == 0.0:
            if self.order != 1:
                raise ValueError("the final step to sigma 0 must be first order (lower_order_final)")
            return m0.clone()  # the limit h -> inf of the first-order update: x0 itself
        hh, rks, d1s = self._differences(s0, t, [self.sigmas[index - i] for i in range(1, self.order)])
        x_t = (t / s0) * x - ((1 - t) * math.expm1(hh)) * m0
        if d1s:
            rows, b = _coefficients(hh, self.order, [*rks, 1.0])
            rhos = [0.5] if self.order == 2 else list(np.linalg.solve(rows[:-1, :-1], b[:-1]))
            res = sum(float(r) * d for r, d in zip(rhos, d1s, strict=True))
            x_t = x_t - ((1 - t) * math.expm1(hh)) * res
        return x_t

    def _correct(self, index: int, x0_now: torch.Tensor) -> torch.Tensor:
        """UniC: correct the sample predicted at the previous step with this step's x0."""
        s0, t = self.sigmas[index - 1], self.sigmas[index]
        m0 = self.x0s[-1]
        hh, rks, d1s = self._differences(s0, t, [self.sigmas[index - 1 - i] for i in range(1, self.order)])
        rows, b = _coefficients(hh, self.order, [*rks, 1.0])
        rhos = [0.5] if self.order == 1 else [float(r) for r in np.linalg.solve(rows, b)]
        b_h = math.expm1(hh)
        x_t = (t / s0) * self.last_sample - ((1 - t) * b_h) * m0
        res = sum((r * d for r, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(m0))
        return x_t - ((1 - t) * b_h) * (res + rhos[-1] * (x0_now - m0))


class UniPC:
    """The per-block sampler factory: fixed sigmas/timesteps, fresh state per block."""

    def __init__(self, cfg: UniPCConfig | None = None):
        self.cfg = cfg or UniPCConfig()
        self.sigmas, self.timesteps = schedule(self.cfg)

    def block(self) -> UniPCBlock:
        """A fresh multistep state (the reference builds a new scheduler per block)."""
        return UniPCBlock(self.cfg, self.sigmas)
