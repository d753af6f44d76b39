"""The joint epsilon of everything a grid publishes.

An attacker reads every run of a grid, not one (docs/sharp-edges.md, "Randomness across
runs"). What the runs release together depends on which random streams they share:

- Runs in ``secure`` mode draw every stream from their own OS-entropy key: independent
  mechanisms, which compose.
- Runs of one seed in ``seeded`` mode share their Poisson batches (the same sampler draw
  gives the same mask when they have the same sampling rate q, the same private examples
  and the same number of ranks) but never their noise (each run's noise is keyed by its
  identity). At a sampler draw that k such runs release, their updates stacked, each
  scaled by 1/sigma_i, are one Poisson-subsampled Gaussian mechanism with sensitivity
  C sqrt(sum 1/sigma_i^2): noise multiplier ``sigma_eff = (sum sigma_i^-2)^(-1/2)``.
  Runs of one seed whose masks differ in structure (another q, other private examples,
  input canaries, other rank counts) are neither identical nor independent: for that seed
  the same stacking holds at every draw with the batches fixed, so each draw is bounded
  without amplification by sampling (q = 1), a valid but loose bound.
- Runs of one seed in ``seeded-shared`` mode share their noise: two of them cancel it, so
  only each run alone is (epsilon, delta)-DP, and the grid as a whole is not.
- A non-private run trained on the same data makes the grid not DP.
- Seeded runs written before scalemix keyed noise per run (no ``run_identity`` in their
  ``config.json``) shared their noise: they count as ``seeded-shared``.

Released draws are counted per run as ``steps + abandoned_steps`` (a resumed run goes on
past the draws of an earlier attempt, so its draws are 0 .. D - 1), from ``result.json``
or, for a run still going or stopped, ``released.json``. Choosing the best run is
post-processing of this joint release: the joint epsilon covers it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from scalemix.train.rundir import RunDir, read_json

STATUSES = ("dp", "per_cell_only", "not_dp", "no_private_cells", "no_steps")


@dataclass(frozen=True)
class Release:
    """What one run released, as the joint accounting needs it."""

    name: str
    private: bool
    mode: str | None  # secure | seeded | seeded-shared
    seed: int
    seed_key_id: str | None
    sigma: float
    q: float
    draws: int  # sampler draws released (steps + abandoned steps)
    delta: float | None
    accountant: str
    epsilon: float | None  # what the run itself reports
    structure: tuple = ()  # what fixes its Poisson masks: n, canaries, ranks
    noise_id: str | None = None  # seeded: what keys its noise (identity and nonce)
    public_examples: int = 0  # examples it used without privacy (--public-size)
    normals_per_step: int = 0  # noise coordinates a step draws (for the tail delta)

    @property
    def shares_batches(self) -> bool:
        return self.private and self.mode in ("seeded", "seeded-shared")


@dataclass
class GridPrivacy:
    """The grid's joint (epsilon, delta), or why there is none."""

    status: str
    epsilon: float | None
    delta: float | None
    text: str
    per_seed: list[dict] = field(default_factory=list)
    sum_of_run_epsilons: float | None = None
    runs: int = 0
    independent_epsilon: float | None = None  # the same runs with batches of their own

    def as_dict(self) -> dict:
        return {
            "status": self.status,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "sum_of_run_epsilons": self.sum_of_run_epsilons,
            "independent_epsilon": self.independent_epsilon,
            "runs": self.runs,
            "per_seed": self.per_seed,
            "text": self.text,
        }


def sigma_eff(sigmas) -> float:
    """The noise multiplier of k stacked Gaussian releases of one batch: (sum s^-2)^-1/2."""
    inv = sum(1.0 / (s * s) for s in sigmas)
    return 1.0 / math.sqrt(inv) if inv > 0 else math.inf


def segments(releases: list[Release], *, q: float | None = None) -> list[tuple[float, float, int]]:
    """(sigma_eff, q, count) pieces for runs that share their masks draw by draw: at draw
    d the runs with more than d released draws are active. ``q`` overrides their rate
    (1.0: no amplification by sampling)."""
    out = []
    done = 0
    for d in sorted({r.draws for r in releases}):
        active = [r for r in releases if r.draws >= d and r.draws > done]
        if d > done and active:
            rate = q if q is not None else active[0].q
            out.append((sigma_eff(r.sigma for r in active), rate, d - done))
        done = d
    return out


