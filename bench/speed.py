"""Speed benchmark: every figure is a pair (or a ratio of a pair) measured side by side in this run.

Sections (``--only`` picks some):

- ``extraction``: images/s through the whole data path (read, decode, resize, backbone, aggregation,
  Zarr write with ``feature_store.extract_into`` into a temporary local store) against the bare
  backbone forward pass on the same images already in memory as tensors. Target: ratio >= 0.8.
- ``knn``: exact nearest-neighbour search, faiss (``FaissKNN``) against chunked torch matmuls
  (``TorchKNN``), same bank and queries (1,024 patches per image), K in {1, 5}.
- ``coreset``: ``select_coreset`` time and peak RSS growth against the number of patches (192-d,
  clustered random data), one child process per size; must scale linearly.
- ``scoring``: Scorer images/s (from features) of LafitE at 1, 5, 10, 25 DDIM steps against
  the PatchCore baseline on the same features, with a cpu-profile model trained here for a few
  epochs on real images (or ``--store``/``--model-version``).
- ``search``: the pseudo-validation search (``stages.PseudoEvaluator`` and ``search_hyperparameters``
  on a pseudo-validation set built and extracted once) against one LafitE pass over the same set at
  the chosen point (bank neighbours, U-Net, maps and the search's metrics): the cpu profile's search
  on its ``search.images_per_category`` subset plus the chosen point on the rest, timed; the whole set
  with every point scored; and how often subsets of several sizes pick what the whole set picks.
  Target: the search in at most 3x the pass. Use a real model (``--store``) on its own categories.
- ``ray``: batch scoring through ``tasks.scoring.score_shard_body`` as Ray tasks, 1 vs 2 concurrent
  workers over the same shards (torch and faiss at 1 thread per worker). Target: speedup >= 1.6.
- ``training``: cpu-profile U-Net training time per epoch per 1,000 images on random features.
- ``appends``: the feature store's append (a batch of 32 images' entries and tiny feature rows, so
  that the bookkeeping is what is timed) as a category already holds 0 to 16,384 images, against the
  append into an empty category. Target: flat (the bookkeeping does not grow with the category).
- ``endtoend``: ``lafite score`` (the CLI, in a child process: Prefect, Ray, read, decode, extract,
  score, Parquet) with the same model version, ``--method patchcore`` against ``--method lafite`` at
  the model's searched DDIM steps, each on a small and a large dump so that the fixed cost of a
  command can be taken out. Target: LafitE >= 0.5x PatchCore's images/s.

    .venv/bin/python bench/speed.py              # full run
    .venv/bin/python bench/speed.py --quick      # smoke run, small sizes
    .venv/bin/python bench/speed.py --only knn coreset

Writes ``<out>.json`` and ``<out>.md`` (``bench/results/speed[_quick]``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common import SHARED_DATA, Ticker, camera_jpegs, machine, out_stem, write_json, write_text

SECTIONS = ("extraction", "knn", "coreset", "scoring", "compile", "search", "ray", "training", "appends",
            "endtoend")
CHILD_FLAG = "--coreset-child"


@dataclass(frozen=True)
class Sizes:
    extraction_images: int | None  # None: every image found
    extraction_reps: int
    knn_banks: tuple[int, ...]
    knn_queries: int  # total queries per measurement
    knn_call_images: tuple[int, ...]  # images (x 1,024 patches) per search call
    coreset_patches: tuple[int, ...]
    fit_train_images: int | None
    fit_epochs: int
    scoring_images: int
    ddim_steps: tuple[int, ...]
    ray_images: int
    ray_shards: int
    train_images: int
    train_epochs: int
    jpeg_dump_images: int
    dump_images: int  # end to end
    compile_images: int  # torch.compile vs eager: images scored from features, compile time included
    append_entries: tuple[int, ...]  # images a category holds when its append is timed


FULL = Sizes(None, 2, (5_000, 50_000), 32_768, (1, 16), (100_000, 400_000, 1_600_000, 3_700_000), None, 2, 97,
             (1, 5, 10, 25), 96, 4, 256, 3, 128, 600, 1_000, (0, 1_024, 4_096, 16_384))
QUICK = Sizes(24, 1, (5_000, 50_000), 2_048, (1, 2), (20_000, 40_000), 6, 1, 4, (1, 5), 8, 4, 16, 2, 8, 24, 32,
              (0, 256))

PATCHES_PER_IMAGE = 1024
DIM = 192
MVTEC_CATEGORY_PATCHES = 240 * PATCHES_PER_IMAGE  # an MVTec-size category: ~240 train images


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------- data


def find_categories(data_root: str | None, tmp: Path):
    """Real categories (default: ../shared/data/mpdd), else a generated demo set under ``tmp``."""
    from lafite_core.datapath.data import discover
    from flows.demo_data import generate_demo_dataset

    root = data_root or (str(SHARED_DATA / "mpdd") if (SHARED_DATA / "mpdd").is_dir() else None)
    if root is None:
        log("no real data at ../shared/data/mpdd: generating the demo data set")
        root = str(generate_demo_dataset(tmp / "demo").path)
    return root, discover(root)


# --------------------------------------------------------------------------- extraction


@dataclass
class ExtractionResult:
    data: str
    images: int
    batch_size: int
    pipeline_images_per_s: float
    bare_backbone_images_per_s: float
    ratio: float
    load_core_ms: float  # read + decode + resize (+ mask, hash) of one image on one thread, nothing else running
    bound: float  # the ratio if that loading shared the cores perfectly with a backbone that keeps them all busy
    target: float = 0.8


def bench_extraction(categories, cfg, extractor, sizes: Sizes, tmp: Path) -> list[ExtractionResult]:
    """The whole extraction path vs the bare backbone on the real images, then on a generated dump of
    camera-sized JPEGs decoded at a reduced scale (the default) and in full."""
    from lafite_core.datapath import images
    from lafite_core.datapath.data import discover

    out = [extraction_pair("real images (" + ", ".join(sorted({c.dataset for c in categories})) + ")",
                           [s for c in categories for s in (*c.train, *c.test)], cfg, extractor, sizes, tmp)]
    dump = discover(str(camera_jpegs(sizes.jpeg_dump_images, tmp / "jpeg")))
    samples = [s for c in dump for s in c.train]
    out.append(extraction_pair("2000x1500 JPEGs, reduced-scale decode", samples, cfg, extractor, sizes, tmp))
    images.JPEG_DRAFT = False
    try:
        out.append(extraction_pair("2000x1500 JPEGs, full decode", samples, cfg, extractor, sizes, tmp))
    finally:
        images.JPEG_DRAFT = True
    return out


def extraction_pair(data: str, samples, cfg, extractor, sizes: Sizes, tmp: Path) -> ExtractionResult:
    from lafite_core.store.feature_store import FeatureStore, extract_into
    from lafite_core.datapath.features import to_tensor
    from lafite_core.stages import backbone_card, load_all
    from lafite_core.store.storage import Store

    if sizes.extraction_images:
        samples = samples[: sizes.extraction_images]
    batch = 32  # extract_into's default
    loaded, _ = load_all(samples, cfg)
    tensors = [to_tensor([s.image for s in loaded[i : i + batch]]) for i in range(0, len(loaded), batch)]
    extractor(tensors[0][:2])  # warm-up
    pipe, bare = [], []
    for rep in range(sizes.extraction_reps):
        fstore = FeatureStore(Store(tempfile.mkdtemp(dir=tmp, prefix="features-")), cfg, backbone_card(extractor))
        t, report = timed(extract_into, fstore, samples, extractor, batch_size=batch)
        assert report.extracted == len(samples), report
        pipe.append(len(samples) / t)
        t0 = time.perf_counter()
        for x in tensors:
            extractor(x)
        bare.append(len(loaded) / (time.perf_counter() - t0))
    p, b = statistics.median(pipe), statistics.median(bare)
    # what the read-ahead threads cost the cores the backbone runs on: loading alone, one thread
    from lafite_core.datapath.data import load_sample

    probe = samples[:: max(1, len(samples) // 256)]  # spread over every category and image size
    t0 = time.thread_time()
    for s in probe:
        load_sample(s, cfg.data.image_size, cfg.data.max_image_pixels)
    load_ms = 1e3 * (time.thread_time() - t0) / len(probe)  # CPU time of this thread: core-ms
    backbone_ms = 1e3 / b  # assumed to keep every core the process may use busy for this long an image
    bound = backbone_ms / (backbone_ms + load_ms / len(os.sched_getaffinity(0)))
    log(f"  extraction, {data}: {p:.1f} vs {b:.1f} images/s; loading {load_ms:.1f} core-ms an image, bound {bound:.2f}")
    return ExtractionResult(data, len(samples), batch, p, b, p / b, load_ms, bound)


# --------------------------------------------------------------------------- kNN


@dataclass
class KNNResult:
    bank: int
    k: int
    call_queries: int
    faiss_queries_per_s: float
    torch_queries_per_s: float
    torch_over_faiss: float
    top1_agreement: float


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray, out: np.ndarray | None = None,
              block: int = 262_144) -> np.ndarray:
    """[n, D] float32 points around ``centres`` [C, D] (written into ``out`` block by block)."""
    out = np.empty((n, centres.shape[1]), np.float32) if out is None else out
    for s in range(0, n, block):
        m = min(block, n - s)
        out[s : s + m] = centres[rng.integers(len(centres), size=m)]
        out[s : s + m] += rng.standard_normal((m, centres.shape[1]), dtype=np.float32)
    return out


def bench_knn(sizes: Sizes) -> list[KNNResult]:
    from lafite_core.method.knn import FaissKNN, TorchKNN

    rng = np.random.default_rng(0)
    centres = (rng.standard_normal((512, DIM)) * 2).astype(np.float32)
    queries = clustered(sizes.knn_queries, rng, centres) * np.float32(1.05)
    results = []
    for m in sizes.knn_banks:
        bank = clustered(m, rng, centres)
        faiss_knn, torch_knn = FaissKNN(bank, use_gpu=False), TorchKNN(bank)
        for images in sizes.knn_call_images:
            call = images * PATCHES_PER_IMAGE
            calls = [queries[s : s + call] for s in range(0, len(queries) - call + 1, call)]
            for k in (1, 5):
                faiss_knn.search(calls[0][:64], k), torch_knn.search(calls[0][:64], k)  # warm-up
                tf, f_out = timed(lambda: [faiss_knn.search(q, k) for q in calls])
                tt, t_out = timed(lambda: [torch_knn.search(q, k) for q in calls])
                n = sum(len(q) for q in calls)
                agree = float(np.mean(np.concatenate([a.indices[:, 0] == b.indices[:, 0] for a, b in zip(f_out, t_out)])))
                results.append(KNNResult(m, k, call, n / tf, n / tt, tf / tt, agree))
                log(f"  knn bank {m} k={k} call {call}: faiss {n / tf:,.0f} q/s, torch {n / tt:,.0f} q/s")
    return results


# --------------------------------------------------------------------------- coreset (child processes)


@dataclass
class CoresetResult:
    patches: int
    torch_threads: int
    groups: int
    chunks: int
    selected: int
    seconds: float
    seconds_per_million: float
    input_gb: float
    peak_rss_growth_gb: float
    peak_rss_gb: float


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes.

    VmHWM rather than getrusage's ru_maxrss: ru_maxrss survives execve, so a child started from a
    big parent reports the parent's size as its own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (the coreset memory figure needs Linux)")


def coreset_child(n: int, threads: int) -> None:
    """In a fresh process: clustered [n, 192] patches in MVTec-size groups, then select_coreset.

    Prints one JSON line. Peak RSS growth = peak RSS (VmHWM) at the end - resident memory after
    the imports, before the input exists; it includes the input itself (generated in small blocks
    straight into its final array, so generation adds no spike) and the group keys.
    """
    from lafite_core.config import CoresetConfig
    from lafite_core.method.coreset import select_coreset

    if threads:
        torch.set_num_threads(threads)
    before = proc_status("VmRSS")
    rng = np.random.default_rng(n)
    centres = (rng.standard_normal((2048, DIM)) * 2).astype(np.float32)
    feats = clustered(n, rng, centres, block=16_384)
    n_groups = max(1, math.ceil(n / MVTEC_CATEGORY_PATCHES))
    # string category keys, repeated per patch, as coreset.patch_bank passes them
    names = np.array([f"mvtec/category{g:02d}" for g in range(n_groups)])
    groups = np.repeat(names, np.diff(np.linspace(0, n, n_groups + 1).round().astype(int)))
    t, core = timed(select_coreset, feats, CoresetConfig(), 0, groups=groups, device="cpu")
    peak = proc_status("VmHWM")
    print(json.dumps(asdict(CoresetResult(
        n, torch.get_num_threads(), n_groups, core.num_chunks, len(core.indices), t, t / (n / 1e6), feats.nbytes / 1e9,
        (peak - before) / 1e9, peak / 1e9))))


def bench_coreset(sizes: Sizes) -> list[CoresetResult]:
    """Every size with torch's default threads, then the smallest again with one thread.

    The greedy loop runs thousands of tiny parallel ops; when other work holds a core, torch's
    intra-op threads wait on each other at every op (seen here: 8x slower at 2 threads than at 1
    on a busy 2-core machine), so the one-thread row tells contention from the algorithm's cost.
    """
    out = []
    runs = [(n, 0) for n in sizes.coreset_patches] + [(sizes.coreset_patches[0], 1)]
    for n, threads in runs:
        proc = subprocess.run([sys.executable, __file__, CHILD_FLAG, str(n), str(threads)], capture_output=True,
                              text=True)
        if proc.returncode:
            raise RuntimeError(f"coreset child for {n} patches failed:\n{proc.stderr[-3000:]}")
        r = CoresetResult(**json.loads(proc.stdout.strip().splitlines()[-1]))
        log(f"  coreset {n:,} patches, {r.torch_threads} threads: {r.seconds:.1f} s, "
            f"peak RSS +{r.peak_rss_growth_gb:.2f} GB")
        out.append(r)
    return out


# --------------------------------------------------------------------------- a model to score with


@dataclass
class Trained:
    model: object
    store_url: str
    version: str
    source: str  # how the model came to be


def trained_model(args, categories, sizes: Sizes, extractor, tmp: Path) -> Trained:
    """A published cpu-profile model: loaded from ``--store``, or fitted here for a few epochs."""
    from lafite_core.config import cpu_profile
    from lafite_core.pipeline import fit, publish
    from lafite_core.stages import load_published
    from lafite_core.store.storage import Store

    if args.store:
        store = Store(args.store)
        version = store.resolve_version(args.model_version)
        if args.relist:
            return relisted(store, version, tmp)
        model, _, _ = load_published(store, version)
        return Trained(model, args.store, version, f"loaded {version} from {args.store}")
    cfg = cpu_profile().with_updates(diffusion={"epochs": sizes.fit_epochs},
                                     search={"taus": (cpu_profile().scoring.tau,), "ks": (cpu_profile().scoring.k,)})
    if sizes.fit_train_images:
        categories = [dataclasses.replace(c, train=c.train[: sizes.fit_train_images]) for c in categories]
    n_train = sum(len(c.train) for c in categories)
    log(f"  fitting a cpu-profile model ({cfg.diffusion.epochs} epochs, {n_train} train images) to score with")
    fitted = fit(categories, cfg, extractor, progress=Ticker())
    store_url = str(tmp / "store")
    version = publish(Store(store_url), fitted).version
    return Trained(fitted.model, store_url, version,
                   f"cpu profile fitted here: {cfg.diffusion.epochs} epochs on {n_train} train images "
                   f"(speed only; not a useful detector)")


def relisted(store, version: str, tmp: Path) -> Trained:
    """``version`` of ``store`` published again into a store under ``tmp`` with its inverted lists rebuilt
    by today's ``ivf_lists`` rule (a model keeps the lists it was built with, so an older model would
    otherwise measure an older index); every other file as it was."""
    import io

    from lafite_core.method.knn import ivf_centroids, ivf_lists
    from lafite_core.method.model import BANK_CENTROIDS
    from lafite_core.stages import load_published
    from lafite_core.store import layout
    from lafite_core.store.storage import Store

    model, _, files = load_published(store, version)
    sc = model.config.scoring
    if sc.knn != "ivf":
        raise SystemExit(f"--relist: {version} searches its bank with scoring.knn={sc.knn!r}, not an inverted file")
    before = None if model.bank_centroids is None else len(model.bank_centroids)
    cents = ivf_centroids(model.bank, ivf_lists(model.bank.shape[0], sc.ivf_lists), model.config.seed)
    buf = io.BytesIO()
    np.save(buf, cents, allow_pickle=False)
    out_url = str(tmp / "relisted-store")
    manifest = store.read_json(*layout.model_file(version, layout.MANIFEST))
    new = Store(out_url).publish_model({**files, BANK_CENTROIDS: buf.getvalue()}, manifest["config_hash"])
    model, _, _ = load_published(Store(out_url), new.version)
    log(f"  {version}: inverted lists rebuilt, {before} -> {len(cents)} lists, published as {new.version}")
    return Trained(model, out_url, new.version, f"{version} from {store.root_url} with its inverted lists rebuilt by "
                   f"today's rule ({before} -> {len(cents)} lists), published as {new.version} in a temporary store")


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoringResult:
    method: str
    ddim_steps: int | None
    torch_threads: int
    images: int
    images_per_s: float
    patchcore_over_this: float


def features_of_tests(model, categories, extractor, n: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``n`` test images' raw features [n, D, h, w] and their scoring seeds."""
    from lafite_core.datapath.features import extract
    from lafite_core.stages import image_seed, load_all

    loaded, _ = load_all([s for c in categories for s in c.test][:n], model.config)
    return (torch.from_numpy(extract(extractor, [s.image for s in loaded])),
            [image_seed(0, s.content_hash) for s in loaded])


