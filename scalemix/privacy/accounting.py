"""Privacy accounting with Opacus's accountants: PRV (default) and RDP.

Both analyse the subsampled Gaussian mechanism under **Poisson** sampling with rate
``q = expected batch size / dataset size``. ``Ledger`` records what a run actually did
(sigma, q, steps) and is the only source of the epsilon that scalemix reports; it refuses
a sampler the accountants do not describe.
"""

from __future__ import annotations

import functools
import math
import warnings

from scalemix.choices import ACCOUNTANTS
from scalemix.errors import ConfigError, PrivacyError

# PRV returns an upper bound: its estimate plus this absolute error. Reported epsilons use
# the tight bound; calibration uses the looser, faster one (an upper bound too, so the
# tight epsilon of a calibrated sigma is still at most the target).
PRV_EPS_ERROR = 0.003
PRV_EPS_ERROR_CALIBRATION = 0.01


def _opacus_accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "prv":
        return PRVAccountant()
    if kind == "rdp":
        return RDPAccountant()
    raise ConfigError(f"unknown accountant {kind!r}; choose one of {', '.join(ACCOUNTANTS)}")


def check_privacy_args(
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    sigma: float | None = None,
    epsilon: float | None = None,
) -> None:
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"sigma (noise multiplier) must be a positive number, got {sigma}")
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be a positive number, got {epsilon}")


def _epsilon(
    history: list[tuple[float, float, int]],
    delta: float,
    kind: str,
    eps_error: float = PRV_EPS_ERROR,
) -> float:
    return _epsilon_memo(tuple(tuple(h) for h in history), delta, kind, eps_error)


@functools.lru_cache(maxsize=4096)
def _epsilon_memo(
    history: tuple[tuple[float, float, int], ...], delta: float, kind: str, eps_error: float
) -> float:
    """The accountants are deterministic functions of their inputs: the cells of a grid
    (same sigma, q, steps) calibrate and report once per process."""
    acc = _opacus_accountant(kind)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "prv":
            return float(acc.get_epsilon(delta=delta, eps_error=eps_error))
        return float(acc.get_epsilon(delta=delta))


def epsilon_for(
    *,
    sigma: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
    eps_error: float = PRV_EPS_ERROR,
) -> float:
    """epsilon spent by ``steps`` Poisson-subsampled Gaussian steps."""
    check_privacy_args(sample_rate=sample_rate, steps=steps, delta=delta, sigma=sigma)
    return _epsilon([(sigma, sample_rate, steps)], delta, accountant, eps_error)


def sigma_for(
    *, epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """A noise multiplier whose epsilon (as reported) is at most the target, within 0.5 %.

    Bisection with PRV's coarse error bound first, then a refinement in a narrow bracket
    with the error bound used for reporting, so that ``epsilon_for(sigma) <= epsilon``.
    """
    check_privacy_args(sample_rate=sample_rate, steps=steps, delta=delta, epsilon=epsilon)

    def eps_of(s: float, err: float) -> float:
        return epsilon_for(
            sigma=s,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            accountant=accountant,
            eps_error=err,
        )

    def bisect(lo: float, hi: float, err: float) -> float:
        """Smallest sigma in [lo, hi] (eps(lo) > target >= eps(hi)) to within 0.5 % in eps."""
        while hi - lo > 1e-5 * hi:
            mid = (lo + hi) / 2
            eps = eps_of(mid, err)
            if eps > epsilon:
                lo = mid
            else:
                hi = mid
                if eps >= 0.995 * epsilon:
                    break
        return hi

    hi = 1.0
    while eps_of(hi, PRV_EPS_ERROR_CALIBRATION) > epsilon:
        hi *= 2
        if hi > 1e4:
            raise PrivacyError(
                f"no noise multiplier up to 1e4 reaches epsilon={epsilon}; raise epsilon"
            )
    coarse = bisect(hi / 2 if hi > 1 else 0.0, hi, PRV_EPS_ERROR_CALIBRATION)
    if accountant != "prv":
        return coarse
    lo, hi = coarse * 0.97, coarse
    while eps_of(hi, PRV_EPS_ERROR) > epsilon:
        lo, hi = hi, hi * 1.03
    if eps_of(lo, PRV_EPS_ERROR) <= epsilon:
        return bisect(0.0, lo, PRV_EPS_ERROR)
    return bisect(lo, hi, PRV_EPS_ERROR)


class Ledger:
    """What a run spent: a history of (sigma, q, steps) for the accountant to read."""

    def __init__(self, accountant: str = "prv", sampler_kind: str = "poisson"):
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
            )
        check_sampler(sampler_kind, accountant)
        self.accountant = accountant
        self.history: list[tuple[float, float, int]] = []

    def step(self, sigma: float, sample_rate: float, count: int = 1) -> None:
        if self.history and self.history[-1][:2] == (sigma, sample_rate):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + count)
        else:
            self.history.append((sigma, sample_rate, count))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        if not self.history:
            return 0.0
        return _epsilon(self.history, delta, self.accountant)

    def state_dict(self) -> dict:
        return {"accountant": self.accountant, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state["accountant"] != self.accountant:
            raise ConfigError(
                f"checkpoint was accounted with {state['accountant']}, this run uses {self.accountant}"
            )
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def check_sampler(sampler_kind: str, accountant: str) -> None:
    """The accountants analyse Poisson subsampling; anything else is refused under DP."""
    if sampler_kind != "poisson":
        raise PrivacyError(
            f"the {accountant.upper()} accountant assumes Poisson sampling (every example joins a "
            f"batch independently with probability q), but the sampler is {sampler_kind!r}; its "
            "epsilon would not be what the run spent. Use --sampler poisson (or --non-private)"
        )