def read_release(run_dir: str | Path) -> Release | None:
    """A run directory's release, or None if it never started."""
    rd = RunDir(run_dir)
    saved = rd.read_config()
    if saved is None:
        return None
    cfg, res = saved.get("config", {}), saved.get("resolved", {})
    result = rd.read_result() or {}
    released = read_json(rd.released) or {}
    done = int(result.get("steps") or 0) + int(result.get("abandoned_steps") or 0)
    going = int(released.get("steps_released") or 0) + int(released.get("abandoned_steps") or 0)
    draws = max(done, going)
    private = bool(res.get("private", not cfg.get("non_private", False)))
    randomness = res.get("randomness") or {}
    mode = cfg.get("noise") if private else None
    if mode == "seeded" and not randomness.get("run_identity"):
        mode = "seeded-shared"  # written before noise was keyed per run: it shared its noise
    noise_id = None
    if mode == "seeded":
        noise_id = f"{randomness.get('run_identity')}/{randomness.get('noise_nonce') or ''}"
    structure = (
        res.get("train_size"),
        cfg.get("audit_canaries") if cfg.get("canary_kind") == "input" else 0,
        res.get("world_size", 1),
        res.get("data", {}).get("name") if isinstance(res.get("data"), dict) else cfg.get("data"),
    )
    return Release(
        name=rd.root.name,
        private=private,
        mode=mode,
        seed=int(cfg.get("seed", 0)),
        seed_key_id=randomness.get("seed_key_id"),
        sigma=float(res.get("sigma") or 0.0),
        q=float(res.get("sample_rate") or 0.0),
        draws=draws,
        delta=cfg.get("delta") if private else None,
        accountant=cfg.get("accountant") or "prv",
        epsilon=result.get("epsilon"),
        structure=structure,
        noise_id=noise_id,
        public_examples=int(res.get("public_size") or cfg.get("public_size") or 0),
        normals_per_step=int(res.get("num_params") or 0) + int(cfg.get("audit_canaries") or 0),
    )


