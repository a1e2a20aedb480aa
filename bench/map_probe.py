"""How the map's smoothing and the image score's window change LafitE's test AUROCs.

LafitE's feature-level errors become a pixel map by a bilinear upsampling and a Gaussian blur
(``scoring.smoothing_sigma``, 4 pixels as in PatchCore), and an image score by the maximum of that
map averaged over ``scoring.image_pool`` pixels. On a published model this probe computes every
test image's errors once (the model's tau, K and DDIM steps, its own noise seeds: the maps
``lafite score`` would give) and turns them into maps at each sigma of ``--sigmas`` and image scores
at each window of ``--pools``: detection AUROC per (sigma, window), localisation AUROC and AUPRO per
sigma, per category and their mean. The PatchCore baseline's maps get the same blur and windows
from its nearest-neighbour distances, so that a setting is judged against the baseline too.

    .venv/bin/python bench/map_probe.py --store /tmp/ws/scratch

Writes ``bench/results/map_probe.md`` (``--out`` for another stem; also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from accuracy import load_test_sets  # noqa: E402
from common import SHARED_DATA, machine, out_stem, published_model, write_text  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store holding a published model")
    p.add_argument("--model-version", default=None, help="default: the latest")
    p.add_argument("--data-root", default=str(SHARED_DATA), help="where the model's categories' images are")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 2, 4, 6, 8, 12], help="Gaussian sigmas (pixels)")
    p.add_argument("--pools", type=int, nargs="+", default=[16, 32, 48, 64], help="image-score windows (pixels)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/map_probe)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    from lafite_core.method.backbone import FeatureExtractor
    from lafite_core.method.metrics import aupro, auroc
    from lafite_core.method.model import Scorer
    from lafite_core.method.scoring import gaussian_blur, window_max
    from lafite_core.stages import image_seed

    started = time.perf_counter()
    model, version, categories = published_model(args.store, args.model_version, args.data_root)
    cfg = model.config
    size = cfg.data.image_size
    extractor = FeatureExtractor(cfg.backbone)

    # Unsmoothed maps (sigma 0) of every test image; the blur and the windows are applied below.
    # Scorer.score's maps are blurred with the model's sigma, so the probe asks for sigma 0 by
    # scoring with a copy of the model whose sigma is 0 (same bank, U-Net and seeds).
    raw_model = dataclasses.replace(model, config=cfg.with_updates(scoring={"smoothing_sigma": 0.0}))
    raw_scorer = Scorer(raw_model, "cpu")
    tests = []
    for t in load_test_sets(categories, cfg, extractor):
        known = np.array([s.mask is not None for s in t.loaded])
        if len(np.unique(t.labels)) < 2 or not known.any():
            print(f"{t.category.key}: skipped (needs normal and anomalous test images with masks)", flush=True)
            continue
        seeds = [image_seed(cfg.seed, s.content_hash) for s in t.loaded]
        start = time.perf_counter()
        maps = {m: raw_scorer.score(t.features, m, seeds).maps for m in ("lafite", "patchcore")}
        masks = np.stack([s.mask for s in t.loaded if s.mask is not None])
        tests.append((t.category.key, t.labels, known, masks, maps))
        print(f"{t.category.key}: {len(t.labels)} test images scored in {time.perf_counter() - start:.0f} s",
              flush=True)
    if not tests:
        raise SystemExit("no category with normal and anomalous test images and masks")

    rows = []  # (method, sigma, {category: (loc, aupro, {pool: det})})
    for method in ("lafite", "patchcore"):
        for sigma in args.sigmas:
            per = {}
            for key, labels, known, masks, maps in tests:
                m = maps[method]
                blurred = gaussian_blur(m, sigma) if sigma > 0 else m
                arr = blurred.numpy()[known]
                loc = auroc(masks, arr)
                pro = aupro(masks, arr)
                det = {pool: auroc(labels, window_max(blurred, pool).numpy())
                       for pool in args.pools}
                per[key] = (loc, pro, det)
            rows.append((method, sigma, per))
            print(method, sigma, {k: (round(100 * v[0], 1), round(100 * v[1], 1),
                                      {q: round(100 * d, 1) for q, d in v[2].items()}) for k, v in per.items()},
                      flush=True)

    keys = [t[0] for t in tests]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    names = {"lafite": "LafitE", "patchcore": "PatchCore"}
    lines = [f"# Map smoothing and image-score window: {version}", "",
             f"- machine: {machine().line()}", f"- command: `bench/map_probe.py {' '.join(sys.argv[1:])}`",
             f"- model: {', '.join(model.categories)}; tau {model.tau}, K {model.k}, "
             f"{cfg.scoring.ddim_steps} DDIM step(s); its own sigma {cfg.scoring.smoothing_sigma:g}, "
             f"window {cfg.scoring.image_pool}; PatchCore: recipe {cfg.baseline.recipe}",
             f"- test: {', '.join(f'{k} ({len(t[1])})' for k, t in zip(keys, tests))}; maps {size} x {size}",
             "- in %: localisation (pixel) AUROC / AUPRO per sigma, detection AUROC per window (max of the "
             "map averaged over window x window pixels); mean = mean over the categories", ""]
    header = ["method", "sigma"] + [f"{k} loc / AUPRO" for k in keys] + ["mean loc / AUPRO"]
    lines += ["Localisation:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, sigma, per in rows:
        cells = [names[method], f"{sigma:g}"] + [f"{pct(per[k][0])} / {pct(per[k][1])}" for k in keys]
        cells.append(f"{pct(np.mean([per[k][0] for k in keys]))} / {pct(np.mean([per[k][1] for k in keys]))}")
        lines.append("| " + " | ".join(cells) + " |")
    header = ["method", "sigma"] + [f"window {q}: " + " / ".join(keys) + " (mean)" for q in args.pools]
    lines += ["", "Detection:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, sigma, per in rows:
        cells = [names[method], f"{sigma:g}"]
        cells += [" / ".join(pct(per[k][2][q]) for k in keys) + f" ({pct(np.mean([per[k][2][q] for k in keys]))})"
                  for q in args.pools]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"- {time.perf_counter() - started:.0f} s in all"]
    stem = out_stem(args.out, "map_probe", False)
    write_text(stem.parent / (stem.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
