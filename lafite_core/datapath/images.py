"""Decoding images and masks of any common size and mode into model-sized arrays.

Images become RGB uint8 [S, S, 3] (bilinear resize); masks become bool [S, S] (nearest resize,
binarised by a :data:`MaskRule`: at half the value range, or any non-zero value). Decoding is bounded: files over ``max_bytes`` and images over
``max_pixels`` are refused before their pixels are decoded. A JPEG larger than the model size is
decoded at a reduced scale (1/2, 1/4 or 1/8 in the DCT, ``PIL.Image.draft``) that keeps both sides
at least the model size, before the resize: a camera-sized image then costs a fraction of a full decode.
With a centre crop (``crop`` < 1, ``DataConfig.center_crop``) images and masks are resized to a larger
square and only its centre S x S is kept, as PatchCore's evaluation does (256 -> 224).
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


def crop_resize_size(size: int, crop: float) -> int:
    """The square side an image is resized to before its centre ``size`` x ``size`` is kept
    (``crop`` = 1: no crop; PatchCore's 256 -> 224 is ``crop`` 0.875)."""
    if not 0.0 < crop <= 1.0:
        raise ValueError(f"center crop must be in (0, 1], got {crop}")
    return max(size, round(size / crop))


def crop_window(size: int, crop: float) -> tuple[float, float]:
    """Where the centre crop lies on each axis, as fractions (start, end) of the image's width or height."""
    full = crop_resize_size(size, crop)
    x0 = (full - size) // 2
    return x0 / full, (x0 + size) / full


def _resize_crop(im: Image.Image, size: int, crop: float, resample: int) -> Image.Image:
    full = crop_resize_size(size, crop)
    im = im.resize((full, full), resample)
    if full == size:
        return im
    x0 = (full - size) // 2  # as crop_window says
    return im.crop((x0, x0, x0 + size, x0 + size))


def decode_image(
    data: bytes, size: int, name: str = "<bytes>", max_pixels: int = 100_000_000,
    max_bytes: int = DEFAULT_MAX_BYTES, crop: float = 1.0,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> (RGB uint8 [size, size, 3], original (width, height)); JPEGs decode at a reduced scale.

    ``crop`` < 1 resizes to :func:`crop_resize_size` and keeps the centre: the border is never seen.
    """
    full = crop_resize_size(size, crop)
    im, original = _open(data, name, max_pixels, max_bytes, draft=full if JPEG_DRAFT else None)
    rgb = _resize_crop(_rgb(im), size, crop, Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).copy(), original


def decode_mask(
    data: bytes, size: int, name: str = "<bytes>", expected_size: tuple[int, int] | None = None,
    max_pixels: int = 100_000_000, rule: MaskRule = "half", crop: float = 1.0,
) -> np.ndarray:
    """Mask bytes -> bool [size, size]: binarised by ``rule`` (see :data:`MaskRule`), then nearest resize
    (and the same centre crop as its image's, see :func:`decode_image`).

    ``expected_size`` is the (width, height) of the image the mask belongs to; a mask of another
    size is refused because it cannot be aligned with the image reliably.
    """
    return decode_mask_cropped(data, size, name, expected_size, max_pixels, rule, crop)[0]


def decode_mask_cropped(
    data: bytes, size: int, name: str = "<bytes>", expected_size: tuple[int, int] | None = None,
    max_pixels: int = 100_000_000, rule: MaskRule = "half", crop: float = 1.0,
) -> tuple[np.ndarray, int]:
    """:func:`decode_mask` and how many defect pixels the centre crop cut off (on the resized grid)."""
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
    full = np.asarray(grey.resize((crop_resize_size(size, crop),) * 2, Image.NEAREST)) >= 128
    x0 = (full.shape[0] - size) // 2
    mask = full[x0:x0 + size, x0:x0 + size].copy()
    return mask, int(full.sum()) - int(mask.sum())
