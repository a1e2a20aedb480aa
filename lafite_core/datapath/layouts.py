"""Dataset layouts: where a root's categories, splits, labels and masks are, read from any fsspec path.

MVTec AD (and MPDD, same layout)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<type>/*.png            (type "good" or a defect name)
    <root>/<category>/ground_truth/<type>/<stem>_mask.png

  A root may hold categories directly (the dataset is named after the root) or one folder per dataset
  holding categories, or be a single category folder itself. Masks are 0 / 255 (rule "half").

VisA::

    <root>/split_csv/1cls.csv      header object,split,label,image,mask; split train | test,
                                   label normal | anomaly; image and mask relative to the root
                                   (e.g. candle/Data/Images/Normal/0000.JPG; mask empty for normals)

  The dataset is named after the root, one category per object. Masks mark each defect region with a
  small value (1, 2, ...), so any non-zero value is a defect (rule "nonzero"). Rows whose image is not
  under the root are skipped with a warning (a root may hold only some objects).

Folder (as anomalib's ``Folder``), one category, every directory relative to the root::

    <root>/<normal_dir>/*          normal images
    <root>/<abnormal_dir>/*        anomalous test images (optional; defect type "abnormal")
    <root>/<mask_dir>/<stem>.png   their masks, same stem or <stem>_mask (optional; rule "nonzero")
    <root>/<normal_test_dir>/*     normal test images (optional; else ``normal_split_ratio`` of the
                                   normal images, chosen by ``split_seed``, are held out for testing)

  The category is ``category_name`` (default: the root's folder name), its dataset the root's parent
  folder name, as for a single MVTec category root. Images are the files directly in each directory.

Format "auto" reads the folder layout when folder options are given; otherwise VisA where
``split_csv/1cls.csv`` exists (at the root or one folder down, beside MVTec datasets), else MVTec AD.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from typing import Literal, get_args

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lafite_core.datapath.data import Category, Sample, _dirs, _images, _join, _url, outside_root
from lafite_core.store.storage import fs_protocol

log = logging.getLogger(__name__)

LayoutFormat = Literal["auto", "mvtec", "visa", "folder"]
FORMATS: tuple[LayoutFormat, ...] = get_args(LayoutFormat)
FOLDER_DIRS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")
VISA_SPLIT_FILE = ("split_csv", "1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

MVTEC_EXPECTED = ("MVTec AD layout (<root>/<category>/train/good/*.png, <root>/<category>/test/<type>/*.png, "
                  "ground_truth/<type>/<stem>_mask.png; or <root>/<dataset>/<category>/...)")
VISA_EXPECTED = ("VisA layout (<root>/split_csv/1cls.csv with columns object,split,label,image,mask; "
                 "or <root>/<dataset>/split_csv/1cls.csv)")
FOLDER_EXPECTED = ("folder layout (--format folder --normal-dir DIR [--abnormal-dir DIR --mask-dir DIR], "
                   "directories relative to the root)")


class DataLayout(BaseModel):
    """How a data root is laid out: the format, and for the folder layout where each kind of image is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: LayoutFormat = Field(
        "auto", description="mvtec, visa, folder, or auto: folder when normal_dir is set, else detected"
    )
    normal_dir: str | None = Field(None, description="folder layout: normal images, relative to the root")
    abnormal_dir: str | None = Field(None, description="folder layout: anomalous test images")
    mask_dir: str | None = Field(None, description="folder layout: masks named like the anomalous images")
    normal_test_dir: str | None = Field(None, description="folder layout: normal test images")
    normal_split_ratio: float = Field(
        0.2, ge=0.0, lt=1.0, description="folder layout without normal_test_dir: share of normal images tested"
    )
    split_seed: int = Field(0, description="folder layout: seed of the normal train/test split")
    category_name: str | None = Field(None, description="folder layout: category name (default: root's name)")

    @model_validator(mode="after")
    def _consistent(self) -> DataLayout:
        given = [name for name in (*FOLDER_DIRS, "category_name") if getattr(self, name) is not None]
        if given and self.format in ("mvtec", "visa"):
            raise ValueError(f"{', '.join(given)} only apply to format 'folder', not {self.format!r}")
        if (given or self.format == "folder") and self.normal_dir is None:
            raise ValueError("the folder layout needs normal_dir: the folder of normal images, relative to the root")
        if self.mask_dir is not None and self.abnormal_dir is None:
            raise ValueError("mask_dir needs abnormal_dir: masks belong to the anomalous images")
        for name in FOLDER_DIRS:
            value = getattr(self, name)
            if value is not None and _relative(value) is None:
                raise ValueError(f"{name}={value!r} must be a folder relative to the data root, without '..'")
        return self

    @property
    def is_folder(self) -> bool:
        return self.format == "folder" or self.normal_dir is not None


