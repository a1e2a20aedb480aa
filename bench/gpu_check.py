"""GPU check for the ``paper`` profile: training and scoring speed, peak memory, CPU/GPU agreement.

Run through ``bash bench/gpu.sh`` on a machine with an NVIDIA GPU (estimated 4-6 minutes after the
environment exists). "fp32" on CUDA is torch's default: TF32 convolutions in cuDNN (recorded in the output). Measured, each beside its reference in the same run:

- EfficientNet-B4 feature extraction, images/s at batch 64 (224 x 224 input);
- U-Net (256, (1, 2, 3, 4)) training steps/s at batch 64 on [64, 272, 32, 32] features, fp32: through
  ``lafite_core.method.train.train_unet`` (its loop, data indexing and logging) and a bare loop (the
  same model, loss and optimiser; both draw their noise on the GPU);
- scoring images/s at batch 64 in fp32 (``Scorer.score``, paper DDIM steps) with the nearest-neighbour
  search the library picks on the device (faiss on a GPU build, else ``TorchKNN``) and, where that is
  not already it, ``TorchKNN``; LafitE without editing; PatchCore (its own recipe and bank);
- peak GPU memory (``torch.cuda.max_memory_allocated``) of each stage;
- CPU vs GPU agreement: the same model, features and noise seeds scored on both devices; max
  absolute and relative differences of the anomaly maps and image scores;
- issue 11's pairs on the GPU: U-Net training steps/s and LafitE scoring images/s in fp32 vs bf16
  autocast (``compute.precision``), with the bf16 scores' difference from fp32; and LafitE vs
  PatchCore end to end on generated camera-sized JPEGs (read, decode, resize, B4 features, scoring:
  ``stages.load_all`` and ``stages.score_images``, the functions a scoring shard runs, without
  Prefect and Ray), at the profile's DDIM steps and at 1 step.

The B4 weights come from the timm hub. When it is unreachable, the check falls back to RANDOM B4
weights (loudly, and recorded in the output): speed and agreement do not depend on the weights.
The U-Net is not trained to convergence either: its zero-initialised layers are filled with small
seeded random values so that the agreement check exercises every layer.

Exits with status 2 and a message when no CUDA GPU is visible. ``--cpu-smoke`` runs every stage on
the CPU with tiny sizes, only to check the code paths on a machine without a GPU.
"""

from __future__ import annotations

import os

# a hub that cannot be reached should fail fast rather than hang the check
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

# the project from its source tree, installed or not (a GPU machine may have torch but not lafite)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import camera_jpegs, machine, out_stem, write_json, write_text  # noqa: E402

BANNER = "!" * 100


@dataclass(frozen=True)
class Sizes:
    batch: int
    backbone_batches: int
    train_steps: int  # per timed epoch
    bare_steps: int
    score_images: int
    bank: int
    agree_images: int
    ddim_steps: int | None  # None: the profile's
    e2e_images: int  # generated JPEG files scored end to end by each method
    e2e_size: tuple[int, int]  # their width and height


GPU = Sizes(batch=64, backbone_batches=5, train_steps=20, bare_steps=20, score_images=256, bank=50_000,
            agree_images=4, ddim_steps=None, e2e_images=256, e2e_size=(2000, 1500))
CPU_SMOKE = Sizes(batch=2, backbone_batches=1, train_steps=2, bare_steps=2, score_images=2, bank=2_000,
                  agree_images=2, ddim_steps=2, e2e_images=3, e2e_size=(96, 72))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


# --------------------------------------------------------------------------- backbone


def build_extractor(cfg, checkpoint: str | None, force_random: bool):
    """(FeatureExtractor, weights note); falls back to random B4 weights when the hub is unreachable."""
    from lafite_core.method.backbone import FeatureExtractor, WeightsUnavailableError

    bb = cfg.backbone.model_copy(update={"checkpoint": checkpoint}) if checkpoint else cfg.backbone
    if not force_random:
        try:
            ext = FeatureExtractor(bb)
            return ext, ext.info.weights_source
        except WeightsUnavailableError as exc:
            log(f"{BANNER}\nB4 WEIGHTS UNAVAILABLE ({exc}).\nFALLING BACK TO RANDOM B4 WEIGHTS FOR THIS SPEED "
                f"CHECK ONLY: the figures are speeds and CPU/GPU agreement, not accuracy.\n{BANNER}")
    ext = FeatureExtractor(bb.model_copy(update={"allow_random_weights": True, "checkpoint": None}))
    return ext, "RANDOM (hub unreachable or --cpu-smoke; speed only)"


