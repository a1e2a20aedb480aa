"""Per-channel feature normalisation with statistics computed on training features and saved.

Feature space is not image space: instead of an implicit [-1, 1] range, every channel is shifted
and scaled to zero mean and unit variance over all training patches, which matches the unit
variance of the diffusion noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FeatureStats:
    """mean, std: [D] float32."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: torch.Tensor | np.ndarray, min_std: float = 1e-6) -> "FeatureStats":
        """Statistics over all patches of ``features`` [N, D, H, W], accumulated in float64."""
        x = torch.as_tensor(features)
        if x.ndim != 4 or x.shape[0] == 0:
            raise ValueError(f"expected non-empty features [N, D, H, W], got shape {tuple(x.shape)}")
        d = x.shape[1]
        total = torch.zeros(d, dtype=torch.float64)
        total_sq = torch.zeros(d, dtype=torch.float64)
        for chunk in x.split(256):
            c = chunk.to(torch.float64)
            total += c.sum(dim=(0, 2, 3))
            total_sq += (c * c).sum(dim=(0, 2, 3))
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / n
        var = (total_sq / n - mean * mean).clamp_min(0)
        std = var.sqrt().clamp_min(min_std)
        return cls(mean.float().numpy(), std.float().numpy())

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """[N, D, H, W] -> normalised [N, D, H, W] (same dtype and device)."""
        mean = torch.as_tensor(self.mean, device=features.device, dtype=features.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, device=features.device, dtype=features.dtype).view(1, -1, 1, 1)
        return (features - mean) / std

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, std=self.std)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FeatureStats":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["mean"].astype(np.float32), z["std"].astype(np.float32))
