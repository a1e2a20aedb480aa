"""A corpus of the files a real shop-floor dump contains, generated on the fly (nothing checked in)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _photo(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 200, size[0], dtype=np.float64)[None, :, None]
    arr = base + rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _bomb() -> bytes:
    """A PNG of 20000 x 20000 1-bit pixels (400 million) that is a few kB on disk."""
    return _png(Image.new("1", (20000, 20000), 0))


@dataclass(frozen=True)
class BadFile:
    name: str
    data: bytes
    valid: bool  # True: unusual but a real image that must be scored; False: must be refused
    why: str


def bad_files() -> list[BadFile]:
    """Every kind of difficult file, with whether a robust reader should accept it."""
    good = _png(_photo(99))
    jpeg = _png(_photo(98), "JPEG")
    return [
        BadFile("zero-bytes.png", b"", False, "empty file"),
        BadFile("truncated.png", good[: len(good) // 2], False, "truncated PNG"),
        BadFile("truncated.jpg", jpeg[: len(jpeg) // 2], False, "truncated JPEG"),
        BadFile("notes.png", b"operator notes: line 3 stopped at 14:02\n" * 20, False, "text with an image extension"),
        BadFile("bomb.png", _bomb(), False, "decompression bomb (400 Mpx in a small file)"),
        BadFile("deep16.png", _png(Image.fromarray((np.arange(96 * 96).reshape(96, 96) * 7).astype(np.uint16))), True,
                "16-bit greyscale"),
        BadFile("palette.png", _png(_photo(1).convert("P")), True, "palette"),
        BadFile("cmyk.jpg", _png(_photo(2).convert("CMYK"), "JPEG"), True, "CMYK JPEG"),
        BadFile("alpha.png", _png(_photo(3).convert("RGBA")), True, "RGBA with alpha"),
        BadFile("one-pixel.png", _png(Image.new("RGB", (1, 1), (120, 120, 120))), True, "1x1 image"),
        BadFile("elongated.png", _png(_photo(4, (4000, 3))), True, "4000x3 image"),
        BadFile("name with spaces é ü.png", _png(_photo(5)), True, "spaces and non-ASCII in the name"),
    ]


def write_dump(folder: Path, outside: Path) -> dict[str, BadFile]:
    """Write every bad file into ``folder`` plus a symlink to a valid image in ``outside``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {f.name: f for f in bad_files()}
    for f in files.values():
        (folder / f.name).write_bytes(f.data)
    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "not-yours.png"
    secret.write_bytes(_png(_photo(6)))
    os.symlink(secret, folder / "link-outside.png")
    files["link-outside.png"] = BadFile("link-outside.png", b"", False, "symlink pointing outside the root")
    return files


def write_dataset(root: Path, outside: Path, n_train: int = 8) -> dict[str, BadFile]:
    """An MVTec-layout dataset whose train/good and test folders also hold every bad file.

    Also: a defect image whose mask has the wrong size, one without a mask, an empty category.
    """
    cat = root / "dump" / "parts"
    train = cat / "train" / "good"
    train.mkdir(parents=True)
    for i in range(n_train):
        (train / f"{i:03d}.png").write_bytes(_png(_photo(10 + i)))
    files = write_dump(train, outside)
    (cat / "test" / "good").mkdir(parents=True)
    for i in range(3):
        (cat / "test" / "good" / f"g{i}.png").write_bytes(_png(_photo(30 + i)))
    defect, gt = cat / "test" / "dent", cat / "ground_truth" / "dent"
    defect.mkdir(parents=True)
    gt.mkdir(parents=True)
    for i in range(3):
        img = np.asarray(_photo(40 + i)).copy()
        img[30:50, 30:50] = 0
        (defect / f"d{i}.png").write_bytes(_png(Image.fromarray(img)))
        mask = np.zeros((96, 96), np.uint8)
        mask[30:50, 30:50] = 255
        if i == 1:
            mask = np.zeros((50, 50), np.uint8)  # wrong size
        if i != 2:  # d2 has no mask at all
            (gt / f"d{i}_mask.png").write_bytes(_png(Image.fromarray(mask)))
    (root / "dump" / "empty_category" / "train" / "good").mkdir(parents=True)
    (root / "dump" / "empty_category" / "test").mkdir(parents=True)
    return files
