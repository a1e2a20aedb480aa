"""Decoding images and masks of any common size and mode into model-sized arrays.

Images become RGB uint8 [S, S, 3] (bilinear resize); masks become bool [S, S] (nearest resize,
binarised by a :data:`MaskRule`: at half the value range, or any non-zero value). Decoding is bounded: files over ``max_bytes`` and images over
``max_pixels`` are refused before their pixels are decoded. A JPEG larger than the model size is
decoded at a reduced scale (1/2, 1/4 or 1/8 in the DCT, ``PIL.Image.draft``) that keeps both sides
at least the model size, before the resize: a camera-sized image then costs a fraction of a full decode.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
JPEG_DRAFT = True  # decode large JPEGs at a reduced DCT scale (False: full decode; bench/speed.py compares)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# How a mask's pixels become defect / not defect. "half": grey value >= 128 after scaling to 8 bits
# (MVTec AD masks are 0 / 255). "nonzero": any non-zero stored value, palette index or colour channel
# (VisA masks hold small values, 1, 2, ..., per defect region; anomalib's Folder reads masks as > 0).
MaskRule = Literal["half", "nonzero"]

# PIL's own bomb check is replaced by the explicit limit below (applied before decoding).
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(ValueError):
    """A file could not be turned into an image; the message names the file and the reason."""


def _open(data: bytes, name: str, max_pixels: int, max_bytes: int,
          draft: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Checked open and load -> (image, original (width, height)); ``draft``: let a JPEG at least
    twice that size decode at the smallest DCT scale whose sides stay at least ``draft`` pixels."""
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{name}: file has {len(data)} bytes, over the limit of {max_bytes}")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not a recognised image format") from None
    except Exception as exc:  # PIL raises many kinds on malformed headers
        raise ImageDecodeError(f"{name}: cannot read image header ({exc})") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"{name}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            f"(DataConfig.max_image_pixels)"
        )
    if draft is not None and im.format == "JPEG" and min(w, h) >= 2 * draft:
        im.draft(im.mode, (draft, draft))
    try:
        im.load()  # PIL raises OSError on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES is False)
    except Exception as exc:
        raise ImageDecodeError(f"{name}: image data is truncated or corrupt ({exc})") from None
    return im, (w, h)


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth and float greyscale to 8-bit greyscale, scaling by the type's range."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 65535.0 * 255.0
    elif im.mode == "F":
        hi = float(arr.max(initial=0))
        arr = arr / hi * 255.0 if hi > 1.0 else arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on black so that hidden colour values under transparent pixels do not leak.
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(
    data: bytes, size: int, name: str = "<bytes>", max_pixels: int = 100_000_000,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> (RGB uint8 [size, size, 3], original (width, height)); JPEGs decode at a reduced scale."""
    im, original = _open(data, name, max_pixels, max_bytes, draft=size if JPEG_DRAFT else None)
    rgb = _rgb(im).resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).copy(), original


def decode_mask(
    data: bytes, size: int, name: str = "<bytes>", expected_size: tuple[int, int] | None = None,
    max_pixels: int = 100_000_000, rule: MaskRule = "half",
) -> np.ndarray:
    """Mask bytes -> bool [size, size]: binarised by ``rule`` (see :data:`MaskRule`), then nearest resize.

    ``expected_size`` is the (width, height) of the image the mask belongs to; a mask of another
    size is refused because it cannot be aligned with the image reliably.
    """
    im, _ = _open(data, name, max_pixels, DEFAULT_MAX_BYTES)
    if expected_size is not None and im.size != tuple(expected_size):
        raise ImageDecodeError(
            f"{name}: mask is {im.size[0]}x{im.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]}; masks must match their image"
        )
    if rule == "nonzero":
        raw = np.asarray(im)  # stored values: palette indices for "P", not their colours
        if im.mode in ("RGBA", "LA", "PA"):
            raw = raw[..., :-1]  # alpha says nothing about defects
        defect = raw != 0 if raw.ndim == 2 else (raw != 0).any(axis=-1)
        grey = Image.fromarray(defect.astype(np.uint8) * 255)
    else:
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit(im)
        grey = im.convert("L")
    return np.asarray(grey.resize((size, size), Image.NEAREST)) >= 128
