"""Heat-map overlays: an anomaly map blended over its image as a PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A perceptually ordered blue -> cyan -> yellow -> red ramp (5 anchors, linearly interpolated).
_ANCHORS = np.array([[0, 0, 128], [0, 160, 255], [80, 255, 160], [255, 220, 0], [220, 0, 0]], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """values [H, W] in [0, 1] -> RGB uint8 [H, W, 3]."""
    v = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).astype(np.uint8)


def overlay_png(image: np.ndarray, amap: np.ndarray, low: float, high: float, alpha: float = 0.45) -> bytes:
    """image uint8 [S, S, 3], anomaly map [S, S] scaled so ``low``->0 and ``high``->1 -> PNG bytes."""
    span = max(high - low, 1e-12)
    heat = colorize((amap - low) / span).astype(np.float64)
    blended = (1 - alpha) * image.astype(np.float64) + alpha * heat
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
