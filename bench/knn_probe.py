"""kNN probe: what the bank search costs and what an inverted file changes, on one real category.

On the feature probe's cached features (``bench/feature_probe.py`` writes them; strides 8-16, native
3 x 3, standardised: LafitE's cpu-profile view), one bank per keep rate (greedy coreset of the
category's training patches) is searched by every test patch exactly (faiss flat) and through the
library's inverted file (``lafite_core.method.knn``: k-means centroids, ``FaissKNN(centroids=...)``)
at several probe counts. Reported per search: seconds, ms an image, recall@1 against the exact
search, and LafitE's editing bound (detection / pixel AUROC at K = 1, 3, 5; the 16 x 16-pooled max,
and the 32 x 32 one) from the neighbours found.

    .venv/bin/python bench/knn_probe.py                                  # magnetic_tile, 10% bank
    .venv/bin/python bench/knn_probe.py --keeps 0.1 0.03 0.01 --probes 4 8 16

Writes ``bench/results/knn_probe_<category>.md`` (also printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import machine, write_text  # noqa: E402
from feature_probe import STORED, native_levels, view  # noqa: E402
from lafite_core.config import CoresetConfig  # noqa: E402
from lafite_core.method.coreset import select_coreset  # noqa: E402
from lafite_core.method.editing import editing_weights  # noqa: E402
from lafite_core.method.knn import FaissKNN, ivf_centroids, ivf_lists  # noqa: E402
from lafite_core.method.metrics import auroc  # noqa: E402
from lafite_core.method.scoring import gaussian_blur  # noqa: E402


def bound(bank, queries, found, labels, masks, size: int) -> str:
    d = bank.shape[1]
    cells = []
    for k in (1, 3, 5):
        dist = torch.from_numpy(np.sqrt(found.distances[:, :k]))
        mix = (editing_weights(dist)[..., None]
               * torch.from_numpy(bank[found.indices[:, :k].reshape(-1)]).view(-1, k, d)).sum(1)
        err = (mix - torch.from_numpy(queries)).norm(dim=1)
        maps = gaussian_blur(F.interpolate(err.view(-1, 1, STORED, STORED), size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0], 4.0)
        s16 = F.avg_pool2d(maps[:, None], 16, 1).flatten(1).max(1).values
        s32 = F.avg_pool2d(maps[:, None], 32, 1).flatten(1).max(1).values
        cells.append(f"K={k} {100 * auroc(labels, s16.numpy()):.1f} / {100 * auroc(masks, maps.numpy()):.1f} "
                     f"(32x32 {100 * auroc(labels, s32.numpy()):.1f})")
    return "; ".join(cells)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.1])
    p.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--lists", type=int, default=0, help="inverted lists (0: the library's default, about sqrt(M))")
    p.add_argument("--cache", default=str(HERE / "results" / ".probe_cache"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    size = 224
    data = native_levels(args.category, size, Path(args.cache), "tf_efficientnet_lite0", "square")
    train, test = view(data, "train", (8, 16), 3, "native"), view(data, "test", (8, 16), 3, "native")
    d = train.shape[1]
    mu, sd = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True) + 1e-6
    train, test = (train - mu) / sd, (test - mu) / sd
    patches = np.ascontiguousarray(train.permute(0, 2, 3, 1).reshape(-1, d).numpy())
    queries = np.ascontiguousarray(test.permute(0, 2, 3, 1).reshape(-1, d).numpy())
    labels = data["test_labels"]
    masks = np.unpackbits(data["test_masks"], axis=-1)[..., :size].astype(bool)
    n_img = len(labels)
    lines = [f"# kNN probe: {args.category}, 224 px, lite0, strides 8-16 native 3x3 (standardised)", "",
             f"- machine: {machine().line()}", f"- command: `bench/knn_probe.py {' '.join(sys.argv[1:])}`",
             f"- {patches.shape[0]:,} training patches, {n_img} test images ({queries.shape[0]:,} patches), D = {d}",
             "- editing bound: detection / pixel AUROC in % at K = 1, 3, 5 (16 x 16-pooled max; 32 x 32 in brackets)",
             "", "| bank | search | lists / probes | seconds | ms an image | recall@1 | editing bound |",
             "|---|---|---|---|---|---|---|"]
    for keep in args.keeps:
        bank = patches[np.sort(select_coreset(patches, CoresetConfig(keep_rate=keep), 0).indices)]
        t = time.perf_counter()
        exact = FaissKNN(bank, use_gpu=False).search(queries, 5)
        secs = time.perf_counter() - t
        lines.append(f"| {keep:.0%} ({bank.shape[0]:,}) | exact | - | {secs:.1f} | {1000 * secs / n_img:.0f} | 1 | "
                     f"{bound(bank, queries, exact, labels, masks, size)} |")
        print(lines[-1], flush=True)
        lists = ivf_lists(bank.shape[0], args.lists)
        t = time.perf_counter()
        cents = ivf_centroids(bank, lists, 0)
        fit = time.perf_counter() - t
        for probes in args.probes:
            t = time.perf_counter()
            found = FaissKNN(bank, use_gpu=False, centroids=cents, nprobe=probes).search(queries, 5)
            secs = time.perf_counter() - t
            recall = float(np.mean(found.indices[:, 0] == exact.indices[:, 0]))
            lines.append(f"| {keep:.0%} ({bank.shape[0]:,}) | inverted file (k-means {fit:.1f} s) | {lists} / {probes} "
                         f"| {secs:.1f} | {1000 * secs / n_img:.0f} | {recall:.3f} | "
                         f"{bound(bank, queries, found, labels, masks, size)} |")
            print(lines[-1], flush=True)
    write_text(HERE / "results" / f"knn_probe_{args.category}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
