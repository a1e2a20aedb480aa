import numpy as np
import pytest
import torch

from lafite_core.method.ddim import DDIMSampler
from lafite_core.method.schedule import cosine_schedule
from lafite_core.method.scoring import gaussian_blur, gaussian_kernel1d, lafite_errors, reconstruction_error, to_anomaly_maps


def test_gaussian_kernel_matches_reference_formula():
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 33
    x = np.arange(-16, 17)
    ref = np.exp(-0.5 * (x / 4.0) ** 2)
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), rtol=1e-6)


def test_blur_preserves_mass_of_interior_impulse_and_constants():
    m = torch.zeros(1, 64, 64)
    m[0, 32, 32] = 1.0
    out = gaussian_blur(m, 4.0)
    assert abs(out.sum().item() - 1.0) < 1e-5 and out[0, 32, 32] < 0.02
    c = torch.full((2, 40, 40), 3.0)
    torch.testing.assert_close(gaussian_blur(c, 4.0), c)


def test_anomaly_maps_shape_and_score_is_max_of_pooled_map():
    err = torch.zeros(2, 32, 32)
    err[1, 10:14, 10:14] = 5.0
    out = to_anomaly_maps(err, 224, 4.0, 16)
    assert out.maps.shape == (2, 224, 224)
    assert out.scores[0] == 0 and out.scores[1] > 0
    pooled = torch.nn.functional.avg_pool2d(out.maps[1][None, None], 16, stride=1)
    assert torch.isclose(out.scores[1], pooled.max())
    # the peak of the map lies over the error region (10..14 of 32 -> 70..98 of 224)
    y, x = np.unravel_index(out.maps[1].argmax().item(), (224, 224))
    assert 66 <= y <= 102 and 66 <= x <= 102


def test_anomaly_maps_equal_upsampling_then_blur():
    """to_anomaly_maps computes the map as two matrix products; they must give what bilinear
    upsampling followed by the Gaussian blur gives, on square and non-square error maps."""
    g = torch.Generator().manual_seed(0)
    for shape, size, sigma in (((3, 28, 28), 224, 4.0), ((2, 20, 28), 224, 4.0), ((2, 32, 32), 256, 2.5),
                               ((2, 28, 28), 224, 0.0)):
        err = torch.rand(*shape, generator=g) * 3
        up = torch.nn.functional.interpolate(err[:, None], size=(size, size), mode="bilinear", align_corners=False)
        ref = gaussian_blur(up[:, 0], sigma)
        out = to_anomaly_maps(err, size, sigma, 16)
        assert out.maps.shape == (shape[0], size, size)
        torch.testing.assert_close(out.maps, ref, rtol=1e-5, atol=1e-5)


def test_reconstruction_error_is_l2_over_channels():
    a = torch.zeros(1, 3, 2, 2)
    b = torch.zeros(1, 3, 2, 2)
    b[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])
    e = reconstruction_error(a, b)
    assert e.shape == (1, 2, 2) and e[0, 0, 0] == 5.0 and e[0, 1, 1] == 0


def test_lafite_errors_zero_with_perfect_model_and_deterministic():
    s = cosine_schedule(1000)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def oracle(x_t, t):
        ab = torch.tensor(s.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0[: x_t.shape[0]]) / (1 - ab).sqrt()

    err = lafite_errors(x0, oracle, DDIMSampler(s), 300, 5, [1, 2], None)
    assert err.abs().max() < 1e-4
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = lafite_errors(x0, zero, DDIMSampler(s), 300, 5, [1, 2], None)
    b = lafite_errors(x0, zero, DDIMSampler(s), 300, 5, [1, 2], None)
    c = lafite_errors(x0, zero, DDIMSampler(s), 300, 5, [3, 2], None)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], c[0]) and torch.allclose(a[1], c[1])
    # editing is applied before noising: an editor that zeroes the input changes the result
    d = lafite_errors(x0, zero, DDIMSampler(s), 300, 5, [1, 2], lambda x: torch.zeros_like(x))
    assert not torch.allclose(a, d)


def test_a_wider_image_pool_ranks_a_spread_defect_above_a_lone_spike():
    """The cpu profile's 32 x 32 pool (the paper profile keeps 16): the image score favours errors that
    cover a region over one bright patch, which a 16 x 16 pool still ranks first."""
    from lafite_core.config import cpu_profile, paper_profile

    assert cpu_profile().scoring.image_pool == 32 and paper_profile().scoring.image_pool == 16
    err = torch.zeros(2, 32, 32)
    err[0, 16, 16] = 10.0  # one bright feature cell
    err[1, 12:17, 12:17] = 0.8  # a 5 x 5-cell region of moderate error
    s16 = to_anomaly_maps(err, 224, 4.0, 16).scores
    s32 = to_anomaly_maps(err, 224, 4.0, 32).scores
    assert s16[0] > s16[1] and s32[1] > s32[0]
    # a pool larger than the map is the map's mean
    small = to_anomaly_maps(err, 24, 0.0, 32)
    torch.testing.assert_close(small.scores, small.maps.flatten(1).mean(1))


def test_box_mean_equals_average_pooling_at_every_size():
    from lafite_core.method.scoring import box_mean

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 40, 37, generator=g) * 50 + 1000  # large values: the table's sums must not lose them
    for k in (1, 2, 7, 16, 32, 37):
        ref = torch.nn.functional.avg_pool2d(maps[:, None].double(), k, stride=1)[:, 0].float()
        out = box_mean(maps, k)
        assert out.shape == ref.shape and out.dtype == maps.dtype
        torch.testing.assert_close(out, ref, rtol=3e-7, atol=0)  # float32 rounding of the exact mean
    with pytest.raises(ValueError, match="does not fit"):
        box_mean(maps, 38)
    with pytest.raises(ValueError, match="does not fit"):
        box_mean(maps, 0)
