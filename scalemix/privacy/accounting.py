"""Privacy accounting: PRV (default) and RDP, Opacus's algorithms in numpy and scipy.

Both analyse the subsampled Gaussian mechanism under **Poisson** sampling with rate
``q = expected batch size / dataset size``. ``Ledger`` records what a run actually did
(sigma, q, steps) and is the only source of the epsilon that scalemix reports; it refuses
a sampler the accountants do not describe.

The accountants are those of Opacus 1.6 (``opacus.accountants``: RDP after TF Privacy, PRV
after Gopi et al. 2021, both Apache-2.0), ported here so that accounting needs neither torch
nor Opacus's import (about 2 s). The RDP port is exact; the PRV port takes the same safe
domain and mesh, then widens the domain by a few points to a length the FFT is fast at
(Opacus's length is often a large prime, which costs 5-10x): a wider domain only truncates
less, so the result is the same kind of upper bound and agrees with Opacus to ~1e-8
(``tests/test_accounting.py`` checks both against Opacus, and against Google's
dp-accounting within 1 %).

Epsilons are cached in memory and on disk (``$SCALEMIX_CACHE_DIR/privacy``, default
``~/.cache/scalemix/privacy``; in memory only where that cannot be written), keyed by
everything the value depends on: the accountant, the history (sigma, q, steps), delta,
PRV's error bound and the code's ``ALGORITHM`` version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

from scalemix.choices import ACCOUNTANTS
from scalemix.errors import ConfigError, PrivacyError

# PRV returns an upper bound: its estimate plus this absolute error. Reported epsilons use
# the tight bound; the sigma search first uses the looser, faster one (see sigma_for).
PRV_EPS_ERROR = 0.003
PRV_EPS_ERROR_CALIBRATION = 0.01

# Bump when a change to this file can change an epsilon: it is part of the cache key.
ALGORITHM = "scalemix-accounting-2 (opacus-1.6 rdp; prv with fft-fast domain)"

# sigma_for returns a sigma whose epsilon is in [(1 - SIGMA_RTOL) target, target], aiming at
# (1 - SIGMA_AIM) target; no sigma above SIGMA_MAX.
SIGMA_RTOL = 0.005
SIGMA_AIM = 0.002
SIGMA_COARSE_RTOL = 0.003  # the coarse search stops within this of its aim (x target)
SIGMA_MAX = 1e4
# PRV's discretisation is refused above this many points (several arrays of it, 0.5 GiB
# each): only an epsilon in the hundreds (sigma ~0.2 at q=0.02, 2500 steps) needs more.
PRV_MAX_POINTS = 2**26

RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


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


# ---------------------------------------------------------------------------- RDP
# Opacus's opacus/accountants/analysis/rdp.py (itself TF Privacy's), statement for statement.


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    if logx < logy:
        raise ValueError("The result of subtraction must be non-negative.")
    if logy == -math.inf:
        return logx
    if logx == logy:
        return -math.inf
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _log_a_int(q: float, sigma: float, alpha: int, binom) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef_i = math.log(binom(alpha, i)) + i * math.log(q) + (alpha - i) * math.log(1 - q)
        log_a = _log_add(log_a, log_coef_i + (i * i - i) / (2 * (sigma**2)))
    return float(log_a)


def _log_a_frac(q: float, sigma: float, alpha: float, binom, log_ndtr) -> float:
    def log_erfc(x: float) -> float:
        return math.log(2) + log_ndtr(-x * 2**0.5)

    log_a0, log_a1 = -math.inf, -math.inf
    i = 0
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    while True:
        coef = binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1
        if coef > 0:
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
    return _log_add(log_a0, log_a1)


def _rdp_at(q: float, sigma: float, alpha: float) -> float:
    from scipy.special import binom, log_ndtr

    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        return _log_a_int(q, sigma, int(alpha), binom) / (alpha - 1)
    return _log_a_frac(q, sigma, alpha, binom, log_ndtr) / (alpha - 1)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(q: float, sigma: float):
    """RDP of one Poisson-subsampled Gaussian step at every order (read-only array)."""
    import numpy as np

    rdp = np.array([_rdp_at(q, sigma, a) for a in RDP_ORDERS])
    rdp.flags.writeable = False
    return rdp


def _rdp_epsilon(history, delta: float) -> float:
    """Opacus's ``RDPAccountant.get_epsilon`` (Balle et al. 2020's conversion)."""
    import numpy as np

    rdp = sum([_rdp_per_step(q, s) * n for s, q, n in history])
    orders = np.array(RDP_ORDERS)
    with np.errstate(invalid="ignore"):
        eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    if np.isnan(eps).all():
        return math.inf
    return float(eps[np.nanargmin(eps)])


# ---------------------------------------------------------------------------- PRV
# Opacus's opacus/accountants/prv.py and analysis/prv/ (after microsoft/prv_accountant).


def _prv_cdf(q: float, sigma: float, t):
    """CDF of the privacy loss of one Poisson-subsampled Gaussian step (Gopi et al. B4)."""
    import numpy as np
    from scipy.special import erfc

    sqrt2 = np.sqrt(2)
    inside = t > np.log(1 - q) if q < 1 else np.ones_like(t, dtype=bool)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        z = np.log(np.where(inside, (np.exp(t) + q - 1) / q, 1))
        return np.where(
            inside,
            -q * erfc((2 * z * sigma**2 - 1) / (2 * sqrt2 * sigma)) / 2
            - (1 - q) * erfc((2 * z * sigma**2 + 1) / (2 * sqrt2 * sigma)) / 2
            + 1.0,
            0.0,
        )


def _fast_even_length(n: int) -> int:
    from scipy.fft import next_fast_len

    while True:
        n = next_fast_len(n, real=True)
        if n % 2 == 0:
            return n
        n += 1


def _prv_domain(history, eps_error: float, delta_error: float):
    """(t_min, t_max, size): Opacus's safe domain (Gopi et al. remark 5.6) and mesh, widened
    to an even length the FFT is fast at."""
    import numpy as np

    total = sum(n for _, _, n in history)
    l_max = _rdp_epsilon(history, delta_error / 4)
    for s, q, _ in history:
        l_max = max(l_max, _rdp_epsilon([(s, q, 1)], delta_error / (8 * total)))
    half = max(l_max, eps_error) + 3
    dt = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    t_min = np.floor(-half / dt) * dt
    t_max = np.ceil(half / dt) * dt
    size = int(np.round((t_max - t_min) / dt)) + 1
    if size % 2 == 1:
        size += 1
        t_max += dt
    extra = _fast_even_length(size) - size
    t_min -= (extra // 2) * dt
    t_max += (extra - extra // 2) * dt
    return float(t_min), float(t_max), size + extra


def _prv_discretize(q: float, sigma: float, t_min: float, t_max: float, size: int):
    """The PRV truncated to [t_min, t_max] on the mesh, and its mean shift (Opacus's
    ``discretize`` of a ``TruncatedPrivacyRandomVariable``)."""
    import numpy as np
    from scipy import integrate

    c_min, c_max = _prv_cdf(q, sigma, np.float64(t_min)), _prv_cdf(q, sigma, np.float64(t_max))
    mass = c_max - c_min

    def tcdf(t):
        t = np.asarray(t, dtype=float)
        return np.where(
            t < t_min,
            0.0,
            np.where(t < t_max, (_prv_cdf(q, sigma, t) - c_min) / mass, 1.0),
        )

    ts = np.linspace(t_min, t_max, size)
    dt = (t_max - t_min) / (size - 1)
    edges = np.empty(size + 1)
    edges[:-1] = ts - dt / 2
    edges[-1] = ts[-1] + dt / 2
    pmf = np.diff(tcdf(edges))

    # the continuous mean, by integration over the same pieces as Opacus
    points = np.concatenate(
        [
            [t_min],
            -np.logspace(start=int(np.log10(abs(t_min))), stop=-5, num=10),
            [0],
            np.logspace(start=-5, stop=int(np.log10(t_max)), num=10),
            [t_max],
        ]
    )
    mean = 0.0
    for left, right in zip(points[:-1], points[1:]):
        integral, _ = integrate.quad(tcdf, left, right, limit=500)
        mean += right * tcdf(right) - left * tcdf(left) - integral
    shift = mean - np.dot(ts, pmf)
    if abs(shift) >= dt / 2:
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")
    return pmf, float(shift)


def _prv_epsilon(history, delta: float, eps_error: float) -> float:
    """Opacus's ``PRVAccountant.get_epsilon``: the upper bound (estimate + eps_error)."""
    import numpy as np
    from scipy.fft import irfft, rfft

    delta_error = delta / 1000
    t_min, t_max, size = _prv_domain(history, eps_error, delta_error)
    if size > PRV_MAX_POINTS:
        raise PrivacyError(
            f"the PRV accountant would need {size:,} points here (RDP's epsilon is "
            f"{_rdp_epsilon(history, delta):.4g}: almost no privacy); use --accountant rdp "
            "or more noise"
        )
    if np.finfo(np.longdouble).eps * size > delta - delta_error:
        raise ValueError(
            "Floating point errors will dominate for such small values of delta. "
            "Increase delta or reduce domain size."
        )
    parts = []  # (pmf, shift of the domain) per history entry, composed with itself
    for s, q, n in history:
        pmf, shift = _prv_discretize(q, s, t_min, t_max, size)
        pmf = irfft(rfft(pmf) ** n, size)
        m = n - 1 + (size // 2 if n % 2 == 0 else 0)
        parts.append((np.roll(pmf, m), shift * n))
    while len(parts) > 1:  # Opacus's convolution tree
        from scipy.signal import convolve

        merged = [parts.pop()] if len(parts) % 2 == 1 else []
        for (pl, sl), (pr, sr) in zip(parts[:-1:2], parts[1::2]):
            merged.append((convolve(pl, pr, mode="same"), sl + sr))
        parts = merged
    p, shift = parts[0]

    t = np.linspace(t_min + shift, t_max + shift, size)
    with np.errstate(over="ignore"):
        d1 = np.flip(np.flip(p).cumsum())
        d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
        ndelta = np.exp(t) * d2 - d1
    target = delta - delta_error
    i = np.searchsorted(ndelta, -target, side="left")
    if i <= 0:
        raise RuntimeError("Cannot compute epsilon")
    return float(np.log((d1[i] - target) / d2[i]) + eps_error)


# ---------------------------------------------------------------------------- cache


def cache_dir() -> Path | None:
    """Where epsilons are kept across processes; None when there is no home to keep them."""
    try:
        root = os.environ.get("SCALEMIX_CACHE_DIR") or Path.home() / ".cache" / "scalemix"
    except RuntimeError:  # no $HOME and no passwd entry
        return None
    return Path(root) / "privacy"


def _versions() -> str:
    import numpy
    import scipy

    return f"{ALGORITHM} | numpy {numpy.__version__} | scipy {scipy.__version__}"


def _cache_key(history, delta: float, kind: str, eps_error: float) -> dict:
    return {
        "version": _versions(),
        "accountant": kind,
        "history": [[float(s), float(q), int(n)] for s, q, n in history],
        "delta": float(delta),
        "eps_error": float(eps_error) if kind == "prv" else None,
    }


def _cache_path(key: dict) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return root / f"{digest[:40]}.json"


def _cache_read(key: dict) -> float | None:
    path = _cache_path(key)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None  # another input's file (or a damaged one): never its value
    eps = data.get("epsilon")
    if type(eps) is not float or not math.isfinite(eps):
        return None
    return eps


def _cache_write(key: dict, eps: float) -> None:
    path = _cache_path(key)
    if path is None or not math.isfinite(eps):
        return
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "epsilon": eps}, sort_keys=True))
        os.replace(tmp, path)  # readers see the whole file or none
    except OSError:  # read-only or missing home, a full disk: this process's memory only
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------- epsilon


