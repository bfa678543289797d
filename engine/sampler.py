"""Few-step flow-matching sampler of LongLive (engine-spec §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplerConfig:
    """Denoising schedule; the defaults are LongLive 1.0's."""

    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    warp: bool = True
    shift: float = 5.0
    context_noise: float = 0.0
    num_train_timesteps: int = 1000


class FlowMatchSchedule:
    """Shifted sigma grid of 1000 steps; sigma(t) is looked up at the nearest grid timestep."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        n = num_train_timesteps
        # float32 like the reference: linspace(1, 0, n + 1)[:n], then the shift
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:n]
        self.sigmas = shift * base / (1 + (shift - 1) * base)
        self.timesteps = self.sigmas * n
        self.num_train_timesteps = n

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """sigma at the grid timestep nearest to each given timestep."""
        timesteps = self.timesteps.to(timestep.device)
        index = torch.argmin((timesteps.unsqueeze(0) - timestep.reshape(-1, 1).to(timesteps.dtype)).abs(), 1)
        return self.sigmas.to(timestep.device)[index]

    def step_timesteps(self, steps: tuple[int, ...], warp: bool) -> torch.Tensor:
        """The timesteps fed to the model: warped through the grid (1000, 937.5, 833.33, 625), as float32."""
        if not warp:
            return torch.tensor(steps, dtype=torch.float32)
        grid = torch.cat([self.timesteps, torch.zeros(1)])
        return grid[torch.tensor([self.num_train_timesteps - s for s in steps])]

    def flow_to_x0(self, flow: torch.Tensor, xt: torch.Tensor, timestep: float) -> torch.Tensor:
        """x0 = x_t - sigma_t * v, in float64 as the reference does."""
        sigma = self.sigma(torch.tensor([timestep], dtype=torch.float64)).double().to(xt.device)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps."""
        sigma = self.sigma(torch.tensor([timestep])).to(x0.device, torch.float32)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)
