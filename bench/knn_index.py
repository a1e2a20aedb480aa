"""Which bank index for a published model: search time, recall and LafitE's test AUROCs side by side.

On a real model from a store (its LafitE bank, its standardised view of real test images), every
index in ``--index`` searches the same queries in the scorer's calls (16 images, K = the model's):

- ``exact``: faiss flat, the reference for recall;
- ``ivf:LISTS:PROBES``: the library's inverted file (``ivf_centroids`` k-means lists, ``FaissKNN``);
  LISTS ``model`` is the model's own lists, ``sqrt`` / ``4sqrt`` about 1x / 4x sqrt(M) (the old and
  the new default of ``ivf_lists``), or a number;
- ``hnsw:M:EF``: a faiss HNSW graph (not in the library; here to compare).

Reported: build seconds, ms an image of search alone, recall@1 against exact, how much farther the
first neighbour found is than the nearest (mean, %), and with ``--auroc`` LafitE's test image /
pixel AUROC and AUPRO per category through the library's scorer at the model's tau, K and steps,
with this index in place of the model's (the whole test set of each category).

    .venv/bin/python bench/knn_index.py --store /tmp/ws/scratch --auroc
    .venv/bin/python bench/knn_index.py --store S --index exact ivf:model:8 ivf:4sqrt:8 hnsw:32:32

Writes ``bench/results/knn_index.md`` (``--out`` for another stem; also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import SHARED_DATA, machine, out_stem, published_model, write_text  # noqa: E402

DEFAULT_INDEXES = ("exact", "ivf:model:8", "ivf:model:4", "ivf:4sqrt:8", "ivf:4sqrt:16", "hnsw:32:32")
CALL_IMAGES = 16


class Index:
    """One index over the bank, searched like the library's ``FaissKNN`` (``search(queries, k)``)."""

    def __init__(self, spec: str, model) -> None:
        import faiss

        from lafite_core.method.knn import FaissKNN, ivf_centroids

        bank = model.bank
        self.spec = spec
        kind, *arg = spec.split(":")
        t = time.perf_counter()
        if kind == "exact" and not arg:
            self.knn, self.label = FaissKNN(bank, use_gpu=False), "exact (flat)"
        elif kind == "ivf" and len(arg) == 2:
            lists_arg, probes = arg[0], int(arg[1])
            if lists_arg == "model":
                if model.bank_centroids is None:
                    raise SystemExit(f"{spec}: the model has no inverted lists (scoring.knn is not ivf)")
                cents = model.bank_centroids
            else:
                root = math.sqrt(bank.shape[0])
                lists = {"sqrt": round(root), "4sqrt": round(4 * root)}.get(lists_arg) or int(lists_arg)
                cents = ivf_centroids(bank, lists, model.config.seed)
            self.knn = FaissKNN(bank, use_gpu=False, centroids=cents, nprobe=probes)
            self.label = f"inverted file, {len(cents)} lists / {probes} probes" + (
                " (the model's)" if lists_arg == "model" else "")
        elif kind == "hnsw" and len(arg) == 2:
            index = faiss.IndexHNSWFlat(bank.shape[1], int(arg[0]))
            index.add(np.ascontiguousarray(bank, dtype=np.float32))
            index.hnsw.efSearch = int(arg[1])
            self.knn, self.label = _Faiss(index), f"HNSW, M {arg[0]} / efSearch {arg[1]}"
        else:
            raise SystemExit(f"unknown index {spec!r}: exact | ivf:LISTS:PROBES | hnsw:M:EF")
        self.build_s = time.perf_counter() - t

    def search(self, queries: np.ndarray, k: int):
        return self.knn.search(queries, k)


