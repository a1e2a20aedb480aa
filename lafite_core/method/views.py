"""Views of the aggregated backbone features: a choice of levels and local neighbourhood averaging.

The store keeps one raw feature tensor per image (every level resized to S x S and concatenated,
eq. 1). A view picks some of those levels (their channel blocks) and averages each patch with its
k x k neighbourhood, as PatchCore's "locally aware patch features" do (k = 3 there).

PatchCore averages at each level's own resolution, before the levels are brought to one grid: on a
224 px input the stride-16 level is 14 x 14, so its 3 x 3 neighbourhood spans 3/14 of the image,
twice the span of the stride-8 level's. With ``aggregate_at="native"`` the view reproduces that on
the stored S x S maps: level l is averaged over the odd window nearest to k * S / n_l stored cells,
n_l being the level's native grid (input size / stride). On magnetic_tile this matched aggregating
the native maps within 0.6 AUROC points, where averaging 3 x 3 stored cells lost 2-3.

LafitE and the PatchCore baseline each look through their own view of the same stored features, so
neither needs its own extraction.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from lafite_core.config import ViewConfig


def view_channels(channels: Sequence[int], levels: Sequence[int] | None) -> list[int]:
    """Channel indices of the selected levels, in order; all channels when ``levels`` is None."""
    bounds = _bounds(channels)
    if levels is None:
        return list(range(bounds[-1]))
    _check_levels(channels, levels)
    return [i for lv in levels for i in range(bounds[lv], bounds[lv + 1])]


def native_grids(backbone: dict, image_size: int) -> tuple[int, ...] | None:
    """Each stored level's native grid side (input size / stride) from a backbone card, or None
    when the card predates recording the strides."""
    reductions = backbone.get("reductions")
    return tuple(math.ceil(image_size / int(r)) for r in reductions) if reductions else None


def level_window(k: int, stored: int, native: int) -> int:
    """The odd window on a level resized from ``native`` to ``stored`` cells that spans k native cells."""
    return max(1, 2 * round((k * stored / native - 1) / 2) + 1)


def apply_view(raw: torch.Tensor, view: ViewConfig, channels: Sequence[int] | None,
               grids: Sequence[int] | None = None) -> torch.Tensor:
    """Raw features [N, D, h, w] -> [N, D', h, w] (selected levels, k x k average, same dtype).

    ``channels`` are the backbone's per-level channel counts and ``grids`` their native grid sides
    (:func:`native_grids`; needed only for ``aggregate_at="native"``). ``channels`` may be None
    only for the identity view (all levels, k = 1).
    """
    k = view.local_aggregation
    per_level = k > 1 and view.aggregate_at == "native"
    if view.levels is None and not per_level:
        return _average(raw, k)
    if channels is None:
        raise ValueError("selecting feature levels or averaging per level needs the backbone's channel counts")
    if sum(channels) != raw.shape[1]:
        raise ValueError(f"features have {raw.shape[1]} channels, the backbone's levels {list(channels)} "
                         f"add up to {sum(channels)}")
    levels = list(range(len(channels))) if view.levels is None else list(view.levels)
    if not per_level:
        return _average(raw[:, view_channels(channels, levels)], k)
    _check_levels(channels, levels)
    if grids is None or len(grids) != len(channels):
        raise ValueError("aggregate_at='native' needs each level's native grid (the backbone card's strides); "
                         "this model's card does not record them: retrain it, or use aggregate_at='stored'")
    bounds = _bounds(channels)
    size = raw.shape[-1]
    blocks = [_average(raw[:, bounds[lv]:bounds[lv + 1]], level_window(k, size, int(grids[lv]))) for lv in levels]
    return torch.cat(blocks, dim=1)


def view_dim(view: ViewConfig, channels: Sequence[int]) -> int:
    """D' of :func:`apply_view` for a backbone with per-level ``channels``."""
    return len(view_channels(channels, view.levels))


def _average(x: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 1:
        return x
    return F.avg_pool2d(x, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)


def _bounds(channels: Sequence[int]) -> list[int]:
    bounds = [0]
    for c in channels:
        bounds.append(bounds[-1] + int(c))
    return bounds


def _check_levels(channels: Sequence[int], levels: Sequence[int]) -> None:
    bad = [lv for lv in levels if not 0 <= lv < len(channels)]
    if bad:
        raise ValueError(f"feature levels {bad} do not exist: the backbone gives {len(channels)} levels")