def bench_scoring(trained: Trained, categories, extractor, sizes: Sizes) -> list[ScoringResult]:
    from lafite_core.method.model import Scorer

    model = trained.model
    feats, seeds = features_of_tests(model, categories, extractor, sizes.scoring_images)

    def rate(method: str, steps: int | None, precision: str = "fp32") -> float:
        m = dataclasses.replace(model, config=model.config.with_updates(
            compute={"precision": precision}, **({} if steps is None else {"scoring": {"ddim_steps": steps}})))
        scorer = Scorer(m, "cpu")
        scorer.score(feats[:2], method, seeds[:2])  # warm-up
        t, _ = timed(scorer.score, feats, method, seeds)
        log(f"  scoring {method} steps={steps} threads={torch.get_num_threads()}: {len(seeds) / t:.2f} images/s")
        return len(seeds) / t

    threads = torch.get_num_threads()
    pc = rate("patchcore", None)
    rows = [ScoringResult("patchcore", None, threads, len(seeds), pc, 1.0)]
    default = model.config.scoring.ddim_steps
    r = rate("lafite_no_edit", default)
    rows.append(ScoringResult("lafite_no_edit", default, threads, len(seeds), r, pc / r))
    r = rate("lafite", default, "bf16")  # beside the fp32 row of the same steps below
    rows.append(ScoringResult("lafite bf16", default, threads, len(seeds), r, pc / r))
    for steps in sizes.ddim_steps:
        r = rate("lafite", steps)
        rows.append(ScoringResult("lafite", steps, threads, len(seeds), r, pc / r))
    if threads > 1:  # the same at one thread: how much the intra-op threads help (or stall, on a busy machine)
        torch.set_num_threads(1)
        try:
            r = rate("lafite", default)
        finally:
            torch.set_num_threads(threads)
        rows.append(ScoringResult("lafite", default, 1, len(seeds), r, pc / r))
    return rows


