import math

import numpy as np
import pytest
import torch

from lafite_core.method.ddim import DDIMSampler
from lafite_core.method.schedule import add_noise, cosine_schedule


def test_cosine_schedule_invariants():
    s = cosine_schedule(1000)
    assert s.betas.dtype == np.float64 and s.num_timesteps == 1000
    assert np.all((s.betas > 0) & (s.betas <= 0.999))
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert s.alphas_cumprod[0] > 0.999 and s.alphas_cumprod[-1] < 1e-6
    np.testing.assert_allclose(np.cumprod(1 - s.betas), s.alphas_cumprod)
    # closed form of the cosine schedule away from the clipped end
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(s.alphas_cumprod[:900], f(np.arange(1, 901)) / f(0), rtol=1e-10)
    assert s.alpha_bar(-1) == 1.0
    with pytest.raises(IndexError):
        s.alpha_bar(1000)


def test_add_noise_matches_eq3_moments():
    s = cosine_schedule(1000)
    x0 = torch.full((20000,), 2.0, dtype=torch.float64)
    eps = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xt = s.add_noise(x0, eps, 300)
    ab = s.alphas_cumprod[300]
    assert abs(xt.mean().item() - 2 * np.sqrt(ab)) < 0.02
    assert abs(xt.var().item() - (1 - ab)) < 0.02


def test_add_noise_is_eq3_bit_for_bit_for_floats_and_per_sample_tensors():
    s = cosine_schedule(1000)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 3, 5, 5, generator=g)
    # a float (scoring at one tau): square roots in float64, then float32 arithmetic
    ab = s.alpha_bar(700)
    assert torch.equal(add_noise(x0, eps, ab), math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps)
    # a [B] float32 tensor (training, one t per sample): square roots in float32, per row
    t = torch.tensor([0, 250, 999, 500])
    a = torch.tensor(s.alphas_cumprod, dtype=torch.float32)[t]
    expected = torch.stack([a[i].sqrt() * x0[i] + (1 - a[i]).sqrt() * eps[i] for i in range(4)])
    assert torch.equal(add_noise(x0, eps, a), expected)
    assert torch.equal(s.add_noise(x0, eps, t), expected)
    # and both are eq. 3 in float64 up to float32 rounding (1 - ab_t loses digits in float32 near t=0)
    ref = np.sqrt(s.alphas_cumprod[t])[:, None, None, None] * x0.double().numpy() \
        + np.sqrt(1 - s.alphas_cumprod[t])[:, None, None, None] * eps.double().numpy()
    np.testing.assert_allclose(expected.numpy(), ref, rtol=0, atol=1e-4)
    assert not torch.equal(add_noise(x0, eps, a), add_noise(x0, eps, a.flip(0)))


def test_timesteps_descend_from_tau_and_prev_is_lookup():
    d = DDIMSampler(cosine_schedule(1000))
    ts = d.set_timesteps(5, 400)
    assert ts == [400, 320, 240, 160, 80]
    assert d.prev_timestep(400) == 320 and d.prev_timestep(80) == -1
    assert d.set_timesteps(50, 3) == [3, 2, 1, 0]
    with pytest.raises(ValueError):
        d.set_timesteps(5, 1000)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_ddim_with_perfect_noise_predictor_returns_x0(eta, steps):
    s = cosine_schedule(1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64) * 3
    tau = 600
    x_tau = s.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), tau)

    def oracle(x_t, t):
        ab = torch.tensor(s.alphas_cumprod, dtype=torch.float64)[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    out = DDIMSampler(s, eta=eta).reconstruct(oracle, x_tau, tau, steps, g)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-8)


def test_ddim_with_wrong_predictor_does_not_return_x0():
    s = cosine_schedule(1000)
    x0 = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    x_tau = s.add_noise(x0, torch.zeros_like(x0), 500)
    out = DDIMSampler(s).reconstruct(lambda x, t: torch.ones_like(x), x_tau, 500, 5)
    assert (out - x0).abs().max() > 0.1


def test_ddim_per_image_generators_make_rows_batch_independent():
    s = cosine_schedule(1000)
    d = DDIMSampler(s, eta=1.0)
    x = torch.zeros(2, 3, 2, 2)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]  # noqa: E731
    both = d.reconstruct(model, x, 300, 3, gens([5, 6]))
    alone = d.reconstruct(model, x[1:], 300, 3, gens([6]))
    torch.testing.assert_close(both[1:], alone)
