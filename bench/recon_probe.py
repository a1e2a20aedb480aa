"""Reconstruction probe: how much of an anomaly LafitE's U-Net removes without feature editing.

LafitE without feature editing scores a patch by how far the U-Net's denoised copy of it lies from
the patch itself. If the U-Net mapped every noised patch onto the normal features it was trained on,
that error would be the patch's distance to the normal features (the bank's nearest member, what
PatchCore scores); if it copied its input back, the error would be the noise it failed to remove,
the same on normal and on defective patches. This probe measures where a trained model sits between
the two, per tau, on one category's test set, at the feature grid:

- ``d_nn``: the distance from each patch (LafitE's standardised view) to its nearest bank member;
- ``e_rec``: the no-editing reconstruction error (the model's DDIM steps), ``e_edit``: with editing
  at the model's K;
- per score: its mean on normal patches of good images, on normal patches of defective images and on
  defect patches (a feature cell is a defect patch when over half of its pixels are masked, normal
  when none is), the defect / normal contrast, and the patch-level AUROC (defect vs normal patches);
- ``excess share``: (defect - normal) of the score over (defect - normal) of d_nn (normal: patches of
  good images), the share of the anomaly's distance that shows in the score above its floor on
  normal patches (about 1 for a projection onto the normal features, 0 for a copy of the input);
- image AUROC of each score (the model's pooled-max image score).

    .venv/bin/python bench/recon_probe.py --store /tmp/ws/scratch --category magnetic_tile
    .venv/bin/python bench/recon_probe.py --store s3://bucket/lafite --version v... --taus 50 200 400

Writes ``bench/results/recon_probe_<category>.md`` (also printed).
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

from common import SHARED_DATA, machine, write_text  # noqa: E402
from lafite_core.datapath.data import discover  # noqa: E402
from lafite_core.datapath.features import extract  # noqa: E402
from lafite_core.method.backbone import FeatureExtractor  # noqa: E402
from lafite_core.method.metrics import auroc  # noqa: E402
from lafite_core.method.model import Scorer  # noqa: E402
from lafite_core.method.scoring import to_anomaly_maps  # noqa: E402
from lafite_core.stages import image_seed, load_all, load_published  # noqa: E402
from lafite_core.store.storage import Store  # noqa: E402


def patch_labels(masks: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel masks [N, S, S] -> per feature cell: 1 defect (> half masked), 0 normal (none), -1 mixed."""
    share = F.adaptive_avg_pool2d(torch.from_numpy(masks.astype(np.float32))[:, None], (h, w))[:, 0].numpy()
    return np.where(share > 0.5, 1, np.where(share == 0, 0, -1))


