"""Dataset layouts (MVTec AD, VisA, folder) on small generated trees, locally and on S3 (moto)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from lafite_core.datapath.data import discover, load_sample
from lafite_core.datapath.images import decode_mask
from lafite_core.datapath.layouts import DataLayout, split_normals

HEADER = "object,split,label,image,mask\n"


def _write(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)


def _visa_mask(value: int) -> np.ndarray:
    """A VisA-style mask: the defect region [8:16, 8:16] holds a small value, not 255."""
    m = np.zeros((32, 32), np.uint8)
    m[8:16, 8:16] = value
    return m


def _visa_tree(root: Path, extra_rows: str = "") -> Path:
    """Two objects; each 3 train normals, 1 test normal, 2 anomalies (masks valued 1 and 2) and, for
    pcb1, one anomaly listed without a mask."""
    rows = []
    for k, obj in enumerate(("candle", "pcb1")):
        for i in range(4):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _write(root / rel, _image(10 * k + i), "JPEG")
            rows.append(f"{obj},{'train' if i < 3 else 'test'},normal,{rel},")
        for i, value in enumerate((1, 2)):
            rel, mask = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _write(root / rel, _image(100 + 10 * k + i), "JPEG")
            _write(root / mask, _visa_mask(value))
            rows.append(f"{obj},test,anomaly,{rel},{mask}")
    _write(root / "pcb1/Data/Images/Anomaly/002.JPG", _image(200), "JPEG")
    rows.append("pcb1,test,anomaly,pcb1/Data/Images/Anomaly/002.JPG,")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text(HEADER + "\n".join(rows) + "\n" + extra_rows)
    return root


def _folder_tree(root: Path, normals: int = 10) -> Path:
    """normal/ (``normals`` images), defect/ (3), masks/ for two of them (one named <stem>_mask)."""
    for i in range(normals):
        _write(root / "normal" / f"n{i:02d}.png", _image(i))
    for i in range(3):
        _write(root / "defect" / f"d{i}.png", _image(50 + i))
    _write(root / "masks" / "d0.png", _visa_mask(1))
    _write(root / "masks" / "d1_mask.png", _visa_mask(255))
    for i in range(2):
        _write(root / "normal_test" / f"t{i}.png", _image(80 + i))
    return root


def _mvtec_category(root: Path) -> None:
    _write(root / "train" / "good" / "a.png", _image(0))
    _write(root / "test" / "good" / "g.png", _image(1))


# VisA


def test_visa_categories_splits_labels_and_masks(tmp_path):
    root = _visa_tree(tmp_path / "visa")
    cats = discover(str(root))
    assert [c.key for c in cats] == ["visa/candle", "visa/pcb1"]
    assert [c.key for c in discover(str(root), layout=DataLayout(format="visa"))] == [c.key for c in cats]
    candle, pcb = cats
    assert [s.stem for s in candle.train] == ["0000", "0001", "0002"]
    assert all(s.split == "train" and s.label == 0 for s in candle.train)
    assert [(s.stem, s.label, s.defect_type) for s in candle.test] == [
        ("000", 1, "anomaly"), ("001", 1, "anomaly"), ("0003", 0, "good")]
    assert all(s.mask_url and s.mask_rule == "nonzero" for s in candle.test if s.label)
    assert candle.has_masks and not candle.missing_masks
    assert pcb.missing_masks == (str(root / "pcb1/Data/Images/Anomaly/002.JPG"),)
    assert len({s.image_id for c in cats for s in c.train + c.test}) == 2 * 6 + 1  # ids stay unique

    by_stem = {s.stem: s for s in candle.test}
    for stem in ("000", "001"):  # mask values 1 and 2: the defect region, and nothing else
        loaded = load_sample(by_stem[stem], 32)
        assert loaded.mask_error is None and loaded.mask[8:16, 8:16].all() and loaded.mask.sum() == 64
    assert load_sample(by_stem["0003"], 32).mask.sum() == 0


def test_mask_rules_half_and_nonzero():
    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    small = png(Image.fromarray(_visa_mask(1)))
    assert not decode_mask(small, 32).any()  # MVTec's rule reads a VisA mask as empty
    assert decode_mask(small, 32, rule="nonzero").sum() == 64
    assert decode_mask(small, 64, rule="nonzero").sum() == 256  # nearest resize keeps the region

    palette = Image.fromarray(_visa_mask(1)).convert("P")
    palette.putpalette([0, 0, 0] + [0, 0, 0] * 255)  # every index drawn black: the index counts, not its colour
    assert decode_mask(png(palette), 32, rule="nonzero").sum() == 64

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha is no defect
    rgba[8:16, 8:16, 0] = 3
    assert decode_mask(png(Image.fromarray(rgba)), 32, rule="nonzero").sum() == 64

    full = np.zeros((32, 32), np.uint8)
    full[:4] = 255
    assert decode_mask(png(Image.fromarray(full)), 32, rule="nonzero").sum() == decode_mask(
        png(Image.fromarray(full)), 32).sum() == 4 * 32


def test_visa_rows_outside_the_root_are_skipped(tmp_path, caplog):
    outside = tmp_path / "elsewhere.JPG"
    _write(outside, _image(7), "JPEG")
    root = tmp_path / "visa"
    extra = ("candle,train,normal,candle/Data/Images/Normal/missing.JPG,\n"
             "candle,train,normal,../elsewhere.JPG,\n"
             "candle,train,normal,candle/Data/Images/Normal/link.JPG,\n"
             "fryum,train,normal,fryum/Data/Images/Normal/0000.JPG,\n")
    _visa_tree(root, extra)
    (root / "candle/Data/Images/Normal/link.JPG").symlink_to(outside)
    with caplog.at_level("WARNING"):
        cats = discover(str(root))
    assert [c.key for c in cats] == ["visa/candle", "visa/pcb1"]  # fryum is not under this root
    assert len(cats[0].train) == 3
    assert "4 images listed in split_csv/1cls.csv are not under the root" in caplog.text


@pytest.mark.parametrize("csv_text, match", [
    ("object,split,image\ncandle,train,x.JPG\n", r"missing columns \['label', 'mask'\].*object,split,label,image,mask"),
    (HEADER + "candle,val,normal,candle/x.JPG,\n", "line 2: .*split train or test"),
    (HEADER + "candle,train,normal,candle/x.JPG,\ncandle,test,bad,candle/y.JPG,\n", "line 3: .*label"),
    (HEADER + "candle,train,anomaly,candle/x.JPG,\n", "anomalous image in the train split"),
])
def test_visa_bad_split_file_names_the_line(tmp_path, csv_text, match):
    (tmp_path / "v" / "split_csv").mkdir(parents=True)
    (tmp_path / "v" / "split_csv" / "1cls.csv").write_text(csv_text)
    with pytest.raises(ValueError, match=match):
        discover(str(tmp_path / "v"))


def test_auto_reads_visa_beside_mvtec_and_formats_restrict(tmp_path):
    _visa_tree(tmp_path / "visa")
    _mvtec_category(tmp_path / "mpdd" / "metal_plate")
    assert [c.key for c in discover(str(tmp_path))] == ["mpdd/metal_plate", "visa/candle", "visa/pcb1"]
    assert [c.key for c in discover(str(tmp_path), layout=DataLayout(format="mvtec"))] == ["mpdd/metal_plate"]
    assert [c.key for c in discover(str(tmp_path), layout=DataLayout(format="visa"))] == ["visa/candle",
                                                                                        "visa/pcb1"]
    assert [c.key for c in discover(str(tmp_path), ["pcb1"])] == ["visa/pcb1"]
    with pytest.raises(ValueError, match=r"no category in VisA layout \(<root>/split_csv/1cls.csv"):
        discover(str(tmp_path / "mpdd"), layout=DataLayout(format="visa"))
    with pytest.raises(ValueError, match=r"no category in MVTec AD layout \(<root>/<category>/train/good"):
        discover(str(tmp_path / "visa"), layout=DataLayout(format="mvtec"))


def test_a_root_matching_no_layout_names_every_layout(tmp_path):
    _write(tmp_path / "data" / "pictures" / "a.png", _image(0))
    with pytest.raises(ValueError) as err:
        discover(str(tmp_path / "data"))
    text = str(err.value)
    assert text.startswith("no category in MVTec AD layout (<root>/<category>/train/good/*.png")
    assert "VisA layout (<root>/split_csv/1cls.csv" in text and "--format folder --normal-dir" in text
    assert repr(str(tmp_path / "data")) in text


# Folder


def test_folder_layout_split_labels_and_masks(tmp_path):
    root = _folder_tree(tmp_path / "bottles")
    layout = DataLayout(normal_dir="normal", abnormal_dir="defect", mask_dir="masks")  # auto -> folder
    (c,) = discover(str(root), layout=layout)
    assert (c.key, c.url) == (f"{tmp_path.name}/bottles", str(root))
    assert (len(c.train), len(c.test)) == (8, 2 + 3)  # 20% of 10 normals tested
    assert {s.stem for s in c.train} | {s.stem for s in c.test if not s.label} == {f"n{i:02d}" for i in range(10)}
    assert [(s.stem, s.label, s.defect_type) for s in c.test if s.label] == [
        ("d0", 1, "abnormal"), ("d1", 1, "abnormal"), ("d2", 1, "abnormal")]
    masks = {s.stem: s.mask_url for s in c.test if s.label}
    assert masks["d0"].endswith("masks/d0.png") and masks["d1"].endswith("masks/d1_mask.png")
    assert masks["d2"] is None and c.missing_masks == (str(root / "defect" / "d2.png"),)
    d0 = next(s for s in c.test if s.stem == "d0")
    assert load_sample(d0, 32).mask.sum() == 64  # a 0/1 mask, read as anomalib does (> 0)

    # the same options, the same split; named category, explicit normal test folder, no ratio
    assert discover(str(root), layout=layout) == [c]
    (named,) = discover(str(root), layout=DataLayout(format="folder", normal_dir="normal", abnormal_dir="defect",
                                                     normal_test_dir="normal_test", category_name="bottle"))
    assert named.name == "bottle" and len(named.train) == 10 and not named.missing_masks
    assert [s.stem for s in named.test if not s.label] == ["t0", "t1"]
    (train_only,) = discover(str(root), layout=DataLayout(normal_dir="normal", normal_split_ratio=0.0))
    assert len(train_only.train) == 10 and not train_only.test


def test_folder_layout_errors_name_the_folder(tmp_path):
    root = _folder_tree(tmp_path / "bottles")
    with pytest.raises(ValueError, match=r"no abnormal images in .*bottles/nope: the folder layout"):
        discover(str(root), layout=DataLayout(normal_dir="normal", abnormal_dir="nope"))
    with pytest.raises(ValueError, match="no normal images"):
        discover(str(root), layout=DataLayout(normal_dir="defect/none"))


@pytest.mark.parametrize("kwargs, match", [
    ({"format": "folder"}, "needs normal_dir"),
    ({"abnormal_dir": "bad"}, "needs normal_dir"),
    ({"format": "visa", "normal_dir": "good"}, "only apply to format 'folder', not 'visa'"),
    ({"normal_dir": "good", "mask_dir": "m"}, "mask_dir needs abnormal_dir"),
    ({"normal_dir": "../good"}, "relative to the data root"),
    ({"normal_dir": "/data/good"}, "relative to the data root"),
    ({"normal_dir": "good", "normal_split_ratio": 1.0}, "less than 1"),
])
def test_layout_options_are_checked(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        DataLayout(**kwargs)


def test_split_normals_is_a_seeded_partition():
    paths = [f"p{i:02d}" for i in range(20)]
    shuffled = paths[::-1]
    train, test = split_normals(shuffled, 0.25, seed=3)
    assert (len(train), len(test)) == (15, 5) and sorted(train + test) == paths
    assert train == sorted(train) and test == sorted(test)
    assert split_normals(paths, 0.25, seed=3) == (train, test)  # order of the input does not matter
    assert len({tuple(split_normals(paths, 0.25, seed=s)[1]) for s in range(5)}) > 1
    assert split_normals(["only"], 0.5, seed=0) == (["only"], [])  # one image stays for training
    assert split_normals([], 0.2, seed=0) == ([], [])


# S3


@pytest.fixture()
def s3_trees(moto_s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=moto_s3.endpoint)
    if not fs.exists("lafite-layouts"):
        fs.mkdir("lafite-layouts")
    fs.put(str(_visa_tree(tmp_path / "visa")), "lafite-layouts/visa", recursive=True)
    fs.put(str(_folder_tree(tmp_path / "bottles")), "lafite-layouts/parts/bottles", recursive=True)
    fs.invalidate_cache()
    return {"endpoint_url": moto_s3.endpoint}


def test_layouts_on_s3(s3_trees):
    cats = discover("s3://lafite-layouts/visa", storage_options=s3_trees)
    assert [c.key for c in cats] == ["visa/candle", "visa/pcb1"]
    assert [(len(c.train), len(c.test)) for c in cats] == [(3, 3), (3, 4)]
    anomaly = next(s for s in cats[0].test if s.stem == "001")
    assert anomaly.url == "s3://lafite-layouts/visa/candle/Data/Images/Anomaly/001.JPG"
    assert anomaly.mask_url == "s3://lafite-layouts/visa/candle/Data/Masks/Anomaly/001.png"
    assert load_sample(anomaly, 32, storage_options=s3_trees).mask.sum() == 64
    assert [c.key for c in discover("s3://lafite-layouts", storage_options=s3_trees)] == ["visa/candle",
                                                                                       "visa/pcb1"]

    layout = DataLayout(normal_dir="normal", abnormal_dir="defect", mask_dir="masks", category_name="bottle")
    (c,) = discover("s3://lafite-layouts/parts/bottles", storage_options=s3_trees, layout=layout)
    assert c.key == "parts/bottle" and (len(c.train), len(c.test)) == (8, 5)
    assert all(s.url.startswith("s3://lafite-layouts/parts/bottles/") for s in c.train + c.test)
    d1 = next(s for s in c.test if s.stem == "d1")
    assert d1.mask_url.endswith("/masks/d1_mask.png")
    assert load_sample(d1, 32, storage_options=s3_trees).mask.sum() == 64
    with pytest.raises(ValueError, match=r"no category in MVTec AD layout .* or VisA layout"):
        discover("s3://lafite-layouts/parts", storage_options=s3_trees)


# Command line and flow parameters


def test_format_reaches_discover_from_the_command_line(tmp_path, monkeypatch, capsys):
    import flows.train
    from flows.cli import main
    from flows.params import TrainParams
    from tasks.features import discover_task

    root = _visa_tree(tmp_path / "visa")
    seen: list[TrainParams] = []

    def fake_train_flow(params: TrainParams) -> SimpleNamespace:
        seen.append(params)
        return SimpleNamespace(model_version="v", tau=50, k=1, threshold=0.5, store=params.store, evaluation=None)

    monkeypatch.setattr(flows.train, "train_flow", fake_train_flow)
    assert main(["train", "--data-root", str(root), "--format", "visa", "--no-evaluate",
                 "--store", str(tmp_path / "store")]) == 0
    (params,) = seen
    assert params.layout == DataLayout(format="visa")
    # deployments pass parameters as JSON: the layout survives the round trip
    assert TrainParams.model_validate_json(params.model_dump_json()) == params
    assert [c.key for c in discover_task.fn(params.data_root, params.categories, params.layout)] == [
        "visa/candle", "visa/pcb1"]

    folder = _folder_tree(tmp_path / "bottles")
    main(["train", "--data-root", str(folder), "--normal-dir", "normal", "--abnormal-dir", "defect",
          "--normal-split-ratio", "0.3", "--category-name", "bottle", "--no-evaluate"])
    layout = seen[-1].layout
    assert (layout.format, layout.normal_dir, layout.normal_split_ratio) == ("auto", "normal", 0.3)
    assert [c.key for c in discover_task.fn(str(folder), None, layout)] == [f"{tmp_path.name}/bottle"]
    assert TrainParams(data_root="x").layout == DataLayout()  # existing deployments: detected, as before

    with pytest.raises(SystemExit, match="normal_dir only apply to format 'folder', not 'mvtec'"):
        main(["train", "--data-root", str(folder), "--format", "mvtec", "--normal-dir", "normal"])
