"""Privacy: accountants, sigma calibration, the randomness model, samplers and noise.

The accountants import without torch (``scalemix privacy`` answers in about a second);
the randomness model, samplers and noise load torch, so they are imported on first use.
"""

from scalemix.choices import ACCOUNTANTS, NOISE_MODES, SAMPLERS
from scalemix.privacy.accounting import Ledger, check_sampler, epsilon_for, sigma_for

_LAZY = {
    "RunRandomness": "scalemix.privacy.randomness",
    "SecretStream": "scalemix.privacy.randomness",
    "NoiseSource": "scalemix.privacy.sampling",
    "PoissonSampler": "scalemix.privacy.sampling",
    "ShuffleSampler": "scalemix.privacy.sampling",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "NOISE_MODES",
    "SAMPLERS",
    "Ledger",
    "NoiseSource",
    "PoissonSampler",
    "RunRandomness",
    "SecretStream",
    "ShuffleSampler",
    "check_sampler",
    "epsilon_for",
    "sigma_for",
]
