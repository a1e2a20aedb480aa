"""compute.precision: where bf16 autocast is chosen, that fp32 is the plain path, and that bf16 stays close."""

import logging

import numpy as np
import pytest
import torch

from lafite_core.config import cpu_profile
from lafite_core.method import precision
from lafite_core.method.model import LafiteModel, Scorer
from lafite_core.method.normalize import FeatureStats
from lafite_core.method.scoring import lafite_errors
from lafite_core.method.train import train_unet

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\nmodel name\t: X\n"


def _cfg(p="fp32"):
    return cpu_profile().with_updates(
        diffusion={"base_channels": 16, "channel_mult": (1, 2), "epochs": 2, "batch_size": 4, "lr": 1e-3},
        backbone={"feature_size": 8}, baseline={"recipe": "shared"},
        features={"levels": None, "local_aggregation": 1}, compute={"precision": p})


def _features(n=8, d=6, s=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, d, s, s, generator=g) + 0.1 * torch.randn(n, d, s, s, generator=g)


@pytest.mark.parametrize("extra, flags", [("", ()), ("avx512_bf16", ("avx512_bf16",)),
                                          ("amx_tile amx_bf16 avx512_bf16", ("amx_bf16", "avx512_bf16"))])
def test_cpu_bf16_flags_come_from_cpuinfo(tmp_path, extra, flags):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra=extra))
    assert precision.cpu_bf16_flags(str(info)) == flags
    assert precision.cpu_bf16_flags(str(tmp_path / "absent")) == ()


def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, caplog):
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert precision.resolve_precision("auto", "cpu", "test-a") == "fp32"
    with caplog.at_level(logging.WARNING, logger="lafite_core.method.precision"):
        assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert "emulated" in caplog.text  # forced bf16 without the hardware is loud
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    with caplog.at_level(logging.INFO, logger="lafite_core.method.precision"):
        assert precision.resolve_precision("auto", "cpu", "test-b") == "bf16"
    assert "amx_bf16" in caplog.text
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        precision.resolve_precision("fp16", "cpu")


def _model(p: str) -> LafiteModel:
    cfg = _cfg(p)
    x = _features()
    st = FeatureStats.fit(x)
    # a trained U-Net: a fresh one predicts exactly 0 (zero-initialised output layer) in any precision
    state = train_unet(st.apply(x), cfg.diffusion, seed=0, device=torch.device("cpu"))
    bank = st.apply(x).permute(0, 2, 3, 1).reshape(-1, 6).numpy()[::5].copy()
    return LafiteModel(cfg, st, state.unet.eval(), bank, categories=("d/c",)).with_hyperparameters(200, 3)


def test_fp32_scoring_is_the_plain_unet_path():
    model = _model("fp32")
    scorer = Scorer(model, "cpu")
    assert scorer.precision == "fp32" and scorer.eps_model is model.unet  # no wrapper at all
    x = _features()[:3]
    x0 = scorer.normalize(x)
    expected = lafite_errors(x0, model.unet, scorer.sampler, 200, model.config.scoring.ddim_steps, [1, 2, 3], None)
    torch.testing.assert_close(scorer.errors(x0, "lafite_no_edit", [1, 2, 3]), expected, rtol=0, atol=0)


def test_bf16_scoring_runs_under_autocast_and_stays_close_to_fp32():
    x = _features()[:4]
    a = Scorer(_model("fp32"), "cpu").score(x, "lafite", [1, 2, 3, 4])
    scorer = Scorer(_model("bf16"), "cpu")
    assert scorer.precision == "bf16"
    b = scorer.score(x, "lafite", [1, 2, 3, 4])
    assert b.maps.dtype == torch.float32 and not torch.equal(a.maps, b.maps)  # autocast really ran
    rel = (a.maps - b.maps).abs().max() / a.maps.abs().max()
    assert rel < 0.05, f"bf16 maps differ from fp32 by {rel:.3f} of the range"
    assert np.corrcoef(a.maps.flatten().numpy(), b.maps.flatten().numpy())[0, 1] > 0.99


def test_bf16_training_keeps_fp32_weights_and_learns():
    cfg = _cfg().diffusion.model_copy(update={"epochs": 6})
    x = _features(n=12)
    fp32 = train_unet(x, cfg, seed=1, device=torch.device("cpu"))
    bf16 = train_unet(x, cfg, seed=1, device=torch.device("cpu"), precision="bf16")
    assert all(p.dtype == torch.float32 for p in bf16.unet.parameters())
    assert bf16.losses[-1] < bf16.losses[0]
    assert bf16.losses != fp32.losses  # autocast changed the arithmetic
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.1)
