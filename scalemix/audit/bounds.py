"""Lower bounds on epsilon from one training run's canary guesses.

An auditor holds m canaries, each included in training independently with probability
1/2. From the run's output it scores every canary, guesses "in" for the k+ highest
scores and "out" for the k- lowest, and counts v correct guesses out of r = k+ + k-.

- **Steinke, Nasr & Jagielski 2023** (arXiv 2305.08846, Theorem 5.2): for an
  (epsilon, delta)-DP algorithm,
  ``P[V >= v] <= P[B >= v] + 2 m delta max_{1<=i<=v} P[v - i <= B < v] / i`` with
  ``B ~ Binomial(r, e^eps / (1 + e^eps))``. The lower bound at confidence 1 - alpha is the
  largest epsilon this tail rejects: ``sup{eps : p(eps) <= alpha}``.
- **Mahloujifar, Melis & Chaudhuri 2024** (arXiv 2410.22235): the same guesses tested
  against an f-DP claim. The family here is Gaussian DP: the claim "(eps, delta)" is read
  as the mu-GDP trade-off curve that passes through (eps, delta) (Dong, Roth & Su 2022,
  Cor. 2.13), which DP-SGD follows closely (its CLT). Their recursion bounds the
  probability of v correct guesses among k+ under f; the lower bound is the largest eps
  whose curve is rejected. One-sided guesses (k- = 0), as in their analysis.

Choosing k after seeing the scores would void both bounds, so the choice is an explicit
*threshold strategy*, recorded with every result (as in jax_privacy's auditing module):
``Bonferroni`` over a fixed grid of guess counts (alpha / grid size each), or
``Fixed`` counts chosen in advance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

EPS_MAX = 50.0


# --------------------------------------------------------------------------- Steinke et al.


def steinke_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of observing >= v correct of r guesses under (eps, delta)-DP (Thm 5.2)."""
    if v <= 0:
        return 1.0
    p = special.expit(eps)
    beta = float(stats.binom.sf(v - 1, r, p))  # P[B >= v]
    if delta == 0:
        return beta
    i = np.arange(1, v + 1)
    # P[v - i <= B < v] = P[B >= v - i] - P[B >= v]
    window = stats.binom.sf(v - i - 1, r, p) - beta
    alpha = float(np.max(window / i))
    return min(1.0, beta + 2 * m * delta * alpha)


def _largest_rejected(p_value, alpha: float) -> float:
    """sup{eps >= 0 : p_value(eps) <= alpha}; p_value increases with eps."""
    if p_value(0.0) > alpha:
        return 0.0
    hi = 1.0
    while p_value(hi) <= alpha:
        if hi >= EPS_MAX:
            return EPS_MAX
        hi *= 2
    return float(optimize.brentq(lambda e: p_value(e) - alpha, 0.0, hi, xtol=1e-7))


def steinke_bound(m: int, r: int, v: int, *, alpha: float = 0.05, delta: float = 0.0) -> float:
    """The epsilon lower bound at confidence 1 - alpha from v correct of r guesses."""
    return _largest_rejected(lambda e: steinke_p_value(m, r, v, e, delta), alpha)


# --------------------------------------------------------------------------- f-DP (GDP family)


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth & Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(
        special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2)
    )


def gdp_mu(eps: float, delta: float) -> float:
    """The mu whose GDP curve passes through (eps, delta): delta(eps) = delta."""
    if gdp_delta(1e-9, eps) >= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, eps) < delta:
        hi *= 2
        if hi > 1e4:
            return math.inf
    return float(optimize.brentq(lambda mu: gdp_delta(mu, eps) - delta, 1e-9, hi, xtol=1e-12))


def fdp_rejects(mu: float, m: int, k: int, v: int, alpha: float) -> bool:
    """Whether v correct of k "in" guesses reject mu-GDP at level alpha.

    Mahloujifar et al.'s recursion: starting from the alpha-weighted shares of correct
    (r) and incorrect (h) guesses, it walks down the number of correct guesses, each time
    raising h to what the trade-off curve allows for r (the curve's inverse,
    ``Phi(Phi^-1(r) - mu)``) and moving the proportional mass into r. The claim is
    rejected when the mass the observation needs exceeds the k / m that k guesses carry.
    """
    if v <= 0 or k <= 0:
        return False
    r = alpha * v / m
    h = alpha * (k - v) / m
    for i in range(v - 1, -1, -1):
        if math.isinf(mu):
            floor = 0.0
        else:
            floor = float(special.ndtr(special.ndtri(min(r, 1.0)) - mu))
        h_new = max(h, floor)
        if h_new == h:
            break
        r = min(r + i / (k - i) * (h_new - h), 1.0)
        h = h_new
    return r + h > k / m


