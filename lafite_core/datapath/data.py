"""Dataset discovery in MVTec-AD layout, from a local path or any fsspec URL.

Layout (MVTec-AD and MPDD)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<type>/*.png            (type "good" or a defect name)
    <root>/<category>/ground_truth/<type>/<stem>_mask.png

A root may hold categories directly (the dataset is named after the root) or one folder per dataset
holding categories, or be a single category folder itself.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Literal, Sequence

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from lafite_core.datapath.images import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS, ImageDecodeError, decode_image, decode_mask
from lafite_core.store.storage import RetryPolicy, content_hash, fs_protocol

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


def _is_category(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.isdir(_join(fs, path, "train")) or fs.isdir(_join(fs, path, "test"))


def _read_category(fs: fsspec.AbstractFileSystem, path: str, dataset: str, root: str) -> Category:
    name = posixpath.basename(path.rstrip("/"))
    train = tuple(
        Sample(_url(fs, p), dataset, name, "train", "good")
        for p in _images(fs, _join(fs, path, "train", "good"), root)
    )
    test: list[Sample] = []
    missing: list[str] = []
    for type_dir in _dirs(fs, _join(fs, path, "test")):
        defect = posixpath.basename(type_dir)
        gt_dir = _join(fs, path, "ground_truth", defect)
        masks = {posixpath.basename(m): m for m in _images(fs, gt_dir, root)} if defect != "good" else {}
        for p in _images(fs, type_dir, root):
            stem = posixpath.splitext(posixpath.basename(p))[0]
            mask = masks.get(f"{stem}_mask.png")
            if defect != "good" and mask is None:
                missing.append(_url(fs, p))
            test.append(Sample(_url(fs, p), dataset, name, "test", defect, _url(fs, mask) if mask else None))
    return Category(dataset, name, _url(fs, path), train, tuple(test), tuple(missing))


def discover(
    root: str,
    categories: list[str] | None = None,
    storage_options: dict | None = None,
) -> list[Category]:
    """All categories under ``root`` (a path or fsspec URL), optionally filtered by name.

    ``categories`` entries match either the category name or ``dataset/category``. Raises
    FileNotFoundError for a missing root and ValueError when nothing in MVTec layout is found.
    """
    fs, path = url_to_fs(root, **(storage_options or {}))
    path = path.rstrip("/") or path
    if not fs.isdir(path):
        raise FileNotFoundError(f"data root {root!r} does not exist or is not a folder")
    found: list[Category] = []
    if _is_category(fs, path):
        parent = posixpath.basename(posixpath.dirname(path)) or "data"
        found.append(_read_category(fs, path, parent, path))
    else:
        root_name = posixpath.basename(path) or "data"
        for child in _dirs(fs, path):
            if _is_category(fs, child):
                found.append(_read_category(fs, child, root_name, path))
            else:
                for grandchild in _dirs(fs, child):
                    if _is_category(fs, grandchild):
                        found.append(_read_category(fs, grandchild, posixpath.basename(child), path))
    if categories:
        wanted = set(categories)
        found = [c for c in found if c.name in wanted or c.key in wanted]
        unknown = wanted - {c.name for c in found} - {c.key for c in found}
        if unknown:
            raise ValueError(f"categories {sorted(unknown)} not found under {root!r}")
    if not found:
        raise ValueError(
            f"no category in MVTec-AD layout under {root!r}: expected "
            f"<root>/<category>/train/good/*.png (or <root>/<dataset>/<category>/...)"
        )
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
                storage_options: dict | None = None) -> LoadedSample:
    """Read and decode one sample and its mask. Raises ImageDecodeError/OSError naming the file."""
    data = read_bytes(sample.url, storage_options)
    image, original = decode_image(data, size, sample.url, max_pixels)
    mask: np.ndarray | None = None
    mask_error = None
    if sample.mask_url:
        try:
            mask = decode_mask(read_bytes(sample.mask_url, storage_options), size, sample.mask_url,
                               expected_size=original, max_pixels=max_pixels)
        except (OSError, ValueError) as exc:
            mask_error = f"{type(exc).__name__}: {exc}"
            log.warning("unusable mask, image left out of pixel metrics: %s", mask_error)
    elif sample.label == 0:
        mask = np.zeros((size, size), dtype=bool)
    return LoadedSample(sample, image, mask, content_hash(data), original, mask_error)


def list_images(source: str, storage_options: dict | None = None) -> list[str]:
    """Every image file (by extension) under ``source``, recursively, as sorted URLs."""
    fs, path = url_to_fs(source, **(storage_options or {}))
    path = path.rstrip("/") or path
    if not fs.isdir(path):
        raise FileNotFoundError(f"image source {source!r} does not exist or is not a folder")
    found = [p for p in fs.find(path) if p.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(_url(fs, p) for p in found)


def outside_root(url: str, root: str) -> bool:
    """True when a local ``url`` resolves (through symlinks) outside the folder ``root``.

    Object stores have no links, so remote URLs are never outside.
    """
    if "://" in url and not url.startswith("file://"):
        return False
    real_root = os.path.realpath(root.removeprefix("file://"))
    real = os.path.realpath(url.removeprefix("file://"))
    return not (real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep))
