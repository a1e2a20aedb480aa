"""DDIM sampler in feature space (eq. 7), kept apart from the network.

The sampler knows the schedule and the list of timesteps; the network is any callable
``eps_model(x_t [B, C, H, W], t [B] long) -> eps [B, C, H, W]``. Nothing is clipped or rescaled:
features are not images (they are normalised explicitly with saved statistics instead).

Eq. 7 as printed divides by alpha_bar_t; the standard DDIM form, used here, divides by
sqrt(alpha_bar_t):

    x0_hat   = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    sigma_t  = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
    x_prev   = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma_t^2) eps + sigma_t z
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from lafite_core.method.schedule import NoiseSchedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def gaussian_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` [B, ...].

    With a sequence of B generators, row b is drawn from generator b alone, so an image's noise does
    not depend on which batch it is scored in.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"need one generator per batch row: {len(generator)} for {x.shape[0]} rows")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator]).to(x.device)


class DDIMSampler:
    """DDIM reverse process from a corruption step ``tau`` down to the clean signal."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule = schedule
        self.eta = eta
        self.timesteps: list[int] = []

    def set_timesteps(self, num_steps: int, tau: int) -> list[int]:
        """Descending steps ``[tau, ..., >0]``, evenly spaced; the last one jumps to the clean signal.

        The previous timestep of a step is the next entry of this list (or -1, alpha_bar = 1, after
        the last), never a stride formula.
        """
        T = self.schedule.num_timesteps
        if not 0 <= tau < T:
            raise ValueError(f"tau must lie in [0, {T - 1}], got {tau}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps >= tau + 1:
            self.timesteps = list(range(tau, -1, -1))
        else:
            steps = np.linspace(tau, 0, num_steps + 1)[:-1]
            self.timesteps = sorted({int(round(s)) for s in steps}, reverse=True)
        return self.timesteps

    def prev_timestep(self, t: int) -> int:
        i = self.timesteps.index(t)
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def step(
        self,
        eps: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One reverse step x_t -> x_prev (eq. 7). eps, x_t: [B, C, H, W]."""
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(self.prev_timestep(t))
        x0_hat = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
        sigma = self.eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5
        direction = max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
        x_prev = ab_prev**0.5 * x0_hat + direction
        if sigma > 0:
            x_prev = x_prev + sigma * gaussian_like(x_t, generator)
        return x_prev

    @torch.no_grad()
    def reconstruct(
        self,
        eps_model: EpsModel,
        x_tau: torch.Tensor,
        tau: int,
        num_steps: int,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Denoise ``x_tau`` [B, C, H, W] from step ``tau`` to x_0 in ``num_steps`` DDIM steps."""
        self.set_timesteps(num_steps, tau)
        x = x_tau
        for t in self.timesteps:
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x = self.step(eps_model(x, t_batch), t, x, generator)
        return x
