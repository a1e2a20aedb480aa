"""Where a model's localisation is lost: the test AUROCs per defect type, and which pixels rank wrong.

A category's localisation (pixel) AUROC pools every test pixel: the defect pixels of all defect types
against the normal pixels of good images *and* of defect images. One defect type with large masks
can then hold most of the positive pixels and decide the figure. On a published model this probe
computes every test image's map once with four scorers and, per category and scorer, reports:

- per defect type: its images, its share of all defect pixels, its mean mask area, its detection
  AUROC (its images against the good ones), its localisation AUROC (its images and the good ones),
  how its defect pixels rank against the *same images'* normal pixels ("in vs out") and how those
  normal pixels rank against good images' pixels ("out vs good": 50 means they look like good
  images' pixels);
- the category's localisation AUROC without the type that holds the most defect pixels, and with
  each map less its own median (a shift of the whole image taken out);
- the normal pixels of defect images against good images' pixels by their distance from the mask
  (a halo the features' receptive field spreads, or a shift of the whole image);
- per defect type, the detection AUROC at each image-score window of ``--windows`` (LafitE and
  PatchCore): a type detected better by wider windows is found by more than its defect's own pixels.

The scorers: LafitE as ``lafite score`` gives it (the model's tau, K, DDIM steps and noise seeds);
its editing bound (the error a perfect reconstruction of the edited features would leave: eq. 10's
K-mix against the input); the nearest bank member in LafitE's view (the K = 1 bound); PatchCore with
the model's baseline recipe. All four share the model's map blur. The per-type ``det`` column uses each
scorer's own image score: the model's window for the first three, and for PatchCore's own recipe its
reweighted max (the window table scores every scorer's maps the same way). Defect images whose mask
is empty at the model's size (a defect smaller than a pixel there) count in every column but the
distance bands, which need a defect pixel to measure from.

    .venv/bin/python bench/defect_probe.py --store /tmp/ws/scratch --categories magnetic_tile

Writes ``bench/results/defect_probe.md`` (``--out`` for another stem; also printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lafite_core.method.metrics import auroc  # noqa: E402

# (label, low, high]: Euclidean distances in pixels of the model's maps
BANDS: tuple[tuple[str, float, float], ...] = (("<= 8", 0.5, 8.0), ("8-24", 8.0, 24.0), ("24-48", 24.0, 48.0),
                                               ("> 48", 48.0, float("inf")))


def split_auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUROC of scores ``pos`` (positives) against ``neg`` (negatives); None when either is empty."""
    pos, neg = np.ravel(pos), np.ravel(neg)
    if not len(pos) or not len(neg):
        return None
    return auroc(np.r_[np.ones(len(pos), np.int8), np.zeros(len(neg), np.int8)], np.r_[pos, neg])


@dataclass(frozen=True)
class TypeRow:
    defect_type: str
    images: int
    pixel_share: float  # of all defect pixels of the category
    area: float  # mean mask area of its images, as a fraction of the image
    localisation: float | None  # its images and the good ones
    in_vs_out: float | None  # its defect pixels against the same images' normal pixels
    out_vs_good: float | None  # its images' normal pixels against good images' pixels


def breakdown(types: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> list[TypeRow]:
    """Per defect type rows of the pixel figures. ``types`` [N] (``good`` for normal images), ``maps``
    [N, S, S] and boolean ``masks`` [N, S, S] (all False for good images)."""
    if maps.shape != masks.shape or len(types) != len(maps):
        raise ValueError(f"shapes disagree: types {types.shape}, maps {maps.shape}, masks {masks.shape}")
    good = types == "good"
    if not good.any():
        raise ValueError("no good images: every type is measured against them")
    total = masks.sum()
    good_pixels = maps[good]
    rows = []
    for d in sorted(set(types.tolist()) - {"good"}):
        t = types == d
        both = t | good
        rows.append(TypeRow(
            d, int(t.sum()), float(masks[t].sum() / total) if total else 0.0, float(masks[t].mean()),
            auroc(masks[both], maps[both]) if masks[t].any() else None,
            split_auroc(maps[t][masks[t]], maps[t][~masks[t]]),
            split_auroc(maps[t][~masks[t]], good_pixels),
        ))
    return rows


def localisation_without(types: np.ndarray, maps: np.ndarray, masks: np.ndarray, drop: str) -> float | None:
    """The pooled localisation AUROC with the images of type ``drop`` left out (None when no defect
    pixel is left: the category has that one type)."""
    keep = types != drop
    return auroc(masks[keep], maps[keep]) if masks[keep].any() else None


def window_scores(maps: np.ndarray, window: int) -> np.ndarray:
    """Image scores: the max of each map averaged over window x window pixels (1: the max pixel; the
    map's side: its mean), as ``scoring.image_pool`` computes them."""
    from lafite_core.method.scoring import window_max

    return window_max(torch.from_numpy(np.ascontiguousarray(maps)), window).numpy()


def minus_image_median(maps: np.ndarray) -> np.ndarray:
    """Each map less its own median: what is left when a shift of the whole image is taken out."""
    return maps - np.median(maps.reshape(len(maps), -1), axis=1)[:, None, None]


def halo(types: np.ndarray, maps: np.ndarray, masks: np.ndarray,
         bands: tuple[tuple[str, float, float], ...] = BANDS) -> dict[str, tuple[float | None, int]]:
    """Normal pixels of defect images against good images' pixels, by their distance (pixels) from the
    nearest defect pixel: {band: (AUROC, pixels)}."""
    from scipy.ndimage import distance_transform_edt

    good = types == "good"
    parts: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in bands}
    for i in np.flatnonzero(~good & masks.reshape(len(masks), -1).any(1)):
        dist = distance_transform_edt(~masks[i])
        for name, lo, hi in bands:
            parts[name].append(maps[i][(dist > lo) & (dist <= hi)])
    out = {}
    for name, _, _ in bands:
        px = np.concatenate(parts[name]) if parts[name] else np.empty(0, maps.dtype)
        out[name] = (split_auroc(px, maps[good]), len(px))
    return out


