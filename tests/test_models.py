"""The model registry swept like timm's tests: shape, finiteness, gradients everywhere,
determinism; the reference sizes; the uniform residual-block interface."""

from __future__ import annotations

import pytest
import torch

from scalemix.errors import ConfigError
from scalemix.models import create_model, list_models, residual_blocks
from scalemix.models.layers import Tap, act_gain


@pytest.mark.parametrize("name", list_models())
def test_model_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    res = 64 if name in ("resnet18", "resnet50") else 16
    x = torch.randn(2, 3, res, res)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert torch.equal(model(x), out.detach()) or torch.allclose(model(x), out, atol=1e-6)
    blocks = residual_blocks(model)
    assert blocks, "every model exposes its residual blocks"
    for _, b in blocks:
        roles = {
            m.role
            for m in b.modules()
            if isinstance(m, Tap) and m in (b.tap_skip, b.tap_branch, b.tap_sum, b.tap_out)
        }
        assert roles == {"skip", "branch", "sum", "out"}


def test_reference_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(create_model("resnet9")) - 2.45e6) < 0.01e6
    assert abs(count(create_model("resnet18")) - 11.18e6) < 0.05e6
    assert abs(count(create_model("resnet50")) - 23.5e6) < 0.2e6
    assert abs(count(create_model("wrn16_4")) - 2.75e6) < 0.05e6


def test_resnet9_structure():
    m = create_model("resnet9", groups=16)
    names = [n for n, _ in residual_blocks(m)]
    assert names == ["res1", "res2"]
    gns = [g for g in m.modules() if isinstance(g, torch.nn.GroupNorm)]
    assert all(g.num_groups == 16 for g in gns)
    assert len(gns) == 8 + 2  # 8 conv blocks + 2 ScaleNorms
    no_sn = create_model("resnet9", scalenorm=False)
    assert sum(isinstance(g, torch.nn.GroupNorm) for g in no_sn.modules()) == 8


def test_groups_must_divide_channels():
    with pytest.raises(ConfigError, match="does not divide"):
        create_model("resnet9", groups=3)
    with pytest.raises(ConfigError, match="fixes"):
        create_model("nf_resnet", norm="group")


def test_relu_gain_is_brocks_constant():
    assert act_gain("relu") == pytest.approx((2 / (1 - 1 / torch.pi)) ** 0.5, rel=1e-5)


def test_nf_resnet_variance_grows_by_alpha_squared():
    """Signal propagation of the NF-ResNet: inside a stage Var grows by alpha^2 per block.

    64 px input: zero padding at the border lowers the variance of small images a little
    (about 8 % at 16 px), which the analytic 1 + i alpha^2 ignores.
    """
    torch.manual_seed(0)
    m = create_model("nf_resnet").eval()
    outs = []
    hooks = [
        b.tap_out.register_forward_hook(lambda mod, i, o: outs.append(o))
        for _, b in residual_blocks(m)
    ]
    with torch.no_grad():
        m(torch.randn(64, 3, 64, 64))
    for h in hooks:
        h.remove()
    var = [float(o.var(dim=(0, 2, 3), unbiased=False).mean()) for o in outs]
    for stage in range(3):
        for i in range(2):
            expected = 1 + (i + 1) * 0.2**2
            assert var[2 * stage + i] == pytest.approx(expected, rel=0.1)
        assert var[2 * stage + 1] > var[2 * stage]  # grows inside the stage
