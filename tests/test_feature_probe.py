"""bench/feature_probe.py's tiling, centre-crop and reflect-pad paths on hand-made inputs."""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "bench"))

from feature_probe import PAD, cropped_line, stitched, tiles_of, unpadded  # noqa: E402


def test_tiles_cover_the_long_side_at_the_short_sides_scale(tmp_path):
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :, 0] = np.arange(300, dtype=np.uint8)[None] % 251  # a ramp along the long side
    Image.fromarray(arr).save(tmp_path / "wide.png")
    tiles, offs, shape = tiles_of(str(tmp_path / "wide.png"), 64)
    assert shape == (192, 64) and offs == [0, 64, 128] and all(t.shape == (64, 64, 3) for t in tiles)
    Image.fromarray(arr.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    tall, toffs, tshape = tiles_of(str(tmp_path / "tall.png"), 64)
    assert tshape == (64, 192) and toffs == [0, 64, 128]
    np.testing.assert_array_equal(tall[1], tiles[1].transpose(1, 0, 2))
    Image.fromarray(arr[:, :130]).save(tmp_path / "odd.png")  # 100 x 130 -> 64 x 83: two overlapping tiles
    _, ooffs, oshape = tiles_of(str(tmp_path / "odd.png"), 64)
    assert oshape == (83, 64) and ooffs == [0, 19]


def test_stitched_maps_average_overlaps_and_stretch_to_the_square():
    # image 0: two tiles side by side on a 128 x 64 frame (values 1 and 3); image 1: one tile (value 5)
    data = {"test_owner": np.array([0, 0, 1]), "test_offs": np.array([0, 64, 0]),
            "test_geo": np.array([(128, 64), (64, 64)]), "test_labels": np.array([1, 0])}
    tiles = torch.stack([torch.full((64, 64), v) for v in (1.0, 3.0, 5.0)])
    maps = stitched(data, tiles, 64)
    assert maps.shape == (2, 64, 64)
    assert maps[0, :, :20].mean() == 1.0 and maps[0, :, -20:].mean() == 3.0 and (maps[1] == 5.0).all()
    data["test_offs"] = np.array([0, 32, 0])  # overlapping on a 96 x 64 frame: the overlap is the mean
    data["test_geo"] = np.array([(96, 64), (64, 64)])
    over = stitched(data, tiles, 64)
    assert abs(float(over[0, 10, 32]) - 2.0) < 1e-5


def test_cropped_line_counts_what_the_crop_hid():
    masks = np.zeros((3, 8, 8), bool)
    masks[1, 2:4, 2:4] = True  # 4 pixels kept; 4 more were cut off
    data = {"test_cut": np.array([0, 4, 6]), "test_masks": np.packbits(masks, axis=-1),
            "test_labels": np.array([0, 1, 1])}
    assert cropped_line(data) == ["- the centre crop cut off 71.4% of the test set's defect pixels; "
                                  "1 of 2 defect images keep none of theirs"]


def test_unpadded_maps_drop_the_cells_of_the_mirrored_border():
    # a 224 px image padded by PAD on every side: stride s gives (224 + 2 PAD) / s cells, PAD / s of them padding
    for stride in (8, 16, 32):
        side = (224 + 2 * PAD) // stride
        maps = np.arange(2 * 3 * side * side, dtype=np.float32).reshape(2, 3, side, side)
        cut = unpadded(maps, PAD // stride)
        assert cut.shape == (2, 3, 224 // stride, 224 // stride) and cut.flags.c_contiguous
        np.testing.assert_array_equal(cut, maps[..., PAD // stride:side - PAD // stride, PAD // stride:side - PAD // stride])
