"""bench/defect_probe.py: the per-defect-type figures on hand-made maps, and the script end to end on a
trained model (so that it cannot break unnoticed when the library changes)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "bench"))

from defect_probe import breakdown, halo, localisation_without, minus_image_median, split_auroc, window_scores  # noqa: E402


def _case():
    """Three good images with scores in [0, 1); type 'wide' has a large mask scored 5 inside and 2
    outside (its whole image is shifted above the good ones); type 'spot' has a 2 x 2 mask scored 9
    and a ring of 3 around it; its rest scores -1, below every good pixel."""
    rng = np.random.default_rng(0)
    n, s = 6, 16
    types = np.array(["good", "good", "good", "wide", "wide", "spot"])
    maps = rng.random((n, s, s)).astype(np.float32)
    masks = np.zeros((n, s, s), bool)
    for i in (3, 4):
        masks[i, :, :8] = True
        maps[i] = np.where(masks[i], 5.0, 2.0)
    masks[5, 7:9, 7:9] = True
    maps[5] = -1.0
    maps[5, 6:10, 6:10] = 3.0
    maps[5][masks[5]] = 9.0
    return types, maps, masks


def test_breakdown_separates_defect_pixels_from_the_same_images_and_from_good_ones():
    types, maps, masks = _case()
    rows = {r.defect_type: r for r in breakdown(types, maps, masks)}
    assert list(rows) == ["spot", "wide"]
    wide, spot = rows["wide"], rows["spot"]
    assert (wide.images, spot.images) == (2, 1)
    assert wide.pixel_share == pytest.approx(256 / 260) and spot.pixel_share == pytest.approx(4 / 260)
    assert wide.area == pytest.approx(0.5) and spot.area == pytest.approx(4 / 256)
    assert wide.in_vs_out == spot.in_vs_out == 1.0  # inside above outside in both
    assert wide.out_vs_good == 1.0  # the whole image sits above the good ones
    assert spot.out_vs_good == pytest.approx(12 / 252)  # only the ring of 12 pixels is raised
    assert wide.localisation == spot.localisation == 1.0


def test_localisation_without_the_dominant_type_and_the_halo_bands():
    types, maps, masks = _case()
    maps = maps.copy()
    maps[3:5][masks[3:5]] = 1.5  # 'wide' now ranks its defect pixels below its own normal ones
    with_all = split_auroc(maps[masks], maps[~masks])
    assert with_all < 0.85
    assert localisation_without(types, maps, masks, "wide") == 1.0
    assert localisation_without(types[types != "spot"], maps[types != "spot"], masks[types != "spot"],
                                "wide") is None  # no defect pixel left
    bands = halo(types, maps, masks, (("near", 0.5, 1.5), ("far", 1.5, 100.0)))
    (near, n_near), (far, n_far) = bands["near"], bands["far"]
    # next to the masks: 'wide''s column 8 (at 2) and 'spot''s ring (at 3), all above good pixels;
    # further away 'wide''s shifted rest (224 pixels) sits above them and 'spot''s rest (240) below
    assert near == 1.0 and far == pytest.approx(224 / 464)
    assert n_near == 2 * 16 + 12 and n_near + n_far == 2 * 128 + 256 - 4  # every normal pixel of a defect image


def test_minus_image_median_takes_out_a_whole_image_shift():
    types, maps, masks = _case()
    maps = maps.copy()
    maps[3:5] = np.where(masks[3:5], 5.0, 2.0) + np.arange(256).reshape(16, 16) / 1e3  # no ties
    shifted = minus_image_median(maps)
    assert np.allclose(np.median(shifted.reshape(6, -1), axis=1), 0)
    assert np.allclose(shifted[3] - maps[3], shifted[3, 0, 0] - maps[3, 0, 0])  # one offset an image
    # 'wide''s median lies between its two halves, so its normal half drops from above every good
    # pixel to below every one: the shift goes, and with it part of its defect's contrast
    assert split_auroc(maps[3:5][~masks[3:5]], maps[:3]) == 1.0
    assert split_auroc(shifted[3:5][~masks[3:5]], shifted[:3]) == 0.0


def test_window_scores_from_the_max_pixel_to_the_map_mean():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 2, 3] = 8.0  # one bright pixel
    maps[1, :4, :4] = 1.0  # a dim quarter
    assert window_scores(maps, 1).tolist() == [8.0, 1.0]
    assert np.allclose(window_scores(maps, 2), [2.0, 1.0])
    assert np.allclose(window_scores(maps, 8), [8 / 64, 16 / 64])  # the mean: the wide dim area wins


def test_breakdown_refuses_what_it_cannot_measure():
    types, maps, masks = _case()
    with pytest.raises(ValueError, match="no good images"):
        breakdown(np.array(["wide"] * 6), maps, masks)
    with pytest.raises(ValueError, match="shapes disagree"):
        breakdown(types, maps[:, :8], masks)
    assert split_auroc(np.array([1.0]), np.array([])) is None


def test_defect_probe_runs_on_a_trained_model(tmp_path, trained_store, small_demo):
    out = tmp_path / "probe"
    done = subprocess.run([sys.executable, str(PROJECT / "bench" / "defect_probe.py"), "--store", trained_store,
                           "--data-root", str(small_demo.root), "--out", str(out)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.with_suffix(".md").read_text()
    scorers = ("LafitE", "PatchCore", "editing bound", "nearest member")
    for cat in small_demo.categories:
        assert f"## demo/{cat}:" in text
    # per category: one per-type row per (scorer, defect type), one summary row and one distance-band
    # row per scorer, and one window-table row per window for LafitE and PatchCore
    types = {cat: sorted({p.name for p in (small_demo.path / cat / "test").iterdir()} - {"good"})
             for cat in small_demo.categories}
    lines = text.splitlines()
    side = int(re.search(r"; maps (\d+) x \1", text).group(1))
    for scorer in scorers:
        rows = [line for line in lines if line.startswith(f"| {scorer}")]
        windows = 0
        if scorer in ("LafitE", "PatchCore"):
            windows = len({min(w, side) for w in (1, 16, 32, 48, 64)} | {side})
        expected = sum(len(t) + 2 + windows for t in types.values())
        assert len(rows) == expected, (scorer, len(rows), expected)
