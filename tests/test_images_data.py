import hashlib
import io
import json

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


def _framed(side=100, border=10):
    """RGB: a red border ``border`` px wide around a green centre; its mask: defects in the border's
    top-left corner and a centre square."""
    arr = np.zeros((side, side, 3), np.uint8)
    arr[..., 0] = 255
    arr[border:side - border, border:side - border] = (0, 255, 0)
    mask = np.zeros((side, side), np.uint8)
    mask[:border, :border] = 255
    mask[40:60, 40:60] = 255
    return _png(arr), _png(mask)


def test_center_crop_never_shows_the_border_and_crops_the_mask_alike():
    from lafite_core.datapath.images import crop_resize_size, decode_mask_cropped

    image, mask = _framed()
    assert crop_resize_size(224, 0.875) == 256 and crop_resize_size(64, 1.0) == 64
    whole, _ = decode_image(image, 64)
    assert (whole[0, 0] == (255, 0, 0)).all()  # the border is there without a crop
    cropped, original = decode_image(image, 64, crop=0.8)  # resized to 80, the border is 8 px: all cut
    assert original == (100, 100) and cropped.shape == (64, 64, 3)
    assert (cropped[..., 0] < 60).all() and (cropped[..., 1] > 200).all()
    m, cut = decode_mask_cropped(mask, 64, crop=0.8)
    assert m.shape == (64, 64) and cut == 64  # the 8 x 8 corner on the 80 px grid
    assert m[24:40, 24:40].all() and m.sum() == 16 * 16  # the centre square, shifted by the 8 px crop
    assert (decode_mask(mask, 64, crop=0.8) == m).all()
    assert decode_mask_cropped(mask, 64)[1] == 0  # no crop, nothing cut
    with pytest.raises(ValueError, match="center crop"):
        decode_image(image, 64, crop=0.0)


def test_center_crop_reaches_samples_and_warns_about_cut_defects(tmp_path, caplog):
    from lafite_core.config import PipelineConfig
    from lafite_core.stages import warn_cropped_defects
    from lafite_core.store.feature_store import feature_key

    image, mask = _framed()
    root = tmp_path / "ds" / "cat"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / sub).mkdir(parents=True)
    (root / "train/good/a.png").write_bytes(image)
    (root / "test/good/g.png").write_bytes(image)
    (root / "test/crack/c.png").write_bytes(image)
    (root / "ground_truth/crack/c_mask.png").write_bytes(mask)
    cat = discover(str(tmp_path))[0]
    by_stem = {s.stem: s for s in cat.test}
    loaded = [load_sample(by_stem[s], 64, crop=0.8) for s in ("g", "c")]
    assert loaded[1].mask_cut == 64 and loaded[1].mask.sum() == 256 and loaded[0].mask_cut == 0
    assert (loaded[1].image[..., 1] > 200).all()
    with caplog.at_level("WARNING"):
        warn_cropped_defects("ds/cat", loaded, 0.8)
    assert "cuts off 20.0% of the ground truth's defect pixels; 0 defect image(s)" in caplog.text
    caplog.clear()
    warn_cropped_defects("ds/cat", [load_sample(by_stem["c"], 64)], 1.0)
    assert caplog.text == ""
    # cropped features are other features; uncropped keys did not change with the option
    base = PipelineConfig()
    assert feature_key(base.with_updates(data={"center_crop": 0.875})) != feature_key(base)
    old = {"backbone": base.backbone.model_dump(mode="json"), "image_size": base.data.image_size}  # the key before
    assert feature_key(base) == "f" + hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
