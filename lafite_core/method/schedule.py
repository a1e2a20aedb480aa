"""Cosine noise schedule (Nichol & Dhariwal 2021), precomputed once in float64.

Symbols (paper section 3.2) and names here:

| paper            | code                     |
|------------------|--------------------------|
| beta_t           | ``betas[t]``             |
| alpha_t          | ``alphas[t]``            |
| alpha_bar_t      | ``alphas_cumprod[t]``    |
| T                | ``num_timesteps``        |

Timesteps are indexed 0..T-1; index t is the paper's step t+1, so ``alphas_cumprod[0]`` is
alpha_bar_1 and the clean signal x_0 corresponds to "index -1" with alpha_bar = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_MAX_BETA = 0.999


@dataclass(frozen=True)
class NoiseSchedule:
    """Precomputed schedule arrays, each of length T, float64."""

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at index ``t``; index -1 means the clean signal (alpha_bar = 1)."""
        if t == -1:
            return 1.0
        if not 0 <= t < self.num_timesteps:
            raise IndexError(f"timestep {t} outside [-1, {self.num_timesteps - 1}]")
        return float(self.alphas_cumprod[t])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``add_noise`` at timestep index ``t``: an int or a [B] tensor of indices; x0, noise: [B, ...]."""
        ab = torch.as_tensor(self.alphas_cumprod, device=x0.device)[torch.as_tensor(t, device=x0.device)]
        return add_noise(x0, noise, ab)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0) (eq. 3, 8, 11): sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.

    x0, noise: [B, ...]. ``alpha_bar`` is a float (square roots taken in float64, as Python floats)
    or a 0-d or [B] tensor (cast to x0's dtype first, square roots taken in that dtype; a [B] tensor is
    broadcast over the other dimensions).
    """
    if not isinstance(alpha_bar, torch.Tensor):
        return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise
    ab = alpha_bar.to(x0.dtype)
    if ab.ndim == 1:
        ab = ab.view(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008) -> NoiseSchedule:
    """Cosine schedule: alpha_bar(t) = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2.

    betas are clipped at 0.999 as in the reference implementation, so that the last step is not
    singular.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")

    def f(t: float) -> float:
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = np.array(
        [min(1 - f(i + 1) / f(i), _MAX_BETA) for i in range(num_timesteps)], dtype=np.float64
    )
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    assert np.all((betas > 0) & (betas < 1)), "betas must lie in (0, 1)"
    assert np.all(np.diff(alphas_cumprod) < 0), "alpha_bar must decrease strictly"
    assert 0.99 < alphas_cumprod[0] <= 1.0, "alpha_bar_1 must be close to 1"
    return NoiseSchedule(betas=betas, alphas=alphas, alphas_cumprod=alphas_cumprod)
