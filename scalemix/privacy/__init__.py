"""Privacy: accountants, sigma calibration, samplers and the noise source."""

from scalemix.privacy.accounting import ACCOUNTANTS, Ledger, check_sampler, epsilon_for, sigma_for
from scalemix.privacy.sampling import (
    NOISE_MODES,
    SAMPLERS,
    NoiseSource,
    PoissonSampler,
    ShuffleSampler,
)

__all__ = [
    "ACCOUNTANTS",
    "NOISE_MODES",
    "SAMPLERS",
    "Ledger",
    "NoiseSource",
    "PoissonSampler",
    "ShuffleSampler",
    "check_sampler",
    "epsilon_for",
    "sigma_for",
]
