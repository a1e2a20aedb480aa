"""Samples and categories of a dataset, their discovery under a root, and reading them back.

``discover`` finds the categories of a local path or any fsspec URL in one of the layouts of
:mod:`lafite_core.datapath.layouts` (MVTec AD, VisA, or plain folders), given or detected.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from lafite_core.datapath.images import (DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS, ImageDecodeError, MaskRule, decode_image,
                                         decode_mask_cropped)
from lafite_core.store.storage import RetryPolicy, content_hash, fs_protocol

if TYPE_CHECKING:
    from lafite_core.datapath.layouts import DataLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image of a category, with what is known about it."""

    url: str
    dataset: str
    category: str
    split: Literal["train", "test"]
    defect_type: str
    mask_url: str | None = None
    mask_rule: MaskRule = "half"  # how the mask's pixel values mean defect (the layout's convention)

    @property
    def label(self) -> int:
        """0 for a normal image, 1 for an anomalous one."""
        return 0 if self.defect_type == "good" else 1

    @property
    def stem(self) -> str:
        return posixpath.splitext(posixpath.basename(self.url))[0]

    @property
    def image_id(self) -> str:
        """Unique within a store: dataset/category/split/type/stem."""
        return f"{self.dataset}/{self.category}/{self.split}/{self.defect_type}/{self.stem}"

    @property
    def category_key(self) -> str:
        """"dataset/category", the key models and tables use for a category."""
        return f"{self.dataset}/{self.category}"


@dataclass(frozen=True)
class Category:
    """One category of one dataset, with its train and test samples (sorted by path)."""

    dataset: str
    name: str
    url: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    missing_masks: tuple[str, ...] = field(default=())

    @property
    def has_masks(self) -> bool:
        return any(s.mask_url for s in self.test)

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"


def by_category(samples: Sequence[Sample]) -> dict[tuple[str, str], list[Sample]]:
    """Samples grouped by (dataset, category), in first-seen order, keeping their order within."""
    out: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        out.setdefault((s.dataset, s.category), []).append(s)
    return out


def _join(fs: fsspec.AbstractFileSystem, path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if fs.sep == "/" else fs.sep.join([path, *parts])


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if fs_protocol(fs) != "file" else path


def _dirs(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/") for e in entries if e["type"] == "directory")


def _images(fs: fsspec.AbstractFileSystem, path: str, root: str | None = None) -> list[str]:
    """Image files directly in ``path``; local links resolving outside ``root`` are refused (logged)."""
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    local = fs_protocol(fs) == "file"
    found = sorted(
        e["name"] for e in entries
        if (e["type"] == "file" or (local and e.get("islink") and os.path.isfile(e["name"])))
        and e["name"].lower().endswith(IMAGE_EXTENSIONS)
    )
    if root is not None and local:
        outside = [p for p in found if outside_root(p, root)]
        for p in outside:
            log.warning("refusing %s: it links outside the data root %s", p, root)
        found = [p for p in found if p not in outside]
    return found


def discover(
    root: str,
    categories: list[str] | None = None,
    storage_options: dict | None = None,
    layout: DataLayout | None = None,
) -> list[Category]:
    """All categories under ``root`` (a path or fsspec URL) in ``layout`` (default: detected), optionally
    filtered by name.

    ``categories`` entries match either the category name or ``dataset/category``. Raises
    FileNotFoundError for a missing root and ValueError, naming the expected layouts, when nothing in
    them is found.
    """
    from lafite_core.datapath.layouts import DataLayout, read_layout  # layouts build on this module's types

    fs, path = url_to_fs(root, **(storage_options or {}))
    path = path.rstrip("/") or path
    if not fs.isdir(path):
        raise FileNotFoundError(f"data root {root!r} does not exist or is not a folder")
    found = read_layout(fs, path, root, layout or DataLayout())
    if categories:
        wanted = set(categories)
        found = [c for c in found if c.name in wanted or c.key in wanted]
        unknown = wanted - {c.name for c in found} - {c.key for c in found}
        if unknown:
            raise ValueError(f"categories {sorted(unknown)} not found under {root!r}")
    for c in found:
        if c.missing_masks:
            log.warning("%s: %d anomalous test images have no mask (e.g. %s); they are left out of "
                        "pixel metrics", c.key, len(c.missing_masks), c.missing_masks[0])
    return found


@dataclass(frozen=True)
class LoadedSample:
    sample: Sample
    image: np.ndarray  # [S, S, 3] uint8
    mask: np.ndarray | None  # [S, S] bool; all False for good test images; None when unknown
    content_hash: str
    original_size: tuple[int, int]
    mask_error: str | None = None  # why an existing mask could not be used
    mask_cut: int = 0  # defect pixels the centre crop cut off (DataConfig.center_crop < 1)


def read_bytes(url: str, storage_options: dict | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A file's bytes (transient storage errors retried); refuses files over ``max_bytes``."""

    def read() -> bytes:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageDecodeError(f"{url}: file is larger than {max_bytes} bytes; refused")
        return data

    return RetryPolicy.from_env().call(read, what=f"reading {url}")


def load_sample(sample: Sample, size: int, max_pixels: int = 100_000_000,
                storage_options: dict | None = None, crop: float = 1.0) -> LoadedSample:
    """Read and decode one sample and its mask (``crop``: see :func:`decode_image`).
    Raises ImageDecodeError/OSError naming the file."""
    data = read_bytes(sample.url, storage_options)
    image, original = decode_image(data, size, sample.url, max_pixels, crop=crop)
    mask: np.ndarray | None = None
    mask_error = None
    cut = 0
    if sample.mask_url:
        try:
            mask, cut = decode_mask_cropped(read_bytes(sample.mask_url, storage_options), size, sample.mask_url,
                                            expected_size=original, max_pixels=max_pixels, rule=sample.mask_rule,
                                            crop=crop)
        except (OSError, ValueError) as exc:
            mask_error = f"{type(exc).__name__}: {exc}"
            log.warning("unusable mask, image left out of pixel metrics: %s", mask_error)
    elif sample.label == 0:
        mask = np.zeros((size, size), dtype=bool)
    return LoadedSample(sample, image, mask, content_hash(data), original, mask_error, cut)


def list_images(source: str, storage_options: dict | None = None) -> list[str]:
    """Every image file (by extension) under ``source``, recursively, as sorted URLs (the whole listing
    in memory: batch scoring streams ``lafite_core.datapath.listing.iter_listing`` instead)."""
    from lafite_core.datapath.listing import iter_listing

    return [o.url for page in iter_listing(source, storage_options) for o in page]


def outside_root(url: str, root: str) -> bool:
    """True when a local ``url`` resolves (through symlinks) outside the folder ``root``.

    Object stores have no links, so remote URLs are never outside.
    """
    if "://" in url and not url.startswith("file://"):
        return False
    real_root = os.path.realpath(root.removeprefix("file://"))
    real = os.path.realpath(url.removeprefix("file://"))
    return not (real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep))
