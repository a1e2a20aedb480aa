"""The in-memory pipeline end to end on real data (skipped without ../shared/data)."""

import pytest

from lafite_core.method.backbone import FeatureExtractor
from lafite_core.config import cpu_profile
from lafite_core.datapath.data import discover
from lafite_core.method.model import LafiteModel
from lafite_core.pipeline import evaluate, fit
from lafite_core.stages import holdout_draw


def tiny_config(epochs: int = 3):
    return cpu_profile().with_updates(
        diffusion={"base_channels": 16, "channel_mult": (1, 2), "epochs": epochs, "batch_size": 8, "lr": 1e-3},
        search={"taus": (50, 200), "ks": (1, 3), "ddim_steps": (1, 2)},
        scoring={"ddim_steps": 2},
    )


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(tiny_config().backbone)


def test_fit_and_evaluate_metal_plate(shared_data, extractor):
    cats = discover(str(shared_data / "mpdd"))
    cfg = tiny_config()
    result = fit(cats, cfg, extractor)
    model = result.model
    sel = result.selection
    assert sel is not None and model.tau in (50, 200) and model.k in (1, 3)
    assert [p.stage for p in sel.search.points] == ["tau", "tau", "k", "k", "steps", "steps"]
    assert model.config.scoring.ddim_steps == sel.search.ddim_steps in (1, 2)
    # the held-out normals: the images whose own draw falls below 20% (8 of the 54 here)
    held = sum(holdout_draw(cfg.seed, s.image_id) < 0.2 for s in cats[0].train)
    assert len(cats[0].train) == 54 and 2 <= held <= 0.3 * 54
    fitted = 54 - held
    assert model.extra["train_images"] == fitted and model.bank.shape[1] == 152  # lite0 strides 8 and 16: 40 + 112
    assert abs(model.bank.shape[0] - 0.1 * fitted * 1024) <= 3  # keep rate 10%, rounded per chunk
    assert model.bank_sources.rows.size == model.bank.shape[0] and model.bank_sources.images.size == fitted
    # two pseudo-anomalies for each held-out normal
    assert (sel.pseudo.labels == 0).sum() == held and (sel.pseudo.labels == 1).sum() == 2 * held
    cal = sel.calibration
    assert cal.overall.num_normal == held and 0.5 <= cal.overall.balanced_accuracy <= 1

    files = model.to_files()
    again = LafiteModel.from_files(files)
    rows = evaluate(again, cats, extractor)
    by_method = {r.method: r.metrics for r in rows}
    assert set(by_method) == {"lafite", "lafite_no_edit", "patchcore"}
    for m in by_method.values():
        for v in (m.image_auroc, m.image_ap, m.pixel_auroc, m.pixel_ap, m.aupro):
            assert 0 <= v <= 1
    # known answers on real data: the paper reports 100 / 98.7 (LafitE) and 100 / 98.6 (PatchCore)
    assert by_method["patchcore"].image_auroc >= 0.95 and by_method["patchcore"].pixel_auroc >= 0.95
    assert by_method["lafite"].image_auroc >= 0.95 and by_method["lafite"].pixel_auroc >= 0.95
    assert rows[0].num_images == 97


def test_a_stored_level_no_view_looks_at_changes_nothing(small_demo, extractor):
    """The cpu profile stores only the stride-8 and -16 levels its views use (until session 20 it also
    stored stride 32): fitting with the extra level stored gives the same model and the same scores."""
    import numpy as np
    import torch

    cats = discover(str(small_demo.root))
    fitted, rows = {}, {}
    for out_indices in ((2, 3), (2, 3, 4)):
        cfg = tiny_config(epochs=2).with_updates(backbone={"out_indices": out_indices})
        ex = extractor if out_indices == tiny_config().backbone.out_indices else FeatureExtractor(cfg.backbone)
        fitted[out_indices] = fit(cats, cfg, ex).model
        rows[out_indices] = [(r.category, r.method, r.metrics.image_auroc, r.metrics.pixel_auroc)
                             for r in evaluate(fitted[out_indices], cats, ex)]
    a, b = fitted[(2, 3)], fitted[(2, 3, 4)]
    assert a.backbone["channels"] == [40, 112] and b.backbone["channels"] == [40, 112, 320]
    assert (a.tau, a.k, a.config.scoring.ddim_steps) == (b.tau, b.k, b.config.scoring.ddim_steps)
    np.testing.assert_array_equal(a.bank, b.bank)
    np.testing.assert_array_equal(a.baseline_bank, b.baseline_bank)
    for (name, x), y in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(x, y), name
    assert rows[(2, 3)] == rows[(2, 3, 4)] and len(rows[(2, 3)]) == 9
