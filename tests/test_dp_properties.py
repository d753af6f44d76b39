"""DP-SGD properties (docs/sharp-edges.md, items 2, 4, 6), checked against plain autograd."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalemix.engine import NonPrivateEngine, VmapEngine
from scalemix.models import create_model, refresh_public_stats
from scalemix.privacy import NoiseSource, SecretStream
from scalemix.privacy.mechanism import noisy_mean
from scalemix.train import Trainer


def _model(**axes):
    torch.manual_seed(0)
    return create_model("resnet9", num_classes=4, groups=8, **axes).double()


def _batch(b, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (b,), generator=g
    )


def test_no_clipping_no_noise_equals_plain_sgd():
    model = _model()
    x, y = _batch(6)
    engine = VmapEngine(model, clip=None)
    update = noisy_mean(engine(x, y).grads, sigma=0.0, clip=None, expected_batch_size=6, noise=None)
    loss = F.cross_entropy(model(x[:, 0]), y)  # the ordinary mean-loss gradient
    plain = torch.autograd.grad(loss, engine.params)
    for u, p in zip(update, plain):
        assert torch.allclose(u, p, rtol=1e-8, atol=1e-12)
    # and one SGD step with either gives the same parameters
    lr = 0.1
    after_dp = [p.detach() - lr * u for p, u in zip(engine.params, update)]
    opt = torch.optim.SGD(engine.params, lr=lr)
    opt.zero_grad()
    F.cross_entropy(model(x[:, 0]), y).backward()
    opt.step()
    for a, p in zip(after_dp, engine.params):
        assert torch.allclose(a, p.detach(), rtol=1e-8, atol=1e-12)


def test_batch_of_one_clipped_norm_is_c():
    model = _model()
    x, y = _batch(1)
    for clip in (1e-3, 0.05):
        res = VmapEngine(model, clip=clip)(x, y)
        assert float(res.norms[0]) > clip  # the example really is clipped
        norm = torch.sqrt(sum(g.pow(2).sum() for g in res.grads))
        assert abs(float(norm) - clip) < 1e-6 * clip + 1e-9


def test_unclipped_example_is_unchanged():
    model = _model()
    x, y = _batch(1)
    free = VmapEngine(model, clip=None)(x, y)
    big = VmapEngine(model, clip=1e6)(x, y)
    for a, b in zip(free.grads, big.grads):
        assert torch.allclose(a, b, rtol=1e-9)


def test_noise_std_matches_sigma_c():
    sigma, clip = 1.3, 1.5
    noise = NoiseSource(SecretStream(bytes(32), "noise"))
    g = [torch.zeros(400_000), torch.zeros(3, 1000)]
    out = noisy_mean(g, sigma=sigma, clip=clip, expected_batch_size=1, noise=noise)
    allv = torch.cat([o.flatten() for o in out])
    assert abs(float(allv.std()) - sigma * clip) < 0.01 * sigma * clip
    assert abs(float(allv.mean())) < 0.01
    # division by the expected batch size scales the noise by 1/B
    out = noisy_mean(
        [torch.zeros(400_000)], sigma=sigma, clip=clip, expected_batch_size=8, noise=noise
    )
    assert abs(float(out[0].std()) - sigma * clip / 8) < 0.01 * sigma * clip / 8


def _per_example_clipped(model, x, y, clip):
    engine = VmapEngine(model, clip=clip)
    grads, _, _ = engine.per_example_grads(x, y)
    g = [grads[n] for n in engine.names]
    norms = torch.sqrt(sum(t.flatten(1).pow(2).sum(1) for t in g))
    f = torch.clamp(clip / (norms + 1e-6), max=1.0)
    return [t * f.view(-1, *[1] * (t.dim() - 1)) for t in g]


def test_example_gradient_independent_of_other_examples():
    """Sharp edge 4: example 0's clipped gradient ignores the rest of the batch."""
    for axes in (
        dict(norm="group"),
        dict(norm="layer", placement="preact"),
        dict(norm="public_batch"),
    ):
        model = _model(**axes)
        if axes["norm"] == "public_batch":
            refresh_public_stats(model, torch.randn(32, 3, 16, 16, dtype=torch.float64))
        x1, y1 = _batch(4, k=2, seed=1)
        x2, y2 = _batch(4, k=2, seed=2)
        x2[0], y2[0] = x1[0], y1[0]
        a = _per_example_clipped(model, x1, y1, clip=0.5)
        b = _per_example_clipped(model, x2, y2, clip=0.5)
        for ga, gb in zip(a, b):
            assert torch.allclose(ga[0], gb[0], rtol=1e-9, atol=1e-13), axes
        assert any(not torch.allclose(ga[1], gb[1]) for ga, gb in zip(a, b))


def test_independence_check_catches_batchnorm():
    """The check above has teeth: with plain BatchNorm, example 0's gradient does change."""
    torch.manual_seed(0)
    model = create_model("resnet9", num_classes=4, norm="batch").double().train()
    x1, y1 = _batch(4, seed=1)
    x2, y2 = _batch(4, seed=2)
    x2[0], y2[0] = x1[0], y1[0]

    def grad0(x, y):
        logits = model(x[:, 0])
        return torch.autograd.grad(F.cross_entropy(logits[:1], y[:1]), list(model.parameters()))

    assert any(not torch.allclose(a, b) for a, b in zip(grad0(x1, y1), grad0(x2, y2)))


class _FixedSampler:
    kind = "poisson"

    def __init__(self, idx):
        self.idx = idx

    def next(self):
        return self.idx

    def state_dict(self):
        return {}


def test_empty_and_single_example_batches(tiny_cfg, digits8):
    trainer = Trainer(tiny_cfg, data=digits8, progress=False, log=lambda *_: None)
    before = [p.detach().clone() for p in trainer.engine.params]
    trainer.sampler = _FixedSampler(torch.tensor([], dtype=torch.long))
    row = trainer.train_step()
    assert row["batch"] == 0 and trainer.ledger.steps == 1
    # an empty batch still releases a noisy update: parameters move by noise alone
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.engine.params))
    trainer.sampler = _FixedSampler(torch.tensor([5]))
    row = trainer.train_step()
    assert row["batch"] == 1 and trainer.ledger.steps == 2
    assert 0 <= row["clip_fraction"] <= 1


def test_nonprivate_engine_sums_view_averaged_gradients():
    model = _model()
    x, y = _batch(3, k=2)
    res = NonPrivateEngine(model)(x, y)
    ref = VmapEngine(model, clip=None)(x, y)
    for a, b in zip(res.grads, ref.grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert isinstance(model, nn.Module)
