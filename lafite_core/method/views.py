"""Views of the aggregated backbone features: a choice of levels and local neighbourhood averaging.

The store keeps one raw feature tensor per image (every level, eq. 1). A view picks some of those
levels (their channel blocks) and averages each patch with its k x k neighbourhood, as PatchCore's
"locally aware patch features" do (k = 3 there). LafitE and the PatchCore baseline each look
through their own view of the same stored features, so neither needs its own extraction.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lafite_core.config import ViewConfig


def view_channels(channels: Sequence[int], levels: Sequence[int] | None) -> list[int]:
    """Channel indices of the selected levels, in order; all channels when ``levels`` is None."""
    bounds = [0]
    for c in channels:
        bounds.append(bounds[-1] + int(c))
    if levels is None:
        return list(range(bounds[-1]))
    bad = [lv for lv in levels if not 0 <= lv < len(channels)]
    if bad:
        raise ValueError(f"feature levels {bad} do not exist: the backbone gives {len(channels)} levels")
    return [i for lv in levels for i in range(bounds[lv], bounds[lv + 1])]


def apply_view(raw: torch.Tensor, view: ViewConfig, channels: Sequence[int] | None) -> torch.Tensor:
    """Raw features [N, D, h, w] -> [N, D', h, w] (selected levels, k x k average, same dtype).

    ``channels`` are the backbone's per-level channel counts (the model card records them); they may
    be None only for the identity view (all levels, k = 1).
    """
    x = raw
    if view.levels is not None:
        if channels is None:
            raise ValueError("selecting feature levels needs the backbone's channel counts")
        if sum(channels) != raw.shape[1]:
            raise ValueError(f"features have {raw.shape[1]} channels, the backbone's levels {list(channels)} "
                             f"add up to {sum(channels)}")
        x = x[:, view_channels(channels, view.levels)]
    k = view.local_aggregation
    if k > 1:
        x = F.avg_pool2d(x, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
    return x


def view_dim(view: ViewConfig, channels: Sequence[int]) -> int:
    """D' of :func:`apply_view` for a backbone with per-level ``channels``."""
    return len(view_channels(channels, view.levels))
