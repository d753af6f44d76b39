"""Privacy: accountants, sigma calibration, the randomness model, samplers and noise."""

from scalemix.privacy.accounting import ACCOUNTANTS, Ledger, check_sampler, epsilon_for, sigma_for
from scalemix.privacy.randomness import NOISE_MODES, RunRandomness, SecretStream
from scalemix.privacy.sampling import SAMPLERS, NoiseSource, PoissonSampler, ShuffleSampler

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
