"""Position probe: does standardising LafitE's errors per map position (``scoring.position_norm``) help?

LafitE's editing bound (the error of a perfect reconstruction: the distance from a patch to the softmax
mix of its K nearest bank members, as in ``bench/feature_probe.py``) on one unified bank over several
categories, built from 80% of their train/good images; the other 20% stand in for the held-out normal
images the pipeline fits the statistics on. Each test map is scored as it is, and with its feature-level
errors standardised by the held-out errors' mean and std at each position: pooled over all categories
(what ``scoring.position_norm`` does) and per category. No U-Net, no search; the features come from the
feature probe's cache (built on first use).

    .venv/bin/python bench/position_probe.py                                   # magnetic_tile + metal_plate, K 1
    .venv/bin/python bench/position_probe.py --ks 1 5 --out /tmp/position_probe.md

Detection = max of the map averaged over 32 x 32 pixels (the cpu profile's), localisation = pixel AUROC;
in %. Writes ``bench/results/position_probe.md`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import feature_probe as fp
from common import machine, write_text
from lafite_core.config import CoresetConfig
from lafite_core.method.coreset import select_coreset
from lafite_core.method.editing import editing_weights
from lafite_core.method.knn import FaissKNN
from lafite_core.method.metrics import auroc
from lafite_core.method.scoring import fit_position_stats, standardize_positions, to_anomaly_maps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", nargs="+", default=["magnetic_tile", "metal_plate"])
    p.add_argument("--ks", nargs="+", type=int, default=[1])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--cache", default=str(Path(__file__).parent / "results" / ".probe_cache"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "position_probe.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    size, strides = args.size, (8, 16)  # the cpu profile's view: strides 8 and 16, native 3 x 3
    data = {c: fp.native_levels(c, size, Path(args.cache)) for c in args.categories}
    views = {c: (fp.view(data[c], "train", strides, 3, "native"), fp.view(data[c], "test", strides, 3, "native"))
             for c in args.categories}
    rng = np.random.default_rng(0)
    split = {}
    for c in args.categories:
        perm = rng.permutation(len(views[c][0]))
        n = len(perm) // 5
        split[c] = (perm[n:], perm[:n])  # (bank images, held-out normals)
    fitted = torch.cat([views[c][0][split[c][0]] for c in args.categories])
    mu, sd = fitted.mean((0, 2, 3), keepdim=True), fitted.std((0, 2, 3), keepdim=True) + 1e-6
    d = fitted.shape[1]

    def flat(x: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(((x - mu) / sd).permute(0, 2, 3, 1).reshape(-1, d).numpy())

    banks = []  # per-category coresets, concatenated: the pipeline's unified bank
    for c in args.categories:
        patches = flat(views[c][0][split[c][0]])
        banks.append(patches[np.sort(select_coreset(patches, CoresetConfig(keep_rate=0.1), 0).indices)])
    bank = np.concatenate(banks)
    knn = FaissKNN(bank)

    def errors(x: torch.Tensor, k: int) -> torch.Tensor:
        q = flat(x)
        found = knn.search(q, k)
        w = editing_weights(torch.from_numpy(np.sqrt(found.distances[:, :k])))
        mix = (w[..., None] * torch.from_numpy(bank[found.indices[:, :k].reshape(-1)]).view(-1, k, d)).sum(1)
        return (mix - torch.from_numpy(q)).norm(dim=1).view(-1, fp.STORED, fp.STORED)

    lines = [f"# Position probe: {' + '.join(args.categories)}, {size} px", "",
             f"- machine: {machine().line()}", f"- command: `bench/position_probe.py {' '.join(sys.argv[1:])}`",
             f"- one unified bank (10% coreset per category) from 80% of the train/good images ({len(bank)} rows); "
             "statistics from the other 20%; editing bound, strides 8-16, native 3x3; detection (32 x 32 score) / "
             "localisation AUROC in %", "", "| K | category | as it is | pooled statistics (position_norm) | "
             "per-category statistics | s |", "|---|---|---|---|---|---|"]
    for k in args.ks:
        start = time.perf_counter()
        held = {c: errors(views[c][0][split[c][1]], k) for c in args.categories}
        pooled = fit_position_stats(torch.cat(list(held.values())))
        for c in args.categories:
            test = errors(views[c][1], k)
            labels = data[c]["test_labels"]
            masks = np.unpackbits(data[c]["test_masks"], axis=-1)[..., :size].astype(bool)
            cells = []
            for e in (test, standardize_positions(test, pooled), standardize_positions(test, fit_position_stats(held[c]))):
                out = to_anomaly_maps(e, size, 4.0, 32)
                cells.append(f"{100 * auroc(labels, out.scores.numpy()):.1f} / "
                             f"{100 * auroc(masks.ravel(), out.maps.numpy().ravel()):.1f}")
            lines.append(f"| {k} | {c} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |")
            print(lines[-1], flush=True)
    write_text(Path(args.out), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
