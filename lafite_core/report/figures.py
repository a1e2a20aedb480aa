"""The report's figures as PNG bytes: matplotlib on its Agg canvas (no display, no global pyplot state),
the gallery's panels (image, heat map, mask) at each image's own aspect ratio, and the images they show."""

from __future__ import annotations

import io
import logging
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from lafite_core.datapath.data import read_bytes
from lafite_core.datapath.heatmap import overlay_png
from lafite_core.datapath.images import crop_window
from lafite_core.report.evidence import Curve
from lafite_core.store import layout
from lafite_core.store.storage import Store, StoreError, storage_options_from_env

log = logging.getLogger(__name__)

DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def curves_figure(title: str, panels: Sequence[tuple[str, str, str, Sequence[tuple[str, Curve]]]]) -> bytes:
    """One row of curve panels; each panel (title, x label, y label, [(legend, Curve)]).

    A panel without curves is left out; ROC panels (x label "false positive rate") get the chance diagonal.
    """
    panels = [p for p in panels if p[3]]
    if not panels:
        raise ValueError("curves_figure needs at least one panel with a curve")
    fig = Figure(figsize=(3.4 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, xlabel, ylabel, curves) in zip(axes, panels):
        for legend, c in curves:
            ax.plot(c.x, c.y, lw=1.5, label=legend, drawstyle="default")
        if xlabel == "false positive rate":
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel, xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if xlabel == "false positive rate" else "lower left")
    fig.suptitle(title)
    return _png(fig)


def histogram_figure(title: str, groups: Sequence[tuple[str, np.ndarray]], threshold: float | None,
                     xlabel: str) -> bytes:
    """Overlaid histograms of score groups [(legend, scores [n])] on shared bins, the threshold drawn."""
    values = [np.asarray(v, dtype=np.float64) for _, v in groups if len(v)]
    everything = np.concatenate(values) if values else np.zeros(0)
    if threshold is not None:
        everything = np.append(everything, threshold)
    lo, hi = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    colors = {"normal": "tab:blue", "anomalous": "tab:red"}
    for legend, v in groups:
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{legend} ({len(v)})", color=colors.get(legend))
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:.4g}")
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def search_figure(points: Sequence[dict]) -> bytes:
    """The pseudo-validation search, one panel per stage (tau, K, DDIM steps): AUROCs against the value,
    the chosen point circled; points are SEARCH_SCHEMA rows."""
    stages = [("tau", "tau", "tau (noise step)"), ("k", "k", "K (neighbours)"), ("steps", "ddim_steps", "DDIM steps")]
    stages = [s for s in stages if any(p["stage"] == s[0] for p in points)]
    if not stages:
        raise ValueError("search_figure needs search points")
    fig = Figure(figsize=(3.4 * len(stages), 3.2), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, (stage, column, xlabel) in zip(axes, stages):
        rows = sorted((p for p in points if p["stage"] == stage), key=lambda p: p[column])
        x = [p[column] for p in rows]
        ax.plot(x, [p["image_auroc"] for p in rows], "o-", label="image AUROC")
        if any(p["pixel_auroc"] is not None for p in rows):
            ax.plot(x, [np.nan if p["pixel_auroc"] is None else p["pixel_auroc"] for p in rows], "s--",
                    label="pixel AUROC")
        for p in rows:
            if p["chosen"]:
                ax.plot([p[column]], [p["image_auroc"]], "o", ms=13, mfc="none", mec="black", mew=1.5,
                        label=f"chosen: {p[column]}")
        ax.set(title=f"search: {stage}", xlabel=xlabel, ylabel="pseudo-validation AUROC")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def loss_figure(losses: np.ndarray) -> bytes:
    """Training loss per epoch (losses [E]); log scale when the losses are positive and span over 10x."""
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1.5)
    if len(losses) and np.min(losses) > 0 and np.max(losses) > 10 * np.min(losses):
        ax.set_yscale("log")
    ax.set(title="training loss", xlabel="epoch", ylabel="mean loss")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def display_size(width: int, height: int, target_height: int, max_width: int) -> tuple[int, int]:
    """(width, height) of a panel of ``target_height`` at the aspect ratio width:height, at most ``max_width`` wide."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    w = target_height * width / height
    scale = min(1.0, max_width / w)
    return max(1, round(w * scale)), max(1, round(target_height * scale))


def _resize(a: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, resample))


def _png_of(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def resized_png(image: np.ndarray, size: tuple[int, int]) -> bytes:
    """RGB uint8 [H, W, 3] resized (bilinear) to ``size`` (width, height), as PNG."""
    return _png_of(_resize(image, size, Image.BILINEAR))


def gallery_panels(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, size: tuple[int, int],
                   low: float, high: float) -> tuple[bytes, bytes, bytes]:
    """PNGs (image, heat map over the image, mask) of one gallery entry, each ``size`` (width, height).

    image: RGB uint8 [H, W, 3] at any size (the original file, or the model's square input); amap: the
    anomaly map [S, S] over the model's square input, stretched back to the image's aspect ratio and
    coloured with ``low`` -> 0 and ``high`` -> 1 (:func:`overlay_png`); mask [S, S] bool, or None when
    unknown (a grey panel).
    """
    shown = _resize(image, size, Image.BILINEAR)
    heat = _resize(amap.astype(np.float32), size, Image.BILINEAR)
    if mask is None:
        m = np.full((size[1], size[0], 3), 128, np.uint8)
    else:
        m = np.repeat(_resize(mask.astype(np.uint8) * 255, size, Image.NEAREST)[..., None], 3, axis=2)
    return _png_of(shown), overlay_png(shown, heat, low, high), _png_of(m)


def model_window(store: Store, version: str) -> tuple[float, float]:
    """The part of every image a published version looks at (its ``data.center_crop``), for
    :func:`crop_to_window`; (0, 1) for the whole image and for versions that predate the crop. A version
    whose files are gone is taken to look at the whole image, with a WARNING."""
    if not store.exists(*layout.model_file(version, "model.json")):
        log.warning("report: model %s has no model.json in the store; its images are shown whole (if it used "
                    "data.center_crop, its heat maps cover the centre only)", version)
        return 0.0, 1.0
    data = store.read_json(*layout.model_file(version, "model.json"))["config"]["data"]
    return crop_window(data["image_size"], data.get("center_crop", 1.0))


def crop_to_window(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """The part of ``image`` [H, W, ...] the model saw: ``window`` (start, end) as fractions of each side
    (:func:`lafite_core.datapath.images.crop_window`; (0, 1) is the whole image)."""
    lo, hi = window
    h, w = image.shape[:2]
    return image[round(lo * h):round(hi * h), round(lo * w):round(hi * w)]


def read_display_image(url: str, max_side: int = 800) -> np.ndarray | None:
    """An image file as RGB uint8 [H, W, 3], at most ``max_side`` px; None (logged) when unreadable."""
    try:
        with Image.open(io.BytesIO(read_bytes(url, storage_options_from_env(url)))) as im:
            im.draft("RGB", (max_side, max_side))  # JPEGs decode at a reduced scale
            im.thumbnail((max_side, max_side))
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, StoreError, Image.DecompressionBombError) as exc:
        log.warning("report: %s is unreadable (%s)", url, exc)
        return None