def read_layout(fs: fsspec.AbstractFileSystem, path: str, root: str, layout: DataLayout) -> list[Category]:
    """Every category at ``path`` in ``layout`` (``root``: the URL as given, for messages).

    Raises ValueError naming the expected layouts when nothing matches.
    """
    if layout.is_folder:
        return [read_folder(fs, path, layout)]
    mvtec, visa = layout.format in ("auto", "mvtec"), layout.format in ("auto", "visa")
    root_name = posixpath.basename(path) or "data"
    found: list[Category] = []
    if visa and is_visa(fs, path):
        found = read_visa(fs, path, root_name, path)
    elif mvtec and _is_category(fs, path):
        found = [_read_category(fs, path, posixpath.basename(posixpath.dirname(path)) or "data", path)]
    else:
        for child in _dirs(fs, path):
            if mvtec and _is_category(fs, child):
                found.append(_read_category(fs, child, root_name, path))
            elif visa and is_visa(fs, child):
                found += read_visa(fs, child, posixpath.basename(child), path)
            elif mvtec:
                found += [_read_category(fs, grandchild, posixpath.basename(child), path)
                          for grandchild in _dirs(fs, child) if _is_category(fs, grandchild)]
    if not found:
        expected = {"mvtec": MVTEC_EXPECTED, "visa": VISA_EXPECTED,
                    "auto": f"{MVTEC_EXPECTED} or {VISA_EXPECTED}, or give the {FOLDER_EXPECTED}"}[layout.format]
        raise ValueError(f"no category in {expected} under {root!r}")
    return found


def _relative(rel: str) -> str | None:
    """A relative path from data or options, normalised; None when absolute, a URL or climbing out."""
    norm = posixpath.normpath(rel.strip().replace("\\", "/"))
    if not rel.strip() or "://" in rel or norm == ".." or norm.startswith(("/", "../")):
        return None
    return norm


# MVTec AD


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


# VisA


