"""The reference test (docs/sharp-edges.md, item 5): per-example gradients from the DP engine
equal an obviously-correct one-example-at-a-time loop, for every model variant, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalemix.engine import VmapEngine
from scalemix.engine.base import clip_margin
from scalemix.models import create_model, has_public_bn, refresh_public_stats

VARIANTS = [
    ("resnet9", dict(norm="group", groups=8, scalenorm=True)),
    ("resnet9", dict(norm="group", groups=1, scalenorm=False, act="relu")),
    ("resnet9", dict(norm="layer")),
    ("resnet9", dict(norm="instance", act="silu")),
    ("resnet9", dict(norm="none", scalenorm=False)),
    ("resnet9", dict(norm="none", scalenorm=False, ws="scaled")),
    ("resnet9", dict(norm="public_batch")),
    ("resnet9", dict(placement="preact", groups=16)),
    ("resnet9", dict(ws="plain", groups=4)),
    ("resnet9", dict(ws="scaled", placement="preact")),
    ("wrn16_4", dict()),
    ("nf_resnet", dict()),
    ("resnet18", dict(groups=8, scalenorm=True)),
    ("resnet50", dict(placement="preact", groups=8)),
]


def _ids(v):
    name, axes = v
    return name + "-" + "-".join(f"{k}={val}" for k, val in axes.items())


def reference_grads(model, x, y):
    """One example at a time: grad of that example's loss averaged over its K views."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        logits = model(x[i])
        loss = F.cross_entropy(logits, y[i].expand(x.shape[1]))
        out.append(torch.autograd.grad(loss, params))
    return [torch.stack([g[j] for g in out]) for j in range(len(params))]


# K = 3 views on every model but the two large ImageNet ones (K = 1 there).
CASES = [(v, k) for v in VARIANTS for k in ((1,) if v[0] in ("resnet18", "resnet50") else (1, 3))]


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "k"), CASES, ids=[f"{_ids(v)}-K{k}" for v, k in CASES])
def test_vmap_per_example_grads_match_loop(variant, k):
    name, axes = variant
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **axes).double()
    res = 32 if name.startswith("resnet") and name != "resnet9" else 16
    b = 3
    x = torch.randn(b, k, 3, res, res, dtype=torch.float64)
    y = torch.randint(0, 5, (b,))
    if has_public_bn(model):
        refresh_public_stats(model, torch.randn(16, 3, res, res, dtype=torch.float64))
    engine = VmapEngine(model, clip=None)
    grads, loss, _ = engine.per_example_grads(x, y)
    ref = reference_grads(model, x, y)
    assert len(ref) == len(engine.names)
    for n, r in zip(engine.names, ref):
        assert torch.allclose(grads[n], r, rtol=1e-7, atol=1e-10), n


def test_clipped_sum_matches_loop():
    """The engine's clipped sum = sum_i g_i * min(1, C (1 - m) / ||g_i||) from the loop."""
    torch.manual_seed(1)
    model = create_model("resnet9", num_classes=4, groups=8).double()
    x = torch.randn(4, 2, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    ref = reference_grads(model, x, y)
    norms = torch.sqrt(sum(r.flatten(1).pow(2).sum(1) for r in ref))
    clip = float(norms.median())  # some examples clipped, some not
    # min(1, C (1 - m) / ||g_i||), m the rounding margin (engine.base.clip_factors)
    factors = torch.clamp(clip * (1 - clip_margin(torch.float64)) / norms, max=1.0)
    res = VmapEngine(model, clip=clip)(x, y)
    assert torch.allclose(res.norms, norms, rtol=1e-9)
    for g, r in zip(res.grads, ref):
        assert torch.allclose(g, torch.einsum("b,b...->...", factors, r), rtol=1e-7, atol=1e-12)
    assert 0 < (norms > clip).sum() < 4
