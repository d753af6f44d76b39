"""Unsafe DP configurations are refused with an explanation (docs/sharp-edges.md, items 1, 4)."""

from __future__ import annotations

import pytest

from scalemix.errors import ConfigError, PrivacyError
from scalemix.train import TrainConfig


def test_batchnorm_refused_under_dp_with_reason():
    with pytest.raises(PrivacyError) as e:
        TrainConfig(norm="batch").validate()
    msg = str(e.value)
    assert "BatchNorm" in msg and "public_batch" in msg and "--non-private" in msg


def test_batchnorm_allowed_non_private():
    TrainConfig(norm="batch", non_private=True).validate()


def test_shuffle_sampler_refused_under_dp():
    with pytest.raises(PrivacyError, match="Poisson"):
        TrainConfig(sampler="shuffle").validate()
    TrainConfig(sampler="shuffle", non_private=True).validate()


def test_public_batch_norm_needs_public_data():
    with pytest.raises(ConfigError, match="public-size"):
        TrainConfig(norm="public_batch").validate()
    TrainConfig(norm="public_batch", public_size=64).validate()


@pytest.mark.parametrize(
    "kw",
    [
        dict(epsilon=-1.0),
        dict(epsilon=float("nan")),
        dict(clip=0.0),
        dict(delta=1.5),
        dict(batch_size=0),
        dict(epochs=-2.0),
        dict(aug_mult=4),
        dict(model="nope"),
        dict(groups=0),
        dict(groups=128),
        dict(norm="weird"),
        dict(ema=1.5),
        dict(model="nf_resnet", norm="group"),
        dict(scalenorm=True, norm="none"),
        dict(act="tanh"),  # a model axis's choices, from its declaration
        dict(engine="turbo", non_private=True),  # choices hold for non-private runs too
        dict(precision="fp8", non_private=True),
        dict(momentum=1.0),
    ],
)
def test_bad_values_raise_config_error(kw):
    with pytest.raises(ConfigError):
        TrainConfig(**kw).validate()