def grid_privacy(releases: list[Release]) -> GridPrivacy:
    """The joint (epsilon, delta) of the releases (see the module docstring)."""
    from scalemix.privacy.accounting import Ledger

    started = [r for r in releases if r.draws > 0]
    private = [r for r in started if r.private]
    public = [r for r in started if not r.private]
    n = len(started)
    if not started:
        return GridPrivacy("no_steps", None, None, "No run of the grid has released a step.")
    if public:
        names = ", ".join(r.name for r in public[:3]) + (" ..." if len(public) > 3 else "")
        status = "no_private_cells" if not private else "not_dp"
        return GridPrivacy(
            status,
            None,
            None,
            f"The grid is NOT differentially private: {len(public)} non-private run(s) "
            f"({names}) were trained on the same data without noise, and they are published "
            "with the others.",
            runs=n,
        )
    run_sum = sum(r.epsilon for r in private if r.epsilon is not None and math.isfinite(r.epsilon))
    by_seed: dict[tuple, list[Release]] = defaultdict(list)
    for r in private:
        if r.shares_batches:
            by_seed[(r.seed_key_id, r.seed)].append(r)
    shared_noise = [
        g
        for g in by_seed.values()
        if sum(r.mode == "seeded-shared" for r in g) > 1
        or len({r.noise_id for r in g if r.noise_id}) < sum(1 for r in g if r.noise_id)
    ]
    if shared_noise:
        g = shared_noise[0]
        return GridPrivacy(
            "per_cell_only",
            None,
            None,
            f"Only each run alone is (epsilon, delta)-DP: runs of seed {g[0].seed} (and of "
            f"{len(shared_noise) - 1} other seed(s)) share their noise (--noise seeded-shared, "
            "a reproduction with --noise-nonce, or runs made before noise was keyed per run), "
            "so two of them together cancel it and reveal clipped-gradient sums without "
            "noise. The grid as a whole is not differentially private.",
            sum_of_run_epsilons=run_sum,
            runs=n,
        )
    delta = min(r.delta for r in private)
    accountant = "prv" if len({r.accountant for r in private}) > 1 else private[0].accountant
    ledger = Ledger(accountant)
    per_seed, loose = [], []
    for (_key_id, seed), group in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        same = len({(r.q, r.structure) for r in group}) == 1
        pieces = segments(group) if same else segments(group, q=1.0)
        for s, q, count in pieces:
            ledger.step(s, q, count=count)
        if not same:
            loose.append(seed)
        per_seed.append(
            {
                "seed": seed,
                "runs": len(group),
                "shared_masks": same,
                "segments": [{"sigma_eff": s, "q": q, "draws": c} for s, q, c in pieces],
            }
        )
    for r in private:
        if not r.shares_batches:  # secure: independent of every other run
            ledger.step(r.sigma, r.q, count=r.draws)
    eps = ledger.epsilon(delta)
    independent = None
    if by_seed:  # what the same runs would cost with batches of their own (secure mode)
        alone = Ledger(accountant)
        for r in private:
            alone.step(r.sigma, r.q, count=r.draws)
        independent = alone.epsilon(delta)
    seeds = len(by_seed)
    own = len(private) - sum(len(g) for g in by_seed.values())
    text = (
        f"The models and test metrics of the {len(private)} private run(s) are ({eps:.3g}, "
        f"{delta:.3g})-DP together ({accountant.upper()} accountant; not the fields each "
        "run's privacy.json lists as computed without noise): "
    )
    parts = []
    if seeds:
        parts.append(
            f"the runs of each of {seeds} seed(s) share their Poisson batches and form one "
            "subsampled Gaussian mechanism per draw with sigma_eff = (sum sigma_i^-2)^-1/2"
        )
    if own:
        parts.append(f"{own} secure run(s) with streams of their own compose with the rest")
    text += "; ".join(parts) + ". Choosing the best run is post-processing of this release."
    if loose:
        text += (
            f" For seed(s) {', '.join(map(str, loose))} the runs' batches differ in structure "
            "(another sampling rate, data or rank count): bounded without amplification by "
            "sampling, a valid but loose bound."
        )
    if run_sum:
        text += f" (The runs' own epsilons add up to {run_sum:.3g}.)"
    tail = _tail_delta(private, eps)
    if tail > 0:
        if tail >= 1e-3:
            text += (
                " The noise's cut tails: our bound on the delta they add is vacuous at this "
                "epsilon (a vacuous bound: the joint guarantee holds for exact Gaussian noise, "
                "and at an epsilon this large it is no meaningful protection anyway)."
            )
        else:
            text += f" The noise's cut tails add at most {tail:.2g} to delta."
    public = [r for r in private if r.public_examples]
    if public:
        text += (
            f" {len(public)} run(s) used examples of the training split without privacy "
            f"(--public-size, up to {max(r.public_examples for r in public)} examples): the "
            "joint guarantee covers only the examples private in every run."
        )
    if independent is not None and independent < eps:
        text += (
            f" Shared batches are what makes paired comparisons sharp, and they cost privacy: "
            f"the same runs with batches of their own (--noise secure) would compose to "
            f"{independent:.3g}."
        )
    return GridPrivacy(
        "dp",
        eps,
        delta,
        text,
        per_seed=per_seed,
        sum_of_run_epsilons=run_sum,
        runs=n,
        independent_epsilon=independent,
    )


def _tail_delta(private: list[Release], eps: float) -> float:
    """randomness.tail_delta over every noise coordinate the runs drew, at the joint eps."""
    from scalemix.privacy.randomness import tail_delta

    draws = sum(r.draws * max(r.normals_per_step, 1) for r in private)
    return tail_delta(eps, 1, draws) if draws else 0.0


def grid_privacy_from_dirs(grid_dirs) -> GridPrivacy:
    """The joint privacy of the runs of several grids together (runs with one seed key and
    seed share their batches across grids too)."""
    return grid_privacy([r for d in grid_dirs for r in _releases(d)])


def grid_privacy_from_dir(grid_dir: str | Path) -> GridPrivacy:
    """The joint privacy of every run under ``grid_dir`` (its ``cells/*`` run directories,
    or any run directories below it)."""
    return grid_privacy(_releases(grid_dir))


def _releases(grid_dir: str | Path) -> list[Release]:
    root = Path(grid_dir)
    cells = root / "cells"
    dirs = (
        sorted(cells.iterdir())
        if cells.is_dir()
        else sorted(p.parent for p in root.rglob("config.json") if "ranks" not in p.parts)
    )
    return [r for d in dirs if d.is_dir() and (r := read_release(d)) is not None]