@dataclass
class BackboneResult:
    name: str
    weights: str
    feature_dim: int
    batch: int
    images_per_s: float
    peak_gb: float | None


def bench_backbone(extractor, cfg, sizes: Sizes, device: torch.device, note: str) -> BackboneResult:
    s = cfg.data.image_size
    x = torch.rand(sizes.batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    extractor(x)
    sync(device)
    reset_peak(device)
    t = time.perf_counter()
    for _ in range(sizes.backbone_batches):
        extractor(x)
    sync(device)
    rate = sizes.batch * sizes.backbone_batches / (time.perf_counter() - t)
    log(f"  backbone: {rate:.1f} images/s")
    return BackboneResult(cfg.backbone.name, note, extractor.info.feature_dim, sizes.batch, rate, peak_gb(device))


# --------------------------------------------------------------------------- training


@dataclass
class TrainingResult:
    batch: int
    feature_shape: tuple[int, ...]
    parameters: int
    library_steps_per_s: float
    bare_steps_per_s: float
    library_over_bare: float
    peak_gb_library: float | None
    peak_gb_bare: float | None


def library_steps(cfg, dim: int, sizes: Sizes, device: torch.device, precision: str = "fp32"):
    """(steps/s through train_unet in its second epoch, peak GB, the trained state) at ``precision``."""
    from lafite_core.method.train import train_unet

    size = cfg.backbone.feature_size
    dcfg = cfg.diffusion.model_copy(update={"epochs": 2, "checkpoint_every": 10**6, "batch_size": sizes.batch})
    n = sizes.batch * sizes.train_steps
    feats = torch.randn(n, dim, size, size, generator=torch.Generator().manual_seed(1))
    reset_peak(device)
    stamps: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    stamps.append(time.perf_counter())
    state = train_unet(feats, dcfg, 0, device, on_epoch=on_epoch, precision=precision)
    rate = sizes.train_steps / (stamps[2] - stamps[1])
    log(f"  training (train_unet, {precision}): {rate:.2f} steps/s")
    return rate, peak_gb(device), state


def bench_training(cfg, dim: int, sizes: Sizes, device: torch.device):
    """steps/s through train_unet (second epoch) and through a bare loop with GPU-side randomness."""
    from lafite_core.method.schedule import add_noise, cosine_schedule
    from lafite_core.method.train import new_state

    size = cfg.backbone.feature_size
    dcfg = cfg.diffusion.model_copy(update={"epochs": 2, "checkpoint_every": 10**6, "batch_size": sizes.batch})
    feats = torch.randn(sizes.batch, dim, size, size, generator=torch.Generator().manual_seed(1))
    lib, lib_peak, state = library_steps(cfg, dim, sizes, device)

    bare_state = new_state(dim, size, dcfg, 0, device)
    unet, opt = bare_state.unet, bare_state.optimizer
    ab = torch.tensor(cosine_schedule(dcfg.timesteps).alphas_cumprod, dtype=torch.float32, device=device)
    data = feats.to(device)
    g = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        t = torch.randint(0, dcfg.timesteps, (sizes.batch,), generator=g, device=device)
        eps = torch.randn(data.shape, generator=g, device=device)
        loss = F.mse_loss(unet(add_noise(data, eps, ab[t]), t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    unet.train()
    for _ in range(2):
        step()
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(sizes.bare_steps):
        step()
    sync(device)
    bare = sizes.bare_steps / (time.perf_counter() - t0)
    log(f"  training (bare loop): {bare:.2f} steps/s")
    params = sum(p.numel() for p in state.unet.parameters())
    result = TrainingResult(sizes.batch, (sizes.batch, dim, size, size), params, lib, bare, lib / bare, lib_peak,
                            peak_gb(device))
    return result, state.unet


# --------------------------------------------------------------------------- a model to score with


def fill_zero_layers(unet: torch.nn.Module, seed: int, std: float = 0.02) -> int:
    """Add small seeded noise to the weights of the U-Net's zero-initialised layers (residual branch
    outputs, attention projections, the output convolution), which a few training steps leave near
    zero, so that the agreement check exercises every layer. Returns how many layers changed."""
    from lafite_core.method.unet import AttentionBlock, ResBlock

    layers = [unet.out[-1]]
    layers += [m.out_layers[-1] for m in unet.modules() if isinstance(m, ResBlock)]
    layers += [m.proj for m in unet.modules() if isinstance(m, AttentionBlock)]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            w.add_((torch.randn(w.shape, generator=g) * std).to(w.device))
    return len(layers)


def make_model(cfg, unet, card: dict, dim: int, bank_size: int):
    """A LafiteModel from the given U-Net (frozen, no gradients): statistics of random features, a
    clustered random bank in LafitE's view and, for PatchCore's own recipe, one in its view a tenth of
    LafitE's size; ``card`` is the backbone's (levels and strides)."""
    from lafite_core.method.model import LafiteModel
    from lafite_core.method.normalize import FeatureStats
    from lafite_core.method.views import apply_view, native_grids

    rng = np.random.default_rng(0)
    size = cfg.backbone.feature_size
    raw = torch.from_numpy(rng.standard_normal((8, dim, size, size), dtype=np.float32))
    channels, grids = tuple(card["channels"]), native_grids(card, cfg.data.image_size)
    view = apply_view(raw, cfg.features, channels, grids)
    stats = FeatureStats.fit(view)
    d = view.shape[1]
    centres = rng.standard_normal((512, d), dtype=np.float32)
    bank = centres[rng.integers(512, size=bank_size)] + 0.5 * rng.standard_normal((bank_size, d), dtype=np.float32)
    baseline = None
    if cfg.baseline.recipe == "patchcore":  # a tenth of LafitE's rows, as a 1% coreset is of a 10% one
        d2 = apply_view(raw[:1], cfg.baseline.view, channels, grids).shape[1]
        m = max(bank_size // 10, 1)
        centres = rng.standard_normal((512, d2), dtype=np.float32)
        baseline = centres[rng.integers(512, size=m)] + 0.5 * rng.standard_normal((m, d2), dtype=np.float32)
    unet = unet.cpu().eval().requires_grad_(False)
    for p in unet.parameters():
        p.grad = None  # training's last gradients would follow the weights to the GPU
    return LafiteModel(config=cfg, stats=stats, unet=unet, bank=bank, categories=("bench/random",),
                       backbone=card, baseline_bank=baseline)


def raw_features(n: int, dim: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoringResult:
    method: str
    knn: str
    precision: str
    ddim_steps: int
    batch: int
    images: int
    images_per_s: float
    peak_gb: float | None


def knn_name(knn, device: torch.device) -> str:
    on_gpu = getattr(knn, "on_gpu", None)
    where = device.type if on_gpu is None else ("GPU" if on_gpu else "CPU")
    return f"{type(knn).__name__} ({where})"


def at_precision(model, precision: str = "fp32"):
    """``model`` scoring at ``compute.precision`` = ``precision`` (the paper profile's ``auto`` picks
    bf16 on CUDA)."""
    return dataclasses.replace(model, config=model.config.with_updates(compute={"precision": precision}))


def bench_scoring(model, sizes: Sizes, device: torch.device) -> list[ScoringResult]:
    from lafite_core.method.knn import TorchKNN
    from lafite_core.method.model import Scorer

    model = at_precision(model)
    cfg = model.config
    feats = raw_features(sizes.score_images, model.feature_dim, cfg.backbone.feature_size, 2)
    seeds = list(range(sizes.score_images))
    out = []
    picked = Scorer(model, device)  # the search the library picks on this device
    runs = [("lafite", picked, knn_name(picked.knn, device))]
    if not isinstance(picked.knn, TorchKNN):
        torch_scorer = Scorer(model, device)
        torch_scorer.knn = TorchKNN(model.bank, device=str(device))
        runs.append(("lafite", torch_scorer, knn_name(torch_scorer.knn, device)))
    runs += [("lafite_no_edit", picked, "-"),
             ("patchcore", picked, knn_name(picked.baseline_knn or picked.knn, device))]
    warm = min(sizes.batch, len(seeds))
    for method, scorer, name in runs:
        scorer.score(feats[:warm], method, seeds[:warm])  # warm-up at the timed batch shape
        sync(device)
        reset_peak(device)
        t = time.perf_counter()
        scorer.score(feats, method, seeds)
        sync(device)
        rate = len(seeds) / (time.perf_counter() - t)
        log(f"  scoring {method} with {name}: {rate:.1f} images/s")
        out.append(ScoringResult(method, name, scorer.precision, cfg.scoring.ddim_steps, cfg.scoring.batch_size,
                                 len(seeds), rate, peak_gb(device)))
    return out


# --------------------------------------------------------------------------- agreement


@dataclass
class AgreementResult:
    method: str
    images: int
    map_max_abs: float
    map_max_rel: float
    score_max_abs: float
    score_max_rel: float
    map_scale: float


def check_agreement(model, sizes: Sizes, device: torch.device) -> list[AgreementResult]:
    """Same model, features and noise seeds on CPU and on ``device``; max differences of the outputs.

    Relative differences are divided by the largest absolute CPU value of the same output.
    """
    from lafite_core.method.model import Scorer

    model = at_precision(model)  # both devices in fp32: bf16 would hide the devices' own difference
    cfg = model.config
    feats = raw_features(sizes.agree_images, model.feature_dim, cfg.backbone.feature_size, 3)
    seeds = [1000 + i for i in range(sizes.agree_images)]
    out = []
    for method in ("lafite", "lafite_no_edit", "patchcore"):
        cpu = Scorer(model, "cpu").score(feats, method, seeds)
        dev = Scorer(model, device).score(feats, method, seeds)
        model.unet.cpu()
        dm = (cpu.maps - dev.maps).abs().max().item()
        ds = (cpu.scores - dev.scores).abs().max().item()
        scale_m = cpu.maps.abs().max().item()
        scale_s = cpu.scores.abs().max().item()
        out.append(AgreementResult(method, len(seeds), dm, dm / max(scale_m, 1e-30), ds, ds / max(scale_s, 1e-30),
                                   scale_m))
        log(f"  agreement {method}: maps max abs {dm:.3g} (rel {dm / max(scale_m, 1e-30):.3g}), "
            f"scores max abs {ds:.3g}")
    return out


# --------------------------------------------------------------------------- issue 11's pairs


@dataclass
class PrecisionResult:
    train_fp32_steps_per_s: float
    train_bf16_steps_per_s: float
    train_speedup: float
    score_fp32_images_per_s: float
    score_bf16_images_per_s: float
    score_speedup: float
    score_max_abs: float  # bf16 vs fp32 image scores, same features and noise seeds
    score_max_rel: float
    ddim_steps: int


def bench_precision(model, dim: int, sizes: Sizes, device: torch.device) -> PrecisionResult:
    """U-Net training and LafitE scoring in fp32 and under bf16 autocast on ``device``, side by side."""
    from lafite_core.method.model import Scorer

    cfg = model.config
    train = {p: library_steps(cfg, dim, sizes, device, p)[0] for p in ("fp32", "bf16")}
    feats = raw_features(sizes.score_images, model.feature_dim, cfg.backbone.feature_size, 4)
    seeds = list(range(sizes.score_images))
    rate, scores = {}, {}
    for p in ("fp32", "bf16"):
        scorer = Scorer(at_precision(model, p), device)
        warm = min(sizes.batch, len(seeds))
        scorer.score(feats[:warm], "lafite", seeds[:warm])  # warm-up at the timed batch shape
        sync(device)
        t = time.perf_counter()
        scores[p] = scorer.score(feats, "lafite", seeds).scores
        sync(device)
        rate[p] = len(seeds) / (time.perf_counter() - t)
        log(f"  scoring lafite {p}: {rate[p]:.1f} images/s")
    diff = (scores["fp32"] - scores["bf16"]).abs().max().item()
    rel = diff / max(scores["fp32"].abs().max().item(), 1e-30)
    return PrecisionResult(train["fp32"], train["bf16"], train["bf16"] / train["fp32"], rate["fp32"], rate["bf16"],
                           rate["bf16"] / rate["fp32"], diff, rel, cfg.scoring.ddim_steps)


@dataclass
class EndToEndResult:
    method: str
    ddim_steps: int | None
    precision: str  # the U-Net's, as compute.precision=auto resolves it on the device
    images: int
    size: str  # width x height of the files
    images_per_s: float


def bench_end_to_end(model, extractor, sizes: Sizes, device: torch.device, tmp) -> list[EndToEndResult]:
    """LafitE (at the profile's DDIM steps and at 1) vs PatchCore from JPEG files (camera-sized on the
    GPU: the dump a quality engineer scores): read, decode, resize, features, scores, each method on
    its own over the same files."""
    from lafite_core.datapath.data import discover
    from lafite_core.method.model import Scorer
    from lafite_core.stages import load_all, score_images

    root = camera_jpegs(sizes.e2e_images, tmp, sizes.e2e_size)
    samples = [s for c in discover(str(root)) for s in c.train]
    cfg = model.config
    runs = [("patchcore", None), ("lafite", cfg.scoring.ddim_steps), ("lafite", 1)]
    out = []
    for method, steps in runs:
        m = model if steps is None else model.with_hyperparameters(model.tau, model.k, steps)
        scorer = Scorer(m, device)

        def run(part):
            loaded, bad = load_all(part, cfg)
            assert not bad, bad
            return score_images(scorer, extractor, [s.image for s in loaded], [s.content_hash for s in loaded],
                                (method,))

        run(samples[:2])  # warm-up
        sync(device)
        t = time.perf_counter()
        run(samples)
        sync(device)
        rate = len(samples) / (time.perf_counter() - t)
        log(f"  end to end {method} ({steps or '-'} steps): {rate:.1f} images/s")
        out.append(EndToEndResult(method, steps, scorer.precision, len(samples), "x".join(map(str, sizes.e2e_size)),
                                  rate))
    return out


# --------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    out = ["# GPU check (paper profile)", ""]
    if res["cpu_smoke"]:
        out += ["**CPU SMOKE RUN**: every stage on the CPU with tiny sizes to check the code paths; no GPU figure.",
                ""]
    b = res["backbone"]
    if b["weights"].startswith("RANDOM"):
        out += [f"**B4 WEIGHTS: {b['weights']}** -- speeds and agreement only.", ""]
    out += [f"- device: {res['device']}", f"- machine: {res['machine']}",
            f"- torch {res['torch']}, CUDA {res['cuda']}, cuDNN {res['cudnn']}; TF32 matmul {res['tf32_matmul']}, "
            f"TF32 cuDNN {res['tf32_cudnn']}", f"- faiss: {res['faiss']}", f"- total time {res['seconds']:.0f} s", "",
            "## Feature extraction", "", "| backbone | weights | D | batch | images/s | peak GB |", "|---|---|---|---|---|---|",
            f"| {b['name']} | {b['weights']} | {b['feature_dim']} | {b['batch']} | {b['images_per_s']:.1f} | "
            f"{fmt(b['peak_gb'])} |", ""]
    t = res["training"]
    out += ["## U-Net training", "", f"Features {t['feature_shape']}, {t['parameters']:,} parameters, AdamW.", "",
            "| train_unet steps/s (fp32) | bare loop steps/s (fp32) | ratio | peak GB (train_unet / bare) |",
            "|---|---|---|---|",
            f"| {t['library_steps_per_s']:.2f} | {t['bare_steps_per_s']:.2f} | {t['library_over_bare']:.2f} | "
            f"{fmt(t['peak_gb_library'])} / {fmt(t['peak_gb_bare'])} |", "",
            "## Scoring (from features)", "",
            f"LafitE's bank {res['bank']:,} rows, PatchCore's {res['baseline_bank']:,}; images/s through Scorer.score.", "",
            "| method | kNN | precision | DDIM steps | batch | images | images/s | peak GB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in res["scoring"]:
        out.append(f"| {r['method']} | {r['knn']} | {r['precision']} | {r['ddim_steps']} | {r['batch']} | "
                   f"{r['images']} | {r['images_per_s']:.1f} | {fmt(r['peak_gb'])} |")
    out += ["", "## CPU vs GPU agreement", "",
            f"Same model, features and noise seeds; the {res['filled_layers']} zero-initialised layers of the U-Net "
            f"were given small random weights first.",
            "", "| method | images | maps max abs | maps max rel | scores max abs | scores max rel |",
            "|---|---|---|---|---|---|"]
    for r in res["agreement"]:
        out.append(f"| {r['method']} | {r['images']} | {r['map_max_abs']:.3g} | {r['map_max_rel']:.3g} | "
                   f"{r['score_max_abs']:.3g} | {r['score_max_rel']:.3g} |")
    pr = res["precision"]
    tf32 = " (TF32 convolutions)" if res["tf32_cudnn"] and res["device"] != "CPU (smoke run)" else ""
    out += ["", "## fp32 vs bf16 autocast (issue 11)", "",
            f"| | fp32{tf32} | bf16 | bf16 / fp32 | target |", "|---|---|---|---|---|",
            f"| U-Net training, train_unet steps/s | {pr['train_fp32_steps_per_s']:.2f} | "
            f"{pr['train_bf16_steps_per_s']:.2f} | {pr['train_speedup']:.2f} | >= 1.8 |",
            f"| LafitE scoring, images/s ({pr['ddim_steps']} DDIM steps) | {pr['score_fp32_images_per_s']:.1f} | "
            f"{pr['score_bf16_images_per_s']:.1f} | {pr['score_speedup']:.2f} | - |", "",
            f"bf16 image scores vs fp32 (same features and seeds): max abs {pr['score_max_abs']:.3g}, max rel "
            f"{pr['score_max_rel']:.3g} (random weights: the AUROC comparison needs a trained model and real data).",
            "", "## LafitE vs PatchCore end to end (issue 11)", "",
            "Generated JPEGs read, decoded (at a reduced scale where they are large), resized, through the "
            "backbone and scored by one method at a time "
            "(`stages.load_all` + `stages.score_images`; no Prefect, Ray or Parquet). PatchCore's view and map "
            "run on the CPU in the library, LafitE's on the device.", "",
            "| method | DDIM steps | U-Net precision | images | size | images/s | LafitE / PatchCore | target |",
            "|---|---|---|---|---|---|---|---|"]
    pc = next(r["images_per_s"] for r in res["end_to_end"] if r["method"] == "patchcore")
    for r in res["end_to_end"]:
        lafite = r["method"] == "lafite"
        ratio = f"{r['images_per_s'] / pc:.2f}" if lafite else "-"
        out.append(f"| {r['method']} | {r['ddim_steps'] or '-'} | {r['precision'] if lafite else '-'} | {r['images']} "
                   f"| {r['size']} | {r['images_per_s']:.1f} | {ratio} | {'>= 0.5' if lafite else '-'} |")
    return "\n".join(out) + "\n"


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="EfficientNet-B4 weights file (instead of the timm hub)")
    p.add_argument("--bank", type=int, default=None, help=f"memory bank size for scoring (default {GPU.bank:,})")
    p.add_argument("--out", default=None, help="output stem (default bench/results/gpu)")
    p.add_argument("--cpu-smoke", action="store_true", help="run on the CPU with tiny sizes (code-path check only)")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); this check "
              "needs a GPU machine. Nothing was measured.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    if args.bank:
        sizes = dataclasses.replace(sizes, bank=args.bank)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    from lafite_core.config import paper_profile

    cfg = paper_profile()
    if args.cpu_smoke:  # the paper U-Net has ~350M parameters: too slow for a code-path check on a CPU
        cfg = cfg.with_updates(diffusion={"base_channels": 32})
    if sizes.ddim_steps:
        cfg = cfg.with_updates(scoring={"ddim_steps": sizes.ddim_steps, "batch_size": sizes.batch})
    import faiss

    mach = machine()
    res: dict = {"cpu_smoke": args.cpu_smoke, "machine": mach.line(), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                 "faiss": f"{faiss.__version__}, GPUs seen {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}",
                 "bank": sizes.bank, "sizes": asdict(sizes), "config": cfg.model_dump(mode="json")}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        res["device"] = f"{prop.name}, {prop.total_memory / 2**30:.0f} GiB"
    else:
        res["device"] = "CPU (smoke run)"
    print(f"gpu_check on {res['device']}", flush=True)

    log("backbone ...")
    extractor, note = build_extractor(cfg, args.checkpoint, force_random=args.cpu_smoke)
    extractor = extractor.to(device)
    res["backbone"] = asdict(bench_backbone(extractor, cfg, sizes, device, note))
    dim = extractor.info.feature_dim
    from lafite_core.stages import backbone_card

    card = backbone_card(extractor)
    log("training ...")
    training, unet = bench_training(cfg, dim, sizes, device)
    res["training"] = asdict(training)
    res["filled_layers"] = fill_zero_layers(unet, 0)
    model = make_model(cfg, unet, card, dim, sizes.bank)
    res["baseline_bank"] = 0 if model.baseline_bank is None else int(model.baseline_bank.shape[0])
    log("scoring ...")
    res["scoring"] = [asdict(r) for r in bench_scoring(model, sizes, device)]
    log("agreement ...")
    res["agreement"] = [asdict(r) for r in check_agreement(model, sizes, device)]
    log("fp32 vs bf16 ...")
    res["precision"] = asdict(bench_precision(model, dim, sizes, device))
    log("end to end ...")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        res["end_to_end"] = [asdict(r) for r in bench_end_to_end(model, extractor, sizes, device, Path(tmp))]
    del extractor
    res["seconds"] = time.perf_counter() - started
    stem = out_stem(args.out, "gpu_cpu_smoke" if args.cpu_smoke else "gpu", False)
    text = markdown(res)
    write_json(stem.parent / (stem.name + ".json"), res)
    write_text(stem.parent / (stem.name + ".md"), text)
    print(text)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