def _epsilon(
    history: list[tuple[float, float, int]],
    delta: float,
    kind: str,
    eps_error: float = PRV_EPS_ERROR,
) -> float:
    if kind not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {kind!r}; choose one of {', '.join(ACCOUNTANTS)}")
    history = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return _epsilon_memo(history, float(delta), kind, float(eps_error))


@functools.lru_cache(maxsize=4096)
def _epsilon_memo(
    history: tuple[tuple[float, float, int], ...], delta: float, kind: str, eps_error: float
) -> float:
    """The accountants are deterministic functions of their inputs: the cells of a grid
    (same sigma, q, steps) calibrate and report once per process, and once per machine."""
    key = _cache_key(history, delta, kind, eps_error)
    eps = _cache_read(key)
    if eps is not None:
        return eps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "prv":
            eps = _prv_epsilon(history, delta, eps_error)
        else:
            eps = _rdp_epsilon(history, delta)
    _cache_write(key, eps)
    return eps


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


# ---------------------------------------------------------------------------- sigma


def _gdp_sigma(epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The sigma of the central limit theorem's approximation (Dong, Roth and Su: mu-GDP
    with mu = q sqrt(T (e^(1/sigma^2) - 1))); only a starting point for the search."""
    from scipy.special import log_ndtr, ndtr

    def gdp_delta(mu: float) -> float:  # increases with mu
        return ndtr(-epsilon / mu + mu / 2) - math.exp(
            min(700.0, epsilon + log_ndtr(-epsilon / mu - mu / 2))
        )

    lo, hi = 1e-6, 50.0
    if gdp_delta(hi) <= delta:
        return 0.5
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if gdp_delta(mid) > delta:
            hi = mid
        else:
            lo = mid
    ratio = lo / (sample_rate * math.sqrt(steps))
    return min(SIGMA_MAX, max(0.1, 1 / math.sqrt(math.log1p(ratio * ratio))))


def _solve(
    fn, aim: float, accept, s: float, slope: float, target: float
) -> tuple[float, float, float]:
    """A sigma whose ``fn`` (decreasing in sigma) is accepted, by the secant method on
    (log sigma, log fn) kept inside a bracket, bisecting when the secant stalls.

    Starts at ``s`` with ``slope`` = d log fn / d log sigma (< 0). Returns (sigma,
    fn(sigma), slope); raises PrivacyError when even SIGMA_MAX is not enough."""
    lo, hi, e_hi = 0.0, math.inf, None  # fn(lo) > aim >= fn(hi)
    prev = None
    for it in range(100):
        e = fn(s)
        if accept(e):
            return s, e, slope
        if e > aim:
            lo = s
            if s >= SIGMA_MAX:
                raise PrivacyError(
                    f"no noise multiplier up to {SIGMA_MAX:g} reaches epsilon={target:g}; "
                    "raise epsilon"
                )
        else:
            hi, e_hi = s, e
        if prev is not None and prev[0] != s and prev[1] != e and min(e, prev[1]) > 0:
            measured = (math.log(e) - math.log(prev[1])) / (math.log(s) - math.log(prev[0]))
            if measured < 0:
                slope = measured
        prev = (s, e)
        step = (math.log(aim) - math.log(e)) / slope if e > 0 else -math.log(4)
        nxt = s * math.exp(max(-math.log(4), min(math.log(4), step)))
        if lo > 0 and hi < math.inf:
            if hi - lo <= 1e-9 * hi:
                return hi, e_hi, slope  # fn jumps across the window: the safe end
            if not lo < nxt < hi or it >= 12:
                nxt = math.sqrt(lo * hi)  # outside the bracket, or slow: bisect
        s = min(SIGMA_MAX, nxt)
    raise PrivacyError("the noise multiplier search did not converge")  # pragma: no cover


def sigma_for(
    *, epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """A noise multiplier whose epsilon, as reported (``epsilon_for(sigma, ...)``, what the
    run's ``Ledger`` computes), is at most the target and within 0.5 % of it.

    The secant method in (log sigma, log epsilon) from the central limit theorem's sigma.
    PRV: first on PRV's coarse bound (several times cheaper), aiming at
    ``target (1 - 0.2 %)`` plus the difference of the two error bounds (the two bounds
    differ by just that, to ~1e-6); then on the reported bound, from the coarse result
    moved by the secant step, which is usually accepted at once. Only a sigma whose reported
    epsilon was computed and found in [(1 - 0.5 %) target, target] is returned.
    """
    check_privacy_args(sample_rate=sample_rate, steps=steps, delta=delta, epsilon=epsilon)
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
        )

    def eps_of(err: float):
        def fn(s: float) -> float:
            return epsilon_for(
                sigma=s,
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                accountant=accountant,
                eps_error=err,
            )

        return fn

    aim = epsilon * (1 - SIGMA_AIM)
    s = _gdp_sigma(epsilon, sample_rate, steps, delta)
    s2 = _gdp_sigma(epsilon * 1.01, sample_rate, steps, delta)
    slope = math.log(1.01) / math.log(s2 / s) if s2 < s else -1.0
    if accountant == "prv":
        offset = PRV_EPS_ERROR_CALIBRATION - PRV_EPS_ERROR
        aim_c = aim + offset
        s, e, slope = _solve(
            eps_of(PRV_EPS_ERROR_CALIBRATION),
            aim_c,
            lambda e: abs(e - aim_c) <= epsilon * SIGMA_COARSE_RTOL,
            s,
            slope,
            epsilon,
        )
        if e > offset:  # where the reported bound should be: one more secant step
            s = min(SIGMA_MAX, s * math.exp((math.log(aim) - math.log(e - offset)) / slope))

    def reported_ok(e: float) -> bool:
        return (1 - SIGMA_RTOL) * epsilon <= e <= epsilon

    s, e, _ = _solve(eps_of(PRV_EPS_ERROR), aim, reported_ok, s, slope, epsilon)
    if not e <= epsilon:  # cannot happen: _solve returns an accepted sigma or a bracket's top
        raise PrivacyError(f"noise multiplier {s} spends epsilon {e} > {epsilon}")
    return s


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