class _Faiss:
    def __init__(self, index) -> None:
        self.index = index

    def search(self, queries: np.ndarray, k: int):
        from lafite_core.method.knn import Neighbours

        d, i = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return Neighbours(np.maximum(d, 0), i)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store holding a published model")
    p.add_argument("--model-version", default=None, help="default: the latest")
    p.add_argument("--data-root", default=str(SHARED_DATA), help="where the model's categories' images are")
    p.add_argument("--images", type=int, default=96, help="test images searched for the timing and recall rows")
    p.add_argument("--index", nargs="+", default=list(DEFAULT_INDEXES), help=f"default: {' '.join(DEFAULT_INDEXES)}")
    p.add_argument("--auroc", action="store_true", help="also score every test image with each index (not exact)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/knn_index)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    from lafite_core.method.backbone import FeatureExtractor
    from lafite_core.method.model import Scorer
    from lafite_core.method.patchcore import patches
    from lafite_core.stages import metrics_for, score_category
    from speed import features_of_tests

    model, version, categories = published_model(args.store, args.model_version, args.data_root)
    extractor = FeatureExtractor(model.config.backbone)
    per = max(1, args.images // len(categories))  # the same share of every category, spread over its test set
    picked = [dataclasses.replace(c, test=c.test[:: max(1, len(c.test) // per)][:per]) for c in categories]
    feats, _ = features_of_tests(model, picked, extractor, per * len(categories))
    scorer = Scorer(model, "cpu")
    with torch.no_grad():
        queries = np.concatenate([patches(scorer.normalize(feats[s : s + CALL_IMAGES]))
                                  for s in range(0, len(feats), CALL_IMAGES)])
    n_img, k = len(feats), model.k
    per_call = queries.shape[0] // n_img * CALL_IMAGES
    header = ["index", "build s", "ms an image", "recall@1", "1st neighbour farther by"]
    if args.auroc:
        header += [c.key for c in categories]
    lines = [f"# Bank index for a published model: {version}", "",
             f"- machine: {machine().line()}", f"- command: `bench/knn_index.py {' '.join(sys.argv[1:])}`",
             f"- bank {model.bank.shape[0]:,} x {model.bank.shape[1]}; {n_img} test images "
             f"({queries.shape[0]:,} patches) searched in calls of {CALL_IMAGES} images, K = {k}; "
             f"model tau {model.tau}, K {model.k}, {model.config.scoring.ddim_steps} DDIM step(s)",
             "- recall@1 and how much farther the first neighbour found is than the nearest (mean): "
             "against the exact search"]
    if args.auroc:
        lines.append("- per category: LafitE image / pixel AUROC (AUPRO) in %, every test image, this index in "
                     "the library's scorer")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    exact = FaissExact(model.bank, queries)
    for spec in args.index:
        index = Index(spec, model)
        index.search(queries[:per_call], k)  # warm-up
        t = time.perf_counter()
        found = [index.search(queries[s : s + per_call], k) for s in range(0, queries.shape[0], per_call)]
        secs = time.perf_counter() - t
        ids = np.concatenate([f.indices for f in found])
        first = np.sqrt(((queries - model.bank[ids[:, 0]]) ** 2).sum(1))
        recall = float(np.mean(ids[:, 0] == exact.ids))
        farther = float(np.mean(first / np.maximum(exact.dist, 1e-6)) - 1)
        cells = [index.label, f"{index.build_s:.1f}", f"{1000 * secs / n_img:.1f}", f"{recall:.3f}",
                 f"{100 * farther:.2f}%"]
        if args.auroc:
            for c in categories:
                if spec == "exact":  # exact search of every test patch: minutes, and the ivf rows bound it
                    cells.append("-")
                    continue
                scorer.knn = index
                cs, _ = score_category(scorer, extractor, c, ["lafite"])
                r = metrics_for(cs, "lafite")
                cells.append(f"{100 * r.image_auroc:.2f} / {100 * r.pixel_auroc:.2f} ({100 * r.aupro:.2f})"
                             if r.pixel_auroc is not None else f"{100 * r.image_auroc:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    stem = out_stem(args.out, "knn_index", False)
    write_text(stem.parent / (stem.name + ".md"), "\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


class FaissExact:
    """The nearest bank member of every query, exactly: its row and its L2 distance."""

    def __init__(self, bank: np.ndarray, queries: np.ndarray) -> None:
        from lafite_core.method.knn import FaissKNN

        found = FaissKNN(bank, use_gpu=False).search(queries, 1)
        self.ids = found.indices[:, 0]
        self.dist = np.sqrt(found.distances[:, 0])


if __name__ == "__main__":
    main()