# --------------------------------------------------------------------------- scoring a model


def scorer_maps(model, scorer, features: torch.Tensor, seeds: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{scorer name: (maps [N, S, S], image scores [N])} for the four scorers of the module docstring."""
    from lafite_core.method.editing import edit_features
    from lafite_core.method.knn import Neighbours
    from lafite_core.method.scoring import reconstruction_error, to_anomaly_maps

    cfg = model.config
    sc = cfg.scoring
    found = scorer.neighbours(features, max(model.k, 1))  # searched once, for LafitE and both bounds
    out = {}
    for name, method in (("LafitE", "lafite"), (f"PatchCore ({cfg.baseline.recipe} recipe)", "patchcore")):
        am = scorer.score(features, method, seeds, found=found if method == "lafite" else None)
        out[name] = (am.maps.numpy(), am.scores.numpy())
    per_image = features.shape[-2] * features.shape[-1]
    for name, k in ((f"editing bound (K={model.k})", model.k), ("nearest member (LafitE's view)", 1)):
        maps, scores = [], []
        for s in range(0, len(features), sc.batch_size):
            rows = slice(s * per_image, (s + sc.batch_size) * per_image)
            x0 = scorer.normalize(features[s : s + sc.batch_size])
            edited = edit_features(x0, model.bank, scorer.knn, k, Neighbours(found.distances[rows], found.indices[rows]))
            am = to_anomaly_maps(reconstruction_error(x0, edited).float(), cfg.data.image_size, sc.smoothing_sigma,
                                 sc.image_pool)
            maps.append(am.maps.numpy())
            scores.append(am.scores.numpy())
        out[name] = (np.concatenate(maps), np.concatenate(scores))
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store holding a published model")
    p.add_argument("--model-version", default=None, help="default: the latest")
    p.add_argument("--data-root", default=None, help="where the model's categories' images are "
                   "(default ../shared/data)")
    p.add_argument("--categories", nargs="+", default=None,
                   help="category names to probe (default: every category of the model with masks)")
    p.add_argument("--windows", type=int, nargs="+", default=[1, 16, 32, 48, 64],
                   help="image-score windows (pixels) for the detection table; the map's side is added")
    p.add_argument("--out", default=None, help="output stem (default bench/results/defect_probe)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    from accuracy import load_test_sets
    from common import SHARED_DATA, machine, out_stem, published_model, write_text

    from lafite_core.method.backbone import FeatureExtractor
    from lafite_core.method.model import Scorer
    from lafite_core.stages import image_seed

    started = time.perf_counter()
    model, version, categories = published_model(args.store, args.model_version, args.data_root or str(SHARED_DATA))
    if args.categories:
        categories = [c for c in categories if c.name in args.categories]
        if not categories:
            raise SystemExit(f"none of {args.categories} is a category of model {version}")
    cfg = model.config
    scorer = Scorer(model, "cpu")
    lines = [f"# Per defect type: {version}", "",
             f"- machine: {machine().line()}", f"- command: `bench/defect_probe.py {' '.join(sys.argv[1:])}`",
             f"- model: {', '.join(model.categories)}; tau {model.tau}, K {model.k}, {cfg.scoring.ddim_steps} DDIM "
             f"step(s); sigma {cfg.scoring.smoothing_sigma:g}, window {cfg.scoring.image_pool}; maps "
             f"{cfg.data.image_size} x {cfg.data.image_size}",
             "- in %: det = detection AUROC (the type's images against the good ones); loc = localisation AUROC "
             "over the type's images and the good ones; in vs out = its defect pixels against the same images' "
             "normal pixels; out vs good = those normal pixels against good images' pixels (50: alike); "
             "share = of the category's defect pixels; area = mean mask area; det is each scorer's own image "
             "score (PatchCore's recipe: its reweighted max)", ""]
    for t in load_test_sets(categories, cfg, FeatureExtractor(cfg.backbone)):
        known = np.array([s.mask is not None for s in t.loaded])
        types = np.array([s.sample.defect_type for s in t.loaded])
        if not (types == "good").any() or not (known & (types != "good")).any():
            print(f"{t.category.key}: skipped (needs good images and defect images with masks)", flush=True)
            continue
        seeds = [image_seed(cfg.seed, s.content_hash) for s in t.loaded]
        start = time.perf_counter()
        results = scorer_maps(model, scorer, t.features, seeds)
        masks = np.stack([s.mask for s in t.loaded if s.mask is not None]) > 0
        kt = types[known]
        lines += [f"## {t.category.key}: {len(types)} test images ({int(known.sum())} with masks), scored in "
                  f"{time.perf_counter() - start:.0f} s", ""]
        header = ["scorer", "type", "images", "share", "area", "det", "loc", "in vs out", "out vs good"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        summary = []
        halos = {}
        for name, (maps, scores) in results.items():
            maps_k = maps[known]
            rows = breakdown(kt, maps_k, masks)
            for r in rows:
                det = split_auroc(scores[types == r.defect_type], scores[types == "good"])  # masks known or not
                lines.append(f"| {name} | {r.defect_type} | {r.images} | {pct(r.pixel_share)} | {pct(r.area)} | "
                             f"{pct(det)} | {pct(r.localisation)} | {pct(r.in_vs_out)} | {pct(r.out_vs_good)} |")
            top = max(rows, key=lambda r: r.pixel_share)
            summary.append((name, auroc(masks, maps_k), top.defect_type, top.pixel_share,
                            localisation_without(kt, maps_k, masks, top.defect_type),
                            split_auroc(maps_k[masks], maps_k[kt == "good"]),
                            split_auroc(maps_k[masks], maps_k[(kt != "good")][~masks[kt != "good"]]),
                            auroc(masks, minus_image_median(maps_k))))
            halos[name] = halo(kt, maps_k, masks)
            print(name, [(r.defect_type, pct(r.localisation), pct(r.in_vs_out), pct(r.out_vs_good)) for r in rows],
                  flush=True)
        header = ["scorer", "loc", "type with most defect pixels (share)", "loc without it",
                  "defect pixels vs good images' pixels", "defect pixels vs defect images' normal pixels",
                  "loc, each map less its median"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, loc, top, share, without, vs_good, vs_out, shifted in summary:
            lines.append(f"| {name} | {pct(loc)} | {top} ({pct(share)}) | {pct(without)} | {pct(vs_good)} | "
                         f"{pct(vs_out)} | {pct(shifted)} |")
        header = ["scorer"] + [f"{b} px from the mask" for b, _, _ in BANDS]
        lines += ["", "Normal pixels of defect images against good images' pixels, by distance from the mask "
                  "(AUROC %, pixels):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, h in halos.items():
            lines.append(f"| {name} | " + " | ".join(f"{pct(a)} ({n:,})" for a, n in h.values()) + " |")
        side = cfg.data.image_size
        windows = sorted({min(w, side) for w in args.windows} | {side})
        names = [n for n in results if n.startswith(("LafitE", "PatchCore"))]
        dtypes = sorted(set(types.tolist()) - {"good"})
        header = ["scorer", "window"] + dtypes + ["all"]
        lines += ["", f"Detection AUROC (%) per defect type by image-score window (1: the max pixel; {side}: the "
                  "map's mean):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            for w in windows:
                sc = window_scores(results[name][0], w)
                cells = [pct(split_auroc(sc[types == d], sc[types == "good"])) for d in dtypes]
                cells.append(pct(split_auroc(sc[types != "good"], sc[types == "good"])))
                lines.append(f"| {name} | {w} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"- {time.perf_counter() - started:.0f} s in all")
    stem = out_stem(args.out.removesuffix(".md") if args.out else None, "defect_probe", False)
    write_text(stem.parent / (stem.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
