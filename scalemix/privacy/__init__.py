"""Privacy: accountants, sigma calibration, the randomness model, samplers and noise."""

from scalemix.choices import ACCOUNTANTS, NOISE_MODES, SAMPLERS
from scalemix.privacy.accounting import Ledger, check_sampler, epsilon_for, sigma_for
from scalemix.privacy.randomness import RunRandomness, SecretStream
from scalemix.privacy.sampling import NoiseSource, PoissonSampler, ShuffleSampler

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