def bench_compile(trained: Trained, categories, extractor, sizes: Sizes) -> dict:
    """LafitE scoring from features with the U-Net eager vs ``torch.compile``d (inductor, default mode),
    the compile time counted: ``sizes.compile_images`` images (the test images' features repeated),
    in the model's batches, at its DDIM steps; and how far the scores move."""
    from lafite_core.method.model import Scorer

    model = trained.model
    base, base_seeds = features_of_tests(model, categories, extractor, sizes.scoring_images)
    reps = -(-sizes.compile_images // len(base))
    feats = base.repeat(reps, 1, 1, 1)[: sizes.compile_images]
    seeds = (base_seeds * reps)[: sizes.compile_images]
    batch = model.config.scoring.batch_size

    def run(scorer) -> tuple[float, float, torch.Tensor]:
        """Seconds for the first batch, seconds for the whole set (first batch included), scores."""
        t0 = time.perf_counter()
        first = scorer.score(feats[:batch], "lafite", seeds[:batch]).scores
        t_first = time.perf_counter() - t0
        rest = scorer.score(feats[batch:], "lafite", seeds[batch:]).scores
        return t_first, time.perf_counter() - t0, torch.cat([first, rest])

    eager = Scorer(model, "cpu")
    eager.score(feats[:2], "lafite", seeds[:2])  # warm-up: the eager path's allocator and faiss, not compiled
    e_first, e_total, e_scores = run(eager)
    compiled = Scorer(model, "cpu")
    compiled.eps_model = torch.compile(model.unet)
    c_first, c_total, c_scores = run(compiled)
    n = len(feats)
    row = {"images": n, "ddim_steps": model.config.scoring.ddim_steps, "batch": batch,
           "eager_seconds": e_total, "compiled_seconds": c_total, "compiled_first_batch_seconds": c_first,
           "eager_first_batch_seconds": e_first,
           "eager_steady_images_per_s": (n - batch) / (e_total - e_first),
           "compiled_steady_images_per_s": (n - batch) / (c_total - c_first),
           "max_abs_score_difference": float((e_scores - c_scores).abs().max()),
           "max_score": float(e_scores.abs().max()), "wins": c_total < e_total}
    log(f"  torch.compile: eager {e_total:.1f} s vs compiled {c_total:.1f} s for {n} images (first batch "
        f"{c_first:.1f} s with the compile); steady {row['eager_steady_images_per_s']:.1f} vs "
        f"{row['compiled_steady_images_per_s']:.1f} img/s; scores differ by at most {row['max_abs_score_difference']:.2e}")
    return row


def bench_pooling(image_size: int, pools=(16, 32), batch: int = 16, reps: int = 5) -> list[dict]:
    """The image score's window mean on a batch of [batch, S, S] maps: torch's avg_pool2d (k * k sums per
    pixel, what the score used before) against ``scoring.box_mean`` (a summed-area table), ms an image."""
    from lafite_core.method.scoring import box_mean

    maps = torch.rand(batch, image_size, image_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for k in pools:
        def pool(k=k):
            return torch.nn.functional.avg_pool2d(maps[:, None], k, stride=1)

        def table(k=k):
            return box_mean(maps, k)

        pool(), table()  # warm-up
        t_pool = min(timed(pool)[0] for _ in range(reps)) / batch
        t_table = min(timed(table)[0] for _ in range(reps)) / batch
        log(f"  image-score window {k}: avg_pool2d {1e3 * t_pool:.2f} ms, summed-area table {1e3 * t_table:.2f} ms an image")
        rows.append({"pool": k, "image_size": image_size, "avg_pool2d_ms": 1e3 * t_pool, "box_mean_ms": 1e3 * t_table})
    return rows


def replay_search(points, cfg, ddim_steps: int):
    """``search_hyperparameters`` under ``cfg`` over already-scored ``points`` (a search with every DDIM
    step count): the points it would have scored, and its result, without scoring anything again."""
    from lafite_core.method.search import search_hyperparameters

    scored = {}
    for p in points:
        if p.seconds > 0 or (p.tau, p.k, p.ddim_steps) not in scored:  # the steps stage's reused point costs 0
            scored[(p.tau, p.k, p.ddim_steps)] = p
    used = []

    def evaluate(tau, k, steps):
        used.append(scored[(tau, k, steps)])
        return used[-1].image_auroc, used[-1].pixel_auroc

    return search_hyperparameters(evaluate, cfg, ddim_steps), used


def _auroc_by_category(scores: np.ndarray, labels: np.ndarray, categories: np.ndarray) -> float:
    """Mean per-category image AUROC (categories with both labels), as the search computes it."""
    from lafite_core.method.metrics import auroc

    return float(np.mean([auroc(labels[categories == c], scores[categories == c]) for c in np.unique(categories)
                          if len(np.unique(labels[categories == c])) == 2]))


def bench_search(trained: Trained, categories, extractor, patiences=(0, 1, 2),
                 subset_sizes=(64, 96, 128, 192, 256), draws: int = 20) -> dict:
    """The search on the model's categories three ways, on one pseudo-validation set:

    - every point of the grid and every DDIM step count scored on the whole set; the same search with
      ``search.steps_patience`` = each of ``patiences`` is replayed over those points (the same
      seconds, not scored twice);
    - the cpu profile's search as ``fit`` runs it (``search.images_per_category``: the points scored on
      a subset, then the chosen point on the rest for the calibration), timed;
    - how often a subset of each of ``subset_sizes`` images a category (``draws`` seeded draws) picks what
      the whole set picks, replayed from the whole set's per-image scores (nothing scored again), and
      the whole set's detection AUROC lost at the subset's pick.

    Each is set against one LafitE pass over the whole set at the chosen point (a fresh
    ``PseudoEvaluator``: the bank neighbours, the U-Net, the maps and the search's metrics)."""
    from lafite_core.config import cpu_profile
    from lafite_core.method.model import Scorer
    from lafite_core.method.search import search_hyperparameters
    from lafite_core.stages import PseudoEvaluator, plan_training, pseudo_validation, search_subset

    model = trained.model
    profile = cpu_profile().search
    full_cfg = model.config.with_updates(search={"steps_patience": 0, "images_per_category": None})
    plan = plan_training(categories, full_cfg)
    t0 = time.perf_counter()
    pseudo, _ = pseudo_validation(full_cfg, extractor, plan.holdout, plan.fit)
    build_s = time.perf_counter() - t0
    steps0 = model.config.scoring.ddim_steps
    ev = PseudoEvaluator(Scorer(model, "cpu"), pseudo)
    full = search_hyperparameters(ev, full_cfg.search, steps0)
    stages = {st: sum(p.seconds for p in full.points if p.stage == st) for st in ("tau", "k", "steps")}
    pass_s: dict[tuple, float] = {}

    def one_pass(tau: int, k: int, steps: int) -> float:
        if (tau, k, steps) not in pass_s:
            run = lambda: PseudoEvaluator(Scorer(model, "cpu"), pseudo)(tau, k, steps)  # noqa: E731
            pass_s[(tau, k, steps)] = min(timed(run)[0] for _ in range(2))
        return pass_s[(tau, k, steps)]

    variants = []
    for patience in patiences:
        r, used = replay_search(full.points, full_cfg.with_updates(search={"steps_patience": patience}).search, steps0)
        seconds = sum(p.seconds for p in used)
        one = one_pass(r.tau, r.k, r.ddim_steps)
        variants.append({"steps_patience": patience, "search_seconds": seconds, "points": len(used),
                         "u_net_passes": sum(p.ddim_steps for p in used),
                         "steps_scored": [p.ddim_steps for p in used if p.stage == "steps"],
                         "chosen": {"tau": r.tau, "k": r.k, "ddim_steps": r.ddim_steps},
                         "pass_seconds": one, "ratio": seconds / one})
        log(f"  search on the whole set, steps_patience {patience}: {seconds:.1f} s over {len(used)} points vs one "
            f"pass {one:.1f} s: {variants[-1]['ratio']:.1f}x")

    # the cpu profile's search, as fit runs it
    prof_cfg = model.config.with_updates(search={"steps_patience": profile.steps_patience,
                                                 "images_per_category": profile.images_per_category})
    subset = search_subset(pseudo.labels, pseudo.categories, profile.images_per_category, model.config.seed)
    ev_sub = PseudoEvaluator(Scorer(model, "cpu"), pseudo, subset=subset)
    scored: list[tuple] = []  # the points scored (the steps stage's reused point is recorded, not scored)
    r = search_hyperparameters(lambda *point: scored.append(point) or ev_sub(*point), prof_cfg.search, steps0)
    search_s = sum(p.seconds for p in r.points)
    tuned = model.with_hyperparameters(r.tau, r.k, r.ddim_steps)
    rest_s, _ = timed(lambda: ev_sub.final_scores(tuned))
    one = one_pass(r.tau, r.k, r.ddim_steps)
    profile_row = {"images_per_category": profile.images_per_category, "steps_patience": profile.steps_patience,
                   "images": int(len(subset)), "points": len(scored), "u_net_passes": sum(st for *_, st in scored),
                   "chosen": {"tau": r.tau, "k": r.k, "ddim_steps": r.ddim_steps},
                   "search_seconds": search_s, "calibration_rest_seconds": rest_s, "pass_seconds": one,
                   "ratio": search_s / one, "ratio_with_rest": (search_s + rest_s) / one}
    log(f"  cpu profile's search ({len(subset)} of {len(pseudo.labels)} images): {search_s:.1f} s + the chosen point "
        f"on the rest {rest_s:.1f} s vs one pass {one:.1f} s: {profile_row['ratio']:.1f}x "
        f"({profile_row['ratio_with_rest']:.1f}x with the rest)")

    # the subset's picks against the whole set's, from the whole set's per-image scores
    labels, cats = pseudo.labels, pseudo.categories
    whole_auroc: dict[tuple, float] = {}

    def whole(key: tuple) -> np.ndarray:
        """The whole set's image scores at ``key``: the search's, or scored now (a subset's steps stage
        can run at a K the whole set's did not pick)."""
        if key not in ev.scores:
            ev(*key)
        if key not in whole_auroc:
            whole_auroc[key] = _auroc_by_category(ev.scores[key], labels, cats)
        return ev.scores[key]

    rule = full_cfg.with_updates(search={"steps_patience": profile.steps_patience}).search

    def on_whole_set(t: int, k: int | None, st: int) -> tuple[float, None]:
        whole((t, k, st))
        return whole_auroc[(t, k, st)], None

    ref = search_hyperparameters(on_whole_set, rule, steps0)
    ref_auroc = whole_auroc[(ref.tau, ref.k, ref.ddim_steps)]
    stability = []
    for n in subset_sizes:
        picks, lost = [], []
        for d in range(draws):
            sub = search_subset(labels, cats, n, d)

            def evaluate(t, k, st, sub=sub):
                return _auroc_by_category(whole((t, k, st))[sub], labels[sub], cats[sub]), None

            got = search_hyperparameters(evaluate, rule, steps0)
            picks.append((got.tau, got.k, got.ddim_steps))
            lost.append(ref_auroc - whole_auroc[(got.tau, got.k, got.ddim_steps)])
        stability.append({"images_per_category": n, "fraction": len(search_subset(labels, cats, n, 0)) / len(labels),
                          "same_tau": float(np.mean([p[0] == ref.tau for p in picks])),
                          "same_point": float(np.mean([p == (ref.tau, ref.k, ref.ddim_steps) for p in picks])),
                          "auroc_lost_mean": float(np.mean(lost)), "auroc_lost_max": float(np.max(lost))})
        log(f"  subset {n} a category: same tau {stability[-1]['same_tau']:.2f}, same point "
            f"{stability[-1]['same_point']:.2f}, whole-set AUROC lost mean {100 * np.mean(lost):.2f} max "
            f"{100 * np.max(lost):.2f} points")
    head = next((v for v in variants if v["steps_patience"] == profile.steps_patience), variants[0])
    return {"pseudo_images": int(len(pseudo.labels)), "build_seconds": build_s, "stage_seconds": stages,
            "step_points": [{"ddim_steps": p.ddim_steps, "image_auroc": p.image_auroc, "seconds": p.seconds}
                            for p in full.points if p.stage == "steps"],
            "variants": variants, "headline_patience": head["steps_patience"], "profile": profile_row,
            "reference": {"tau": ref.tau, "k": ref.k, "ddim_steps": ref.ddim_steps, "image_auroc": ref_auroc},
            "stability": stability, "draws": draws,
            "search_seconds": search_s, "pass_seconds": one, "ratio": profile_row["ratio"], "chosen": profile_row["chosen"],
            "points": profile_row["points"], "u_net_passes": profile_row["u_net_passes"], "target": 3.0}


# --------------------------------------------------------------------------- Ray


@dataclass
class RayResult:
    images: int
    shards: int
    one_worker_images_per_s: float
    two_workers_images_per_s: float
    speedup: float
    threads_per_worker: int = 1
    target: float = 1.6


class ShardWorker:
    """A Ray actor that runs tasks.scoring.score_shard_body with torch and faiss at one thread.

    Actors rather than tasks: both settings then run on the same warm processes (imports done), so
    the comparison is not skewed by Ray starting or reaping worker processes in between.
    """

    def __init__(self) -> None:
        import faiss
        import torch as _torch

        _torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)

    def score(self, *args):
        from tasks.scoring import score_shard_body

        t = time.perf_counter()
        report = score_shard_body(*args)
        return report, os.getpid(), t, time.perf_counter()


def bench_ray(trained: Trained, categories, sizes: Sizes) -> RayResult:
    import ray

    from tasks.runtime import ray_init

    urls = [s.url for c in categories for s in c.test][: sizes.ray_images]
    source_root = os.path.commonpath(urls)
    per = math.ceil(len(urls) / sizes.ray_shards)
    shards = [urls[i : i + per] for i in range(0, len(urls), per)]
    ray_init(num_cpus=2)
    workers = [ray.remote(num_cpus=1)(ShardWorker).remote() for _ in range(2)]
    model_ref = (trained.store_url, trained.version)

    def run(run_id: str, n_workers: int, parts: list[list[str]]) -> float:
        t = time.perf_counter()
        refs = [workers[i % n_workers].score.remote(*model_ref, run_id, i, s, set(), source_root, "lafite", False)
                for i, s in enumerate(parts)]
        out = ray.get(refs)
        reports = [o[0] for o in out]
        assert sum(r.scored for r in reports) == sum(map(len, parts)), reports
        log(f"  {run_id}: " + ", ".join(f"pid {pid} {a - t:.1f}..{b - t:.1f} s" for _, pid, a, b in out))
        return time.perf_counter() - t

    run("warmup", 2, [urls[:1], urls[1:2]])  # both actors: imports and first model load done
    t1 = run("one-worker", 1, shards)  # every shard on actor 0, one after another
    t2 = run("two-workers", 2, shards)  # shards alternate between the two actors
    log(f"  ray: 1 worker {len(urls) / t1:.2f} images/s, 2 workers {len(urls) / t2:.2f} images/s")
    ray.shutdown()
    return RayResult(len(urls), len(shards), len(urls) / t1, len(urls) / t2, t1 / t2)


# --------------------------------------------------------------------------- end to end


@dataclass
class EndToEndResult:
    method: str
    ddim_steps: int | None
    images: int  # the large dump
    small_images: int  # the small dump, for the fixed cost
    seconds: float  # the whole command on the large dump
    small_seconds: float  # the whole command on the small dump
    images_per_s: float  # images / seconds
    marginal_images_per_s: float  # (images - small_images) / (seconds - small_seconds)


def make_dump(categories, n: int, folder: Path) -> Path:
    """``n`` of the categories' test images (repeated as needed) under their category's folder, so that
    each is scored with its category; new names, so nothing in it was scored before."""
    tests = [(c.name, s.url) for c in categories for s in c.test]
    for i in range(n):
        name, url = tests[i % len(tests)]
        dest = folder / name / f"{i:05d}{Path(url).suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(url, dest)
    return folder


def bench_endtoend(trained: Trained, categories, sizes: Sizes, tmp: Path) -> list[EndToEndResult]:
    """``lafite score`` on a small and a large dump per method (PatchCore, then LafitE); the difference
    takes out the fixed cost (Prefect's temporary server, Ray, loading the model in the workers)."""
    from lafite_core.store.ledger import read_score_tables
    from lafite_core.store.storage import Store

    small_n = max(1, sizes.dump_images // 4)
    steps = trained.model.config.scoring.ddim_steps
    env = {**os.environ, "LAFITE_LOG_DIR": str(tmp / "logs")}
    out = []

    def score(folder: Path, method: str) -> float:
        """``lafite score FOLDER --method METHOD`` in a child process: its wall seconds."""
        cmd = [sys.executable, "-m", "flows.cli", "score", str(folder), "--store", trained.store_url,
               "--model-version", trained.version, "--method", method]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return time.perf_counter() - t

    # one untimed command first: the first `lafite score` of a run pays cold caches (Python imports, Prefect's
    # database, the model's files), which would otherwise fall on PatchCore's small dump and flatter its margin
    warm_s = score(make_dump(categories, min(16, small_n), tmp / "warm-up"), "patchcore")
    log(f"  warm-up command ({min(16, small_n)} images, not counted): {warm_s:.1f} s")
    for method in ("patchcore", "lafite"):
        times = {}
        for n in (small_n, sizes.dump_images):
            times[n] = score(make_dump(categories, n, tmp / f"dump-{method}-{n}"), method)
            log(f"  {method}, {n} images: {times[n]:.1f} s")
        rows = read_score_tables(Store(trained.store_url), trained.version).to_pydict()
        scored = sum(m == method and e is None and str(tmp / "dump-") in u  # this run's dumps (not the warm-up's,
                     # nor a --store's older rows)
                     for m, e, u in zip(rows["method"], rows["error"], rows["image_url"]))
        if scored != small_n + sizes.dump_images:
            raise RuntimeError(f"{method}: {scored} of {small_n + sizes.dump_images} images scored")
        n = sizes.dump_images
        out.append(EndToEndResult(method, steps if method == "lafite" else None, n, small_n, times[n],
                                  times[small_n], n / times[n],
                                  (n - small_n) / max(times[n] - times[small_n], 1e-9)))
    return out


# --------------------------------------------------------------------------- training


@dataclass
class TrainingResult:
    precision: str
    images: int
    batch_size: int
    epochs_timed: int
    seconds_per_epoch: float
    seconds_per_epoch_per_1000_images: float
    parameters: int


def bench_training(sizes: Sizes) -> list[TrainingResult]:
    """The cpu profile's U-Net trained in fp32 and under bf16 autocast (compute.precision), one after the other."""
    from lafite_core.config import cpu_profile
    from lafite_core.method.train import train_unet

    cfg = cpu_profile().diffusion.model_copy(update={"epochs": sizes.train_epochs, "checkpoint_every": 10**6})
    feats = torch.randn(sizes.train_images, DIM, 32, 32, generator=torch.Generator().manual_seed(0))
    out = []
    for precision in ("fp32", "bf16"):
        stamps = [time.perf_counter()]
        state = train_unet(feats, cfg, 0, torch.device("cpu"), precision=precision,
                           on_epoch=lambda e, loss: stamps.append(time.perf_counter()))
        epochs = np.diff(stamps)[1:] if len(stamps) > 2 else np.diff(stamps)  # the first epoch warms up
        per = float(np.mean(epochs))
        log(f"  training {precision}: {per:.1f} s per epoch")
        out.append(TrainingResult(precision, sizes.train_images, cfg.batch_size, len(epochs), per,
                                  per / sizes.train_images * 1000, sum(p.numel() for p in state.unet.parameters())))
    return out


# --------------------------------------------------------------------------- feature store appends


@dataclass
class AppendResult:
    entries: int  # images the category held before the timed appends
    ms_per_image: float
    ratio_to_empty: float


def bench_appends(sizes: Sizes, tmp: Path, batch: int = 32, reps: int = 3) -> list[AppendResult]:
    """``FeatureStore.append`` of ``batch`` images as the category grows through ``sizes.append_entries``.

    The rows are tiny ([2, 2, 2]) so that the bookkeeping (entries, commit) is what is timed; the
    cost of writing real rows is in the extraction pair. Median of ``reps`` appends at each size."""
    from lafite_core.config import cpu_profile
    from lafite_core.store.feature_store import FeatureEntry, FeatureStore
    from lafite_core.store.storage import Store

    fs = FeatureStore(Store(tempfile.mkdtemp(dir=tmp, prefix="appends-")), cpu_profile(), {"name": "bench"})
    rows = np.zeros((batch, 2, 2, 2), np.float32)
    n, out = 0, []

    def append() -> float:
        nonlocal n
        new = [FeatureEntry(f"img-{i:07d}", f"s3://bucket/line-3/2026-11-30/camera-2/img-{i:07d}.png", f"{i:064x}")
               for i in range(n, n + batch)]
        t0 = time.perf_counter()
        fs.append("bench", "category", new, rows)
        n += batch
        return time.perf_counter() - t0

    for mark in sizes.append_entries:
        while n < mark:
            append()
        ms = 1e3 * statistics.median(append() for _ in range(reps)) / batch
        empty = out[0].ms_per_image if out else ms
        out.append(AppendResult(mark, ms, ms / empty))
        log(f"  append at {mark} entries: {ms:.2f} ms an image ({ms / empty:.2f}x empty)")
    return out


# --------------------------------------------------------------------------- report


def markdown(res: dict, quick: bool) -> str:
    m = res["machine"]
    out = ["# Speed benchmark", ""]
    if quick:
        out += ["**QUICK SMOKE RUN** (small sizes): checks that the benchmark runs; the figures are noisy.", ""]
    out += [f"- machine: {m['line']}", f"- torch threads {m['torch_threads']}; faiss OpenMP threads "
            f"{res['faiss_threads']}; glibc malloc tunables from tasks.runtime: {res['malloc_env']}",
            f"- load average at the end: {res['load_end']}; other work on the machine skews every figure, "
            f"the pairs less than the absolute numbers", f"- total time {res['seconds'] / 60:.1f} min", ""]
    if (es := res.get("extraction")):
        out += ["## Feature extraction", "",
                f"Batch {es[0]['batch_size']}: whole data path (read, decode, resize, backbone, aggregation, Zarr "
                f"write) vs. bare backbone forward on in-memory tensors of the same images. Loading: read, "
                f"decode, resize (and mask, hash) of up to 256 images spread over the set, CPU time of one thread. "
                f"Bound: a ceiling from loading alone, assuming the backbone keeps the "
                f"{len(os.sched_getaffinity(0))} cores busy and loading shares them perfectly, backbone / (backbone "
                f"+ loading / cores) per image; the Zarr write and tensor copies are not in it.", "",
                "| data | images | whole path (images/s) | bare backbone (images/s) | ratio | loading (core-ms an image) "
                "| bound | target |",
                "|---|---|---|---|---|---|---|---|"]
        for e in es:
            ok = "meets" if e["ratio"] >= e["target"] else "MISSES"
            out.append(f"| {e['data']} | {e['images']} | {e['pipeline_images_per_s']:.1f} | "
                       f"{e['bare_backbone_images_per_s']:.1f} | {e['ratio']:.2f} | {e.get('load_core_ms', 0):.1f} | "
                       f"{e.get('bound', 0):.2f} | >= {e['target']} ({ok}) |")
        out.append("")
    if (k := res.get("knn")):
        out += ["## Nearest-neighbour search (editing and PatchCore)", "",
                "Queries/s, exact search, 192-d; a call holds 1,024 patches per image.", "",
                "| bank | K | queries per call | faiss | torch matmul | torch / faiss | top-1 agreement |",
                "|---|---|---|---|---|---|---|"]
        for r in k:
            out.append(f"| {r['bank']:,} | {r['k']} | {r['call_queries']:,} | {r['faiss_queries_per_s']:,.0f} | "
                       f"{r['torch_queries_per_s']:,.0f} | {r['torch_over_faiss']:.2f} | {r['top1_agreement']:.4f} |")
        faster = sum(r["torch_over_faiss"] > 1 for r in k)
        out += ["", f"torch faster in {faster} of {len(k)} settings; editing and PatchCore use faiss "
                f"(lafite_core.method.model.Scorer -> FaissKNN).", ""]
    if (c := res.get("coreset")):
        per = [r["seconds_per_million"] for r in c if r["torch_threads"] == c[0]["torch_threads"]]
        out += ["## Coreset construction (default CoresetConfig)", "",
                "Clustered random 192-d patches in MVTec-size groups (240 images x 1,024 patches), string "
                "group keys as coreset.patch_bank passes them; one child process per size; peak RSS growth = "
                "peak RSS - resident memory before the input was made (so it includes the input).", "",
                "| patches | torch threads | groups | chunks | selected | s | s per million | input GB | "
                "peak RSS growth GB |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in c:
            out.append(f"| {r['patches']:,} | {r['torch_threads']} | {r['groups']} | {r['chunks']} | {r['selected']:,} | {r['seconds']:.1f} | "
                       f"{r['seconds_per_million']:.1f} | {r['input_gb']:.2f} | {r['peak_rss_growth_gb']:.2f} |")
        out += ["", f"s per million patches, largest / smallest size at {c[0]['torch_threads']} threads: "
                f"{per[-1] / per[0]:.2f} (1.0 = linear). The last row repeats the smallest size at one thread: "
                f"torch's intra-op threads stall each other in the greedy loop's tiny ops when the machine is busy.",
                ""]
    if (s := res.get("scoring")):
        out += ["## Scoring (from features)", "", f"Model: {res['model_source']}. Scorer.score on "
                f"{s[0]['images']} test images' features, batch {res['scoring_batch']}, CPU.", "",
                "| method | DDIM steps | torch threads | images/s | PatchCore speed / this |", "|---|---|---|---|---|"]
        for r in s:
            out.append(f"| {r['method']} | {r['ddim_steps'] or '-'} | {r['torch_threads']} | {r['images_per_s']:.2f} | "
                       f"{r['patchcore_over_this']:.1f} |")
        out.append("")
    if (pl := res.get("pooling")):
        out += [f"Image score (max of the map's k x k window means, {pl[0]['image_size']} px maps, batch of 16, best of "
                "5, ms an image): " + "; ".join(
                    f"k = {r['pool']}: avg_pool2d {r['avg_pool2d_ms']:.2f} vs summed-area table {r['box_mean_ms']:.2f} "
                    f"({r['avg_pool2d_ms'] / r['box_mean_ms']:.0f}x)" for r in pl), ""]
    if (r := res.get("compile")):
        verdict = "wins" if r["wins"] else "loses: not kept as a setting"
        out += ["## torch.compile for the U-Net (CPU)", "",
                f"LafitE from features, {r['images']} images in batches of {r['batch']} at {r['ddim_steps']} DDIM "
                f"step(s), the compile time counted (it falls in the first batch). Scores differ by at most "
                f"{r['max_abs_score_difference']:.2e} (largest score {r['max_score']:.3g}).", "",
                "| U-Net | first batch (s) | all images (s) | steady images/s |", "|---|---|---|---|",
                f"| eager | {r['eager_first_batch_seconds']:.1f} | {r['eager_seconds']:.1f} | "
                f"{r['eager_steady_images_per_s']:.1f} |",
                f"| torch.compile | {r['compiled_first_batch_seconds']:.1f} | {r['compiled_seconds']:.1f} | "
                f"{r['compiled_steady_images_per_s']:.1f} |", "",
                f"torch.compile after its compile time: {verdict}.", ""]
    if (r := res.get("search")):
        st, pr = r["stage_seconds"], r["profile"]
        steps = ", ".join(f"{p['ddim_steps']}: {100 * p['image_auroc']:.1f} ({p['seconds']:.1f} s)" for p in r["step_points"])
        ok = "meets" if pr["ratio"] <= r["target"] else "MISSES"
        ok_rest = "meets" if pr["ratio_with_rest"] <= r["target"] else "MISSES"
        c = pr["chosen"]
        out += ["## Search vs one scoring pass", "",
                f"Model: {res['model_source']}. Pseudo-validation set of {r['pseudo_images']} images (built and "
                f"extracted in {r['build_seconds']:.1f} s). The pass is one LafitE pass over the whole set at the "
                "chosen point: the bank neighbours, the U-Net, the maps and the search's metrics.", "",
                f"The cpu profile's search, as `fit` runs it (`search.images_per_category` = {pr['images_per_category']}, "
                f"`search.steps_patience` = {pr['steps_patience']}): {pr['points']} points on {pr['images']} of "
                f"{r['pseudo_images']} images, then the chosen point ({c['tau']} / {c['k']} / {c['ddim_steps']}) scored "
                "on the other images for the calibration.", "",
                "| search (s) | chosen point on the rest (s) | one pass (s) | search / pass | (search + rest) / pass | target |",
                "|---|---|---|---|---|---|",
                f"| {pr['search_seconds']:.1f} | {pr['calibration_rest_seconds']:.1f} | {pr['pass_seconds']:.1f} | "
                f"{pr['ratio']:.1f} ({ok}) | {pr['ratio_with_rest']:.1f} ({ok_rest}) | <= {r['target']:g} |", "",
                f"The same search on the whole set, every point and DDIM step count scored: tau {st['tau']:.1f} s, K "
                f"{st['k']:.1f} s (with the bank neighbours, searched once), DDIM steps {st['steps']:.1f} s. Steps "
                f"stage, detection AUROC (seconds): {steps}. Each `search.steps_patience` row replays the search's "
                "rule over those points (the same seconds).", "",
                "| steps_patience | points | U-Net passes | step counts scored | chosen tau / K / steps | search (s) "
                "| one pass (s) | ratio |", "|---|---|---|---|---|---|---|---|"]
        for v in r["variants"]:
            mark = " (cpu profile)" if v["steps_patience"] == r["headline_patience"] else ""
            c = v["chosen"]
            out.append(f"| {v['steps_patience']}{mark} | {v['points']} | {v['u_net_passes']} | "
                       f"{', '.join(map(str, v['steps_scored']))} | {c['tau']} / {c['k']} / {c['ddim_steps']} | "
                       f"{v['search_seconds']:.1f} | {v['pass_seconds']:.1f} | {v['ratio']:.1f} |")
        ref = r["reference"]
        out += ["", f"Subsets against the whole set: the cpu profile's rule replayed over the whole set's per-image "
                f"scores on {r['draws']} seeded draws of each size. The whole set picks {ref['tau']} / {ref['k']} / "
                f"{ref['ddim_steps']} (detection AUROC {100 * ref['image_auroc']:.2f}); 'lost' is the whole set's "
                "detection AUROC at the subset's pick below that, in points.", "",
                "| images a category | share of the set | same tau | same tau, K, steps | lost, mean | lost, max |",
                "|---|---|---|---|---|---|"]
        for sb in r["stability"]:
            out.append(f"| {sb['images_per_category']} | {sb['fraction']:.2f} | {sb['same_tau']:.2f} | "
                       f"{sb['same_point']:.2f} | {100 * sb['auroc_lost_mean']:.2f} | {100 * sb['auroc_lost_max']:.2f} |")
        out.append("")
    if (r := res.get("ray")):
        ok = "meets" if r["speedup"] >= r["target"] else "MISSES"
        out += ["## Ray batch scoring", "",
                f"{r['images']} images in {r['shards']} shards through tasks.scoring.score_shard_body on 1 or 2 "
                f"warm Ray actors (one CPU each) "
                f"(read, decode, extract, score, Parquet part; the warm-up loads the model and backbone once per "
                f"worker); "
                f"torch and faiss at {r['threads_per_worker']} thread per worker.", "",
                "| 1 worker (images/s) | 2 workers (images/s) | speedup | target |", "|---|---|---|---|",
                f"| {r['one_worker_images_per_s']:.2f} | {r['two_workers_images_per_s']:.2f} | {r['speedup']:.2f} | "
                f">= {r['target']} ({ok}) |", ""]
    if (ts := res.get("training")):
        t = ts[0]
        by = {r["precision"]: r["seconds_per_epoch"] for r in ts}
        speedup = by["fp32"] / by["bf16"]
        from lafite_core.method.precision import cpu_bf16_flags

        flags = ", ".join(cpu_bf16_flags()) or "neither AMX nor AVX512-BF16 (bf16 is emulated)"
        out += ["## U-Net training (cpu profile)", "",
                f"Random features [{t['images']}, 192, 32, 32], batch {t['batch_size']}, {t['parameters']:,} "
                f"parameters; mean of {t['epochs_timed']} epoch(s) after the first; fp32, then bf16 autocast "
                f"(compute.precision); this CPU reports {flags}.", "",
                "| precision | s per epoch | s per epoch per 1,000 images |", "|---|---|---|"]
        out += [f"| {r['precision']} | {r['seconds_per_epoch']:.1f} | {r['seconds_per_epoch_per_1000_images']:.1f} |"
                for r in ts]
        out += ["", f"bf16 speedup {speedup:.2f}x (target >= 1.8x on a CPU with AMX: "
                f"{'meets' if speedup >= 1.8 else 'MISSES'}; `compute.precision=auto` picks bf16 only where the "
                f"CPU reports bf16 units).", ""]
    if (ap := res.get("appends")):
        worst = max(r["ratio_to_empty"] for r in ap)
        out += ["## Feature store: appends as a category grows", "",
                "`FeatureStore.append` of 32 images (entries and tiny feature rows: the bookkeeping is timed, "
                "the cost of real rows is in the extraction pair), median of 3, as the category already holds "
                "more images, against the append into an empty category.", "",
                "| images in the category | ms an image | vs empty |", "|---|---|---|"]
        out += [f"| {r['entries']:,} | {r['ms_per_image']:.2f} | {r['ratio_to_empty']:.2f} |" for r in ap]
        out += ["", f"Largest ratio {worst:.2f} (target: flat, <= 1.5: {'meets' if worst <= 1.5 else 'MISSES'}).", ""]
    if (ee := res.get("endtoend")):
        by = {r["method"]: r for r in ee}
        ratio = by["lafite"]["marginal_images_per_s"] / by["patchcore"]["marginal_images_per_s"]
        ratio_all = by["lafite"]["images_per_s"] / by["patchcore"]["images_per_s"]
        out += ["## End to end: `lafite score` on a dump", "",
                f"Model: {res['model_source']}. `lafite score DUMP --method M` in a child process (Prefect's "
                f"temporary server, local Ray, listing, read, decode, extract, score, Parquet, report) on a dump "
                f"of {ee[0]['small_images']} and one of {ee[0]['images']} of the test images (repeated, new "
                f"names), after one untimed warm-up command; marginal = the difference in images over the "
                f"difference in seconds, which takes out the fixed cost of a command.", "",
                "| method | DDIM steps | small dump s | large dump s | images/s (whole command, large) | "
                "images/s (marginal) |", "|---|---|---|---|---|---|"]
        out += [f"| {r['method']} | {r['ddim_steps'] or '-'} | {r['small_seconds']:.1f} | {r['seconds']:.1f} | "
                f"{r['images_per_s']:.2f} | {r['marginal_images_per_s']:.2f} |" for r in ee]
        out += ["", f"LafitE / PatchCore images/s: {ratio:.2f} marginal, {ratio_all:.2f} whole command "
                f"(target >= 0.5: {'meets' if ratio >= 0.5 else 'MISSES'})", ""]
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run with small sizes (about 2 minutes)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these sections")
    p.add_argument("--data-root", default=None, help="MVTec-layout images (default ../shared/data/mpdd, else demo data)")
    p.add_argument("--store", default=None, help="score with a published model from this store instead of training")
    p.add_argument("--model-version", default=None, help="with --store: the version (default latest)")
    p.add_argument("--relist", action="store_true", help="with --store: rebuild the model's inverted lists by today's "
                   "rule (in a temporary copy) before scoring; a model otherwise keeps the lists it was built with")
    p.add_argument("--coreset-sizes", type=int, nargs="+", default=None,
                   help="patch counts for the coreset section (default 100k 400k 1.6M 3.7M; quick 20k 40k)")
    p.add_argument("--dump-images", type=int, default=None,
                   help="images in the end-to-end section's large dump (default 600; quick 24); the small one is a quarter")
    p.add_argument("--out", default=None, help="output stem (default bench/results/speed[_quick])")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.coreset_sizes:
        sizes = dataclasses.replace(sizes, coreset_patches=tuple(args.coreset_sizes))
    if args.dump_images:
        sizes = dataclasses.replace(sizes, dump_images=args.dump_images)
    started = time.perf_counter()
    mach = machine()
    print(f"machine: {mach.line()}", flush=True)
    import faiss

    res: dict = {"machine": {**asdict(mach), "line": mach.line()}, "quick": args.quick, "sizes": asdict(sizes),
                 "faiss_threads": faiss.omp_get_max_threads(),
                 "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    tmp = Path(tempfile.mkdtemp(prefix="lafite-speed-"))
    try:
        need_data = {"extraction", "scoring", "compile", "search", "ray", "endtoend"} & set(args.only)
        if need_data:
            from lafite_core.method.backbone import FeatureExtractor
            from lafite_core.config import cpu_profile

            root, categories = find_categories(args.data_root, tmp)
            res["data_root"] = root
            cfg = cpu_profile()
            extractor = FeatureExtractor(cfg.backbone)
        if "extraction" in args.only:
            log("extraction ...")
            res["extraction"] = [asdict(r) for r in bench_extraction(categories, cfg, extractor, sizes, tmp)]
        if "knn" in args.only:
            log("knn ...")
            res["knn"] = [asdict(r) for r in bench_knn(sizes)]
        if "coreset" in args.only:
            log("coreset ...")
            res["coreset"] = [asdict(r) for r in bench_coreset(sizes)]
        if {"scoring", "compile", "search", "ray", "endtoend"} & set(args.only):
            trained = trained_model(args, categories, sizes, extractor, tmp)
            res["model_source"] = trained.source
            res["scoring_batch"] = trained.model.config.scoring.batch_size
            if args.store:  # a real model scores (and searches) its own categories only
                categories = [c for c in categories if c.key in trained.model.categories]
                if not categories:
                    raise SystemExit(f"none of the model's categories {trained.model.categories} is under {root}")
            if "scoring" in args.only:
                log("scoring ...")
                res["scoring"] = [asdict(r) for r in bench_scoring(trained, categories, extractor, sizes)]
                res["pooling"] = bench_pooling(trained.model.config.data.image_size)
            if "compile" in args.only:
                log("compile ...")
                res["compile"] = bench_compile(trained, categories, extractor, sizes)
            if "search" in args.only:
                log("search ...")
                res["search"] = bench_search(trained, categories, extractor)
            if "ray" in args.only:
                log("ray ...")
                res["ray"] = asdict(bench_ray(trained, categories, sizes))
            if "endtoend" in args.only:
                log("end to end ...")
                res["endtoend"] = [asdict(r) for r in bench_endtoend(trained, categories, sizes, tmp)]
        if "training" in args.only:
            log("training ...")
            res["training"] = [asdict(r) for r in bench_training(sizes)]
        if "appends" in args.only:
            log("appends ...")
            res["appends"] = [asdict(r) for r in bench_appends(sizes, tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = time.perf_counter() - started
    res["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stem = out_stem(args.out, "speed", args.quick)
    text = markdown(res, args.quick)
    write_json(stem.parent / (stem.name + ".json"), res)
    write_text(stem.parent / (stem.name + ".md"), text)
    print(json.dumps(res, indent=2, default=str))
    print(text)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == CHILD_FLAG:
        coreset_child(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