def fdp_bound(m: int, k: int, v: int, *, alpha: float = 0.05, delta: float = 1e-5) -> float:
    """The largest eps whose GDP curve through (eps, delta) v-of-k correct guesses reject.

    delta must be positive: no Gaussian-DP curve passes through (eps, 0), so with delta = 0
    every eps would be "rejected" and the bound would read EPS_MAX whatever the guesses."""
    if not delta > 0:
        raise ValueError(f"the f-DP bound needs delta > 0 (got {delta!r}): use the Steinke bound")

    def rejected(eps: float) -> bool:
        return fdp_rejects(gdp_mu(eps, delta), m, k, v, alpha)

    if not rejected(1e-6):
        return 0.0
    lo, hi = 1e-6, 1.0
    while rejected(hi):
        if hi >= EPS_MAX:
            return EPS_MAX
        lo, hi = hi, hi * 2
    while hi - lo > 1e-4:  # bisection on a monotone predicate; lo is always rejected
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Bonferroni:
    """Try every guess count of a grid fixed before the scores are seen; each test at
    alpha / (number of tests)."""

    counts: tuple[int, ...] | None = None  # None: a geometric grid up to m / 2

    def grid(self, m: int) -> list[int]:
        if self.counts is not None:
            return sorted({k for k in self.counts if 0 < k <= m})
        ks, k = [], 5
        while k <= m // 2:
            ks.append(k)
            k = int(round(k * 2))
        return ks or [max(1, m // 2)]

    @property
    def name(self) -> str:
        return "bonferroni"


@dataclass(frozen=True)
class Fixed:
    """Guess counts chosen in advance: k+ "in" guesses and k- "out" guesses."""

    k_plus: int
    k_minus: int = 0

    @property
    def name(self) -> str:
        return f"fixed(k+={self.k_plus}, k-={self.k_minus})"


def _tests(m: int, strategy: Bonferroni | Fixed) -> list[tuple[int, int]]:
    """The (k+, k-) guess counts a strategy tries: one-sided (k- = 0) and symmetric."""
    if isinstance(strategy, Fixed):
        return [(strategy.k_plus, strategy.k_minus)]
    ks = strategy.grid(m)
    return [(k, 0) for k in ks] + [(k, k) for k in ks if 2 * k <= m]


def _guesses(scores: np.ndarray, member: np.ndarray, k_plus: int, k_minus: int):
    """Correct guesses among the k+ highest ("in") and k- lowest ("out") scores.

    Ties are broken by a fixed random permutation (independent of the coins)."""
    order = np.lexsort((np.random.default_rng(0).permutation(len(scores)), scores))
    top = order[::-1][:k_plus]
    bottom = order[:k_minus] if k_minus else order[:0]
    return int(member[top].sum() + (~member[bottom]).sum())


def one_run_bounds(
    scores,
    member,
    *,
    alpha: float = 0.05,
    delta: float = 1e-5,
    strategy: Bonferroni | Fixed | None = None,
) -> dict:
    """Both lower bounds from canary scores (higher = more likely "in") and the coins.

    Returns each bound with the guess counts that gave it, the strategy and alpha.
    """
    scores = np.asarray(scores, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    m = len(scores)
    strategy = strategy or Bonferroni()
    tests = _tests(m, strategy)
    level = alpha / len(tests)
    best_s = {"epsilon": 0.0, "k_plus": None, "k_minus": None, "correct": None}
    best_f = {"epsilon": 0.0, "k_plus": None, "k_minus": 0, "correct": None}
    for kp, km in tests:
        v = _guesses(scores, member, kp, km)
        e = steinke_bound(m, kp + km, v, alpha=level, delta=delta)
        if e > best_s["epsilon"]:
            best_s = {"epsilon": e, "k_plus": kp, "k_minus": km, "correct": v}
    if not delta > 0:  # pure DP: no Gaussian-DP curve passes through (eps, 0)
        best_f = {"epsilon": None, "k_plus": None, "k_minus": 0, "correct": None}
    for kp in sorted({kp for kp, _ in tests}) if delta > 0 else []:  # f-DP: one-sided tests
        v = _guesses(scores, member, kp, 0)
        ef = fdp_bound(m, kp, v, alpha=level, delta=delta)
        if ef > best_f["epsilon"]:
            best_f = {"epsilon": ef, "k_plus": kp, "k_minus": 0, "correct": v}
    return {
        "steinke": best_s,
        "fdp": best_f,
        "confidence": 1 - alpha,
        "delta": delta,
        "strategy": strategy.name,
        "tests": len(tests),
        "canaries": m,
        "ceiling": ceiling(m, alpha=alpha, delta=delta, strategy=strategy),
    }


def ceiling(
    m: int, *, alpha: float = 0.05, delta: float = 1e-5, strategy: Bonferroni | Fixed | None = None
) -> dict:
    """The largest bounds m canaries can certify: every guess right, at the strategy's level."""
    strategy = strategy or Bonferroni()
    tests = _tests(m, strategy)
    level = alpha / len(tests)
    s = max(steinke_bound(m, kp + km, kp + km, alpha=level, delta=delta) for kp, km in tests)
    f = (
        max(fdp_bound(m, kp, kp, alpha=level, delta=delta) for kp in {kp for kp, _ in tests})
        if delta > 0
        else None  # pure DP: the f-DP bound has no curve to test
    )
    return {"steinke": s, "fdp": f}
