import torch

from lafite_core.config import DiffusionConfig
from lafite_core.method.unet import UNet, timestep_embedding


def _cfg(**kw):
    base = dict(base_channels=16, channel_mult=(1, 2, 3), num_res_blocks=1, attention_resolutions=(8,))
    return DiffusionConfig(**{**base, **kw})


def test_shapes_and_zero_init_output():
    net = UNet(24, 32, _cfg())
    x = torch.randn(2, 24, 32, 32)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # output convolution starts at zero


def test_timestep_changes_output_after_training_steps():
    torch.manual_seed(0)
    net = UNet(8, 16, _cfg(channel_mult=(1, 2)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 8, 16, 16)
    for _ in range(3):  # zero-initialised layers pass gradients on only after the first steps
        opt.zero_grad()
        loss = (net(x, torch.tensor([1, 2, 3, 4])) - 1).pow(2).mean()
        loss.backward()
        opt.step()
    a = net(x[:1], torch.tensor([10]))
    b = net(x[:1], torch.tensor([900]))
    assert not torch.allclose(a, b)


def test_timestep_embedding_distinct():
    e = timestep_embedding(torch.arange(1000), 64)
    assert e.shape == (1000, 64)
    assert torch.cdist(e[:50], e[:50]).fill_diagonal_(1).min() > 1e-3
