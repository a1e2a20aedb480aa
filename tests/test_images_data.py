import io

import numpy as np
import pytest
from PIL import Image

from lafite_core.datapath.data import discover, load_sample
from lafite_core.datapath.images import ImageDecodeError, decode_image, decode_mask


def _png(arr, mode=None, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt) if mode else Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(np.full((40, 30), 128, np.uint8)),  # grey
        lambda: Image.fromarray(np.full((40, 30, 3), 128, np.uint8)),  # RGB
        lambda: Image.fromarray(np.dstack([np.full((40, 30, 3), 128, np.uint8), np.full((40, 30), 255, np.uint8)])),
        lambda: Image.fromarray(np.full((40, 30), 128 * 257, np.uint16)),  # 16-bit
        lambda: Image.fromarray(np.full((40, 30), 128, np.uint8)).convert("P"),
        lambda: Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).convert("CMYK"),
    ],
)
def test_any_mode_becomes_rgb_at_size(make):
    im = make()
    buf = io.BytesIO()
    im.save(buf, format="TIFF" if im.mode == "CMYK" else "PNG")
    out, orig = decode_image(buf.getvalue(), 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert orig == (30, 40)
    assert np.all(np.abs(out.astype(int) - 128) <= 2), (im.mode, out.min(), out.max())


def test_bad_bytes_are_named_errors():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(b"", 224, "x.png")
    with pytest.raises(ImageDecodeError, match="not a recognised"):
        decode_image(b"hello, not an image", 224, "x.png")
    data = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="truncated|corrupt|header"):
        decode_image(data[: len(data) // 2], 224, "x.png")
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(data, 224, "x.png", max_pixels=1000)


def test_mask_nearest_binarised_and_size_checked():
    m = np.zeros((100, 100), np.uint8)
    m[:50] = 255
    out = decode_mask(_png(m), 224, expected_size=(100, 100))
    assert out.dtype == bool and out.shape == (224, 224)
    assert out[:100].all() and not out[130:].any()
    with pytest.raises(ImageDecodeError, match="mask is 100x100 but its image is 50x100"):
        decode_mask(_png(m), 224, "m.png", expected_size=(50, 100))


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _tree(root):
    img = np.zeros((32, 32, 3), np.uint8)
    for name in ("a.png", "b.png"):
        _write(root / "ds1" / "cat1" / "train" / "good" / name, img)
    _write(root / "ds1" / "cat1" / "test" / "good" / "g.png", img)
    _write(root / "ds1" / "cat1" / "test" / "crack" / "c1.png", img)
    _write(root / "ds1" / "cat1" / "test" / "crack" / "c2.png", img)
    mask = np.zeros((32, 32), np.uint8)
    mask[5:9, 5:9] = 255
    _write(root / "ds1" / "cat1" / "ground_truth" / "crack" / "c1_mask.png", mask)
    _write(root / "ds2" / "cat2" / "train" / "good" / "x.jpg", img)


def test_discover_nested_datasets_and_masks(tmp_path):
    _tree(tmp_path)
    cats = discover(str(tmp_path))
    assert [c.key for c in cats] == ["ds1/cat1", "ds2/cat2"]
    c = cats[0]
    assert [s.stem for s in c.train] == ["a", "b"]
    by_stem = {s.stem: s for s in c.test}
    assert by_stem["g"].label == 0 and by_stem["c1"].label == 1 and by_stem["c1"].defect_type == "crack"
    assert by_stem["c1"].mask_url.endswith("c1_mask.png") and by_stem["c2"].mask_url is None
    assert c.missing_masks == (by_stem["c2"].url,)
    # a root holding categories directly is named after the root; a category root works too
    assert [x.key for x in discover(str(tmp_path / "ds1"))] == ["ds1/cat1"]
    assert [x.key for x in discover(str(tmp_path / "ds1" / "cat1"))] == ["ds1/cat1"]
    assert [x.key for x in discover(str(tmp_path), ["cat2"])] == ["ds2/cat2"]
    loaded = load_sample(by_stem["c1"], 64)
    assert loaded.mask.sum() > 0 and loaded.image.shape == (64, 64, 3) and len(loaded.content_hash) == 64
    assert load_sample(by_stem["g"], 64).mask.sum() == 0


def test_discover_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no category"):
        discover(str(tmp_path / "empty"))
    _tree(tmp_path / "t")
    with pytest.raises(ValueError, match="not found"):
        discover(str(tmp_path / "t"), ["zzz"])


def test_discover_real_mpdd(shared_data):
    (c,) = discover(str(shared_data / "mpdd"))
    assert c.key == "mpdd/metal_plate"
    assert (len(c.train), sum(s.label == 0 for s in c.test), sum(s.label for s in c.test)) == (54, 26, 71)
    assert all(s.mask_url for s in c.test if s.label) and not c.missing_masks
    cats = discover(str(shared_data))
    assert {x.key for x in cats} == {"mpdd/metal_plate", "glass_ind/glass", "magnetic_tile/magnetic_tile"}


def test_discover_real_magnetic_tile(shared_data):
    """Five defect types, every defect with a mask; images of varying size are resized on load."""
    if not (shared_data / "magnetic_tile").is_dir():
        pytest.skip(f"magnetic_tile not found under {shared_data}")
    (c,) = discover(str(shared_data / "magnetic_tile"))
    assert c.key == "magnetic_tile/magnetic_tile"
    assert (len(c.train), sum(s.label == 0 for s in c.test), sum(s.label for s in c.test)) == (762, 190, 392)
    assert {s.defect_type for s in c.test if s.label} == {"blowhole", "break", "crack", "fray", "uneven"}
    assert all(s.mask_url for s in c.test if s.label) and not c.missing_masks


def _camera_jpeg(w: int, h: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 60 * np.sin(x / 37.0) + 40 * np.cos(y / 23.0), 128 + 50 * np.sin((x + y) / 51.0),
                    100 + rng.normal(0, 10, (h, w))], -1)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    (im.convert("L") if mode == "L" else im).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("size, mode, drafted", [((2000, 1500), "RGB", True), ((2000, 1500), "L", True),
                                                 ((400, 300), "RGB", False)])
def test_large_jpegs_decode_at_reduced_scale_like_a_full_decode(monkeypatch, size, mode, drafted):
    from PIL import JpegImagePlugin

    data = _camera_jpeg(*size, mode)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.BILINEAR)).astype(int)
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, m, s: calls.append(s) or real(self, m, s))
    out, original = decode_image(data, 224)
    assert original == size and out.shape == (224, 224, 3)
    assert bool(calls) == drafted  # only images at least twice the model size are decoded smaller
    diff = np.abs(out.astype(int) - full)
    assert diff.mean() < 1.0 and diff.max() <= 12, (diff.mean(), diff.max())
