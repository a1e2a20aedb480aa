import pytest
from pydantic import ValidationError

from lafite_core.config import PipelineConfig, config_hash, cpu_profile, load_profile, paper_profile


def test_hash_is_stable_and_sensitive():
    a, b = cpu_profile(), cpu_profile()
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 16
    assert config_hash(a) != config_hash(a.with_updates(scoring={"tau": 123}))
    assert config_hash(a) != config_hash(paper_profile())
    assert PipelineConfig.from_json(a.to_json()) == a


def test_profiles_match_the_paper_settings():
    p = paper_profile()
    assert p.backbone.name.startswith("tf_efficientnet_b4")
    assert p.backbone.feature_size == 32 and p.data.image_size == 224
    d = p.diffusion
    assert (d.base_channels, d.channel_mult, d.epochs, d.batch_size) == (256, (1, 2, 3, 4), 1000, 64)
    assert (d.lr, d.weight_decay, d.lr_drop_at, d.timesteps) == (1e-4, 1e-4, 0.8, 1000)
    assert p.coreset.keep_rate == 0.1 and p.scoring.smoothing_sigma == 4.0
    assert load_profile("cpu").backbone.name == "tf_efficientnet_lite0"


def test_frozen_and_validated():
    c = cpu_profile()
    with pytest.raises(ValidationError):
        c.seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="tau"):
        c.with_updates(scoring={"tau": 1000})
    with pytest.raises(ValidationError, match="divisible"):
        c.with_updates(backbone={"feature_size": 30})
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("gpu")
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate({"nonsense": 1})


def test_cpu_profile_has_a_step_budget_and_both_profiles_the_patchcore_baseline():
    from lafite_core.config import CPU_TRAIN_STEPS, ViewConfig

    p, c = paper_profile(), cpu_profile()
    assert p.diffusion.max_steps is None and p.features == ViewConfig()  # LafitE as in the paper
    assert c.diffusion.max_steps == CPU_TRAIN_STEPS and c.diffusion.epochs == 150  # epochs cap small sets
    # a nightly warm start fine-tunes 10% of the cpu profile's budget (measured), a quarter of the paper's
    assert (c.diffusion.warm_start_fraction, p.diffusion.warm_start_fraction) == (0.1, 0.25)
    assert p.baseline.recipe == c.baseline.recipe == "patchcore"
    for cfg in (p, c):  # PatchCore's recipe: the stride-8 and -16 levels, 3 x 3 cells of their own grids
        strides = [2 ** (cfg.backbone.out_indices[lv] + 1) for lv in cfg.baseline.view.levels]
        assert strides == [8, 16] and cfg.baseline.keep_rate == 0.01
        assert (cfg.baseline.view.local_aggregation, cfg.baseline.view.aggregate_at) == (3, "native")


def test_the_cpu_profile_stores_only_the_levels_its_views_look_at():
    """Every stored level costs disk, extraction writes and the training features' memory: the cpu
    profile stores Lite0's stride-8 and -16 levels, and LafitE and PatchCore's recipe use both."""
    c = cpu_profile()
    stored = range(len(c.backbone.out_indices))
    used = {lv for view in (c.features, c.baseline.view) for lv in (view.levels or stored)}
    assert used == set(stored) and [2 ** (i + 1) for i in c.backbone.out_indices] == [8, 16]