def summary(name: str, err: np.ndarray, cells: np.ndarray, good: np.ndarray) -> dict:
    """Patch statistics of one score [N, h, w]; ``good``: [N] image is a normal one."""
    normal_good = err[(cells == 0) & good[:, None, None]]
    normal_bad = err[(cells == 0) & ~good[:, None, None]]
    defect = err[cells == 1]
    keep = cells >= 0
    return dict(score=name, normal_good=float(normal_good.mean()), normal_bad=float(normal_bad.mean()),
                defect=float(defect.mean()), contrast=float(defect.mean() / normal_good.mean()),
                patch_auroc=100 * auroc(cells[keep], err[keep]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store holding a published model (local path or URL)")
    p.add_argument("--version", default=None, help="model version (default: the latest)")
    p.add_argument("--data-root", default=str(SHARED_DATA))
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--taus", type=int, nargs="+", default=None, help="default: the model's search grid")
    p.add_argument("--out", default=None, help="output file (default bench/results/recon_probe_<category>.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    store = Store(args.store)
    version = store.resolve_version(args.version)
    model, _, _ = load_published(store, version)
    cfg = model.config
    cats = [c for c in discover(args.data_root, [args.category])]
    if len(cats) != 1:
        raise SystemExit(f"{args.category!r} names {len(cats)} categories under {args.data_root}")
    loaded, failed = load_all(cats[0].test, cfg)
    if failed:
        raise SystemExit(f"{len(failed)} unreadable test images, e.g. {failed[0].error}")
    good = np.array([s.sample.label == 0 for s in loaded])
    masks = np.stack([s.mask if s.mask is not None else np.zeros(s.image.shape[:2], bool) for s in loaded])
    raw = torch.from_numpy(extract(FeatureExtractor(cfg.backbone), [s.image for s in loaded]))
    seeds = [image_seed(cfg.seed, s.content_hash) for s in loaded]
    scorer = Scorer(model, "cpu")
    sc = cfg.scoring
    taus = args.taus or list(cfg.search.taus)

    def per_batch(fn) -> np.ndarray:
        out = []
        for s in range(0, raw.shape[0], sc.batch_size):
            out.append(fn(scorer.normalize(raw[s : s + sc.batch_size]), seeds[s : s + sc.batch_size]).cpu().numpy())
        return np.concatenate(out)

    h, w = scorer.normalize(raw[:1]).shape[-2:]
    d_nn = np.sqrt(np.maximum(scorer.neighbours(raw, 1).distances[:, 0], 0)).reshape(len(loaded), h, w)
    cells = patch_labels(masks, *d_nn.shape[1:])

    def image_auroc(err: np.ndarray) -> float:
        s = to_anomaly_maps(torch.from_numpy(err), cfg.data.image_size, sc.smoothing_sigma, sc.image_pool).scores
        return 100 * auroc((~good).astype(int), s.numpy())

    rows = [dict(summary("d_nn (bank distance)", d_nn, cells, good), tau="-", image_auroc=image_auroc(d_nn))]
    for tau in taus:
        for method, label in (("lafite_no_edit", "e_rec (no editing)"), ("lafite", f"e_edit (K={model.k})")):
            err = per_batch(lambda x0, sd: scorer.errors(x0, method, sd, tau=tau))
            rows.append(dict(summary(label, err, cells, good), tau=tau, image_auroc=image_auroc(err)))
        print(f"tau {tau} done ({time.perf_counter() - start:.0f} s)", flush=True)

    gap = rows[0]["defect"] - rows[0]["normal_good"]
    for r in rows:
        r["share"] = (r["defect"] - r["normal_good"]) / gap
    n_def, n_norm = int((cells == 1).sum()), int((cells == 0).sum())
    lines = [f"# Reconstruction probe: {cats[0].key}", "",
             f"- machine: {machine().line()}",
             f"- command: `bench/recon_probe.py {' '.join(sys.argv[1:])}`",
             f"- model {version} ({', '.join(model.categories)}), U-Net {cfg.diffusion.base_channels} "
             f"{tuple(cfg.diffusion.channel_mult)}, {sc.ddim_steps} DDIM step(s), K = {model.k}, bank "
             f"{model.bank.shape[0]:,} x {model.bank.shape[1]}, search {sc.knn}",
             f"- {len(loaded)} test images ({int((~good).sum())} defective); feature grid "
             f"{d_nn.shape[1]} x {d_nn.shape[2]}: {n_def:,} defect and {n_norm:,} normal patches",
             f"- {time.perf_counter() - start:.0f} s", "",
             "Means of each score (standardised feature units); contrast = defect / normal patches of good "
             "images; excess share = (defect - normal) of the score / that of d_nn; AUROCs in %.", "",
             "| score | tau | normal (good images) | normal (defective images) | defect | contrast | excess share "
             "| patch AUROC | image AUROC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['score']} | {r['tau']} | {r['normal_good']:.2f} | {r['normal_bad']:.2f} | "
                     f"{r['defect']:.2f} | {r['contrast']:.2f} | {r['share']:.2f} | {r['patch_auroc']:.1f} | "
                     f"{r['image_auroc']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(Path(args.out) if args.out else HERE / "results" / f"recon_probe_{cats[0].name}.md", text)


if __name__ == "__main__":
    main()
