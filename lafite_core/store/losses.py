"""The training loss curve as a file (``losses.pt``): per-epoch mean losses, a float64 torch tensor [E]."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch


def losses_bytes(losses: Sequence[float]) -> bytes:
    """Per-epoch losses [E] -> the bytes of ``losses.pt``."""
    buf = io.BytesIO()
    torch.save(torch.tensor(list(losses), dtype=torch.float64), buf)
    return buf.getvalue()


def read_losses(data: bytes) -> np.ndarray:
    """The bytes of ``losses.pt`` -> float64 [E] (loaded with weights_only: no pickled code runs)."""
    t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        raise ValueError("losses.pt must hold a 1-d tensor of per-epoch losses")
    return t.to(torch.float64).numpy()