def is_visa(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.isfile(_join(fs, path, *VISA_SPLIT_FILE))


def read_visa(fs: fsspec.AbstractFileSystem, path: str, dataset: str, root: str) -> list[Category]:
    """One category per object of ``split_csv/1cls.csv`` at ``path``, in first-seen order.

    Raises ValueError naming the file and line for a missing column, split or label.
    """
    split_file = _join(fs, path, *VISA_SPLIT_FILE)
    where = _url(fs, split_file)
    reader = csv.DictReader(io.StringIO(fs.cat_file(split_file).decode("utf-8-sig")))
    absent = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
    if absent:
        raise ValueError(f"{where}: missing columns {absent}; a VisA split file has the header "
                         f"{','.join(VISA_COLUMNS)}")
    present = set(fs.find(path))
    local = fs_protocol(fs) == "file"
    samples: dict[str, list[Sample]] = {}
    skipped: list[str] = []
    for line, row in enumerate(reader, start=2):
        obj, split, label = row["object"].strip(), row["split"].strip().lower(), row["label"].strip().lower()
        if not obj or split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise ValueError(f"{where} line {line}: expected an object name, split train or test and label "
                             f"normal or anomaly; got {obj!r}, {row['split']!r}, {row['label']!r}")
        if split == "train" and label == "anomaly":
            raise ValueError(f"{where} line {line}: an anomalous image in the train split; training uses "
                             f"normal images only (1cls.csv lists anomalies under test)")
        image = _member(fs, path, row["image"], present, root, local)
        if image is None:
            skipped.append(row["image"])
            continue
        mask = _member(fs, path, row["mask"] or "", present, root, local) if label == "anomaly" else None
        samples.setdefault(obj, []).append(Sample(_url(fs, image), dataset, obj, split,
                                                  "good" if label == "normal" else "anomaly",
                                                  _url(fs, mask) if mask else None, mask_rule="nonzero"))
    if skipped:
        log.warning("%s: %d images listed in %s are not under the root and are skipped (e.g. %s)", dataset,
                    len(skipped), "/".join(VISA_SPLIT_FILE), skipped[0])
    out = []
    for obj, items in samples.items():
        test = tuple(sorted((s for s in items if s.split == "test"), key=lambda s: s.url))
        missing = tuple(s.url for s in test if s.label and s.mask_url is None)
        out.append(Category(dataset, obj, _url(fs, _join(fs, path, obj)),
                            tuple(sorted((s for s in items if s.split == "train"), key=lambda s: s.url)),
                            test, missing))
    return out


def _member(fs: fsspec.AbstractFileSystem, path: str, rel: str, present: set[str], root: str,
            local: bool) -> str | None:
    """``path``/``rel`` when that file is under the root (listed in ``present``, not linking out)."""
    norm = _relative(rel) if rel.strip() else None
    if norm is None:
        return None
    full = _join(fs, path, norm)
    if full not in present:
        return None
    if local and outside_root(full, root):
        log.warning("refusing %s: it links outside the data root %s", full, root)
        return None
    return full


# Folder


def read_folder(fs: fsspec.AbstractFileSystem, path: str, layout: DataLayout) -> Category:
    """The one category of a folder-layout root. Raises ValueError when a named folder holds no images."""
    assert layout.normal_dir is not None  # DataLayout guarantees it for the folder layout
    name = layout.category_name or posixpath.basename(path) or "data"
    dataset = posixpath.basename(posixpath.dirname(path)) or "data"

    def images(rel: str, what: str) -> list[str]:
        folder = _join(fs, path, rel)
        found = _images(fs, folder, path)
        if not found:
            raise ValueError(f"no {what} images in {_url(fs, folder)}: the {FOLDER_EXPECTED} expects them "
                             f"directly in <root>/{rel}")
        return found

    normal = images(layout.normal_dir, "normal")
    if layout.normal_test_dir is not None:
        train, normal_test = normal, images(layout.normal_test_dir, "normal test")
    else:
        train, normal_test = split_normals(normal, layout.normal_split_ratio, layout.split_seed)
    abnormal = images(layout.abnormal_dir, "abnormal") if layout.abnormal_dir is not None else []
    masks: dict[str, str] = {}
    if layout.mask_dir is not None:
        for m in images(layout.mask_dir, "mask"):
            masks.setdefault(posixpath.splitext(posixpath.basename(m))[0], m)

    def mask_of(p: str) -> str | None:
        stem = posixpath.splitext(posixpath.basename(p))[0]
        found = masks.get(stem) or masks.get(f"{stem}_mask")
        return _url(fs, found) if found else None

    test = [Sample(_url(fs, p), dataset, name, "test", "good") for p in normal_test]
    test += [Sample(_url(fs, p), dataset, name, "test", "abnormal", mask_of(p), mask_rule="nonzero")
             for p in abnormal]
    missing = tuple(s.url for s in test if s.label and s.mask_url is None) if masks else ()
    return Category(dataset, name, _url(fs, path),
                    tuple(Sample(_url(fs, p), dataset, name, "train", "good") for p in train),
                    tuple(test), missing)


def split_normals(paths: list[str], ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """Sorted ``paths`` -> (train, test): round(ratio * N) chosen by ``seed`` for testing, at least one
    kept for training; both in sorted order. Same paths and seed, same split."""
    ordered = sorted(paths)
    n_test = min(round(ratio * len(ordered)), max(len(ordered) - 1, 0))
    chosen = set(np.random.default_rng(seed).permutation(len(ordered))[:n_test].tolist())
    return ([p for i, p in enumerate(ordered) if i not in chosen], [p for i, p in enumerate(ordered) if i in chosen])
