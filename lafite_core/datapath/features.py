"""The data path from files to aggregated features: read, decode, resize, backbone, aggregation.

Files are read and decoded on a thread pool (I/O and PIL release the GIL) while the backbone runs;
a file that cannot be read or decoded comes back as a failure naming it, never as a crash of the
whole batch.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from lafite_core.method.backbone import FeatureExtractor
from lafite_core.datapath.data import LoadedSample, Sample, load_sample


@dataclass(frozen=True)
class LoadFailure:
    sample: Sample
    error: str


def load_many(
    samples: Iterable[Sample], size: int, max_pixels: int, storage_options: dict | None = None,
    workers: int = 4, prefetch: int = 48, crop: float = 1.0,
) -> Iterator[LoadedSample | LoadFailure]:
    """Loads samples in order; each is a LoadedSample or a LoadFailure with the reason.

    At most ``prefetch`` decoded images wait ahead of the consumer, so memory stays bounded
    however many samples there are.
    """

    def one(s: Sample) -> LoadedSample | LoadFailure:
        try:
            return load_sample(s, size, max_pixels, storage_options, crop)
        except (OSError, ValueError) as exc:
            return LoadFailure(s, f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque[Future] = deque()
        for s in samples:
            window.append(pool.submit(one, s))
            if len(window) >= prefetch:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] in [0, 1]."""
    arr = np.stack(images) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 32,
            device: torch.device | str | None = None) -> np.ndarray:
    """uint8 images [B, S, S, 3] -> raw aggregated features float32 [B, D, h, w]."""
    device = torch.device(device or next(extractor.parameters()).device)
    out = []
    n = len(images)
    for s in range(0, n, batch_size):
        x = to_tensor(images[s : s + batch_size]).to(device)
        out.append(extractor(x).float().cpu().numpy())
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out)
