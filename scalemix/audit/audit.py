"""Turn a run's canaries into epsilon lower bounds, beside the accountant's epsilon.

Adversaries (what the auditor is given):

- ``white-box, secret sampler`` (gradient canaries): every step's noisy gradient sum at
  the canary coordinates, not the batches. This is the adversary the accountant's epsilon
  must hold against: a bound above it at the stated confidence is a privacy bug (the
  *alarm*).
- ``white-box, known batches`` (gradient canaries): also which steps drew each canary,
  i.e. the adversary of a seeded run whose seed key is published. Amplification by
  sampling does not hold against it, so its bound may exceed the accountant's epsilon
  without a bug; it measures what a secret sampler buys.
- ``black-box, final model`` (input canaries): the final model's loss on each canary.

The alarm uses the Steinke et al. bound, which tests exactly the accountant's claim,
(epsilon, delta)-DP. The f-DP bound tests the stronger claim that the run follows the
Gaussian-DP curve through (epsilon, delta); DP-SGD is close to that curve but not on it,
so the f-DP bound is reported beside it and never raises the alarm.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scalemix.audit import bounds
from scalemix.audit.canaries import llr_known_batches, llr_secret_sampler

PRIMARY = {
    "gradient": "white-box, secret sampler",
    "input": "black-box, final model",
}
FILE = "audit/audit.json"


def canary_scores(canaries: dict, *, q: float, sigma: float, clip: float, model_scores=None):
    """Scores per adversary (higher = more likely included)."""
    if canaries["kind"] == "gradient":
        obs = np.asarray(canaries["obs"], dtype=np.float64)
        draws = np.asarray(canaries["draws"], dtype=bool)
        noise_std = sigma * clip
        return {
            "white-box, secret sampler": llr_secret_sampler(obs, q, clip, noise_std),
            "white-box, known batches": llr_known_batches(obs, draws, clip, noise_std),
        }
    if model_scores is None:
        raise ValueError("input canaries are scored by the final model")
    return {"black-box, final model": np.asarray(model_scores, dtype=np.float64)}


def audit(
    canaries: dict,
    *,
    q: float,
    sigma: float,
    clip: float,
    epsilon: float | None,
    delta: float,
    confidence: float = 0.95,
    strategy=None,
    model_scores=None,
) -> dict:
    """Both one-run bounds for every adversary the canary kind allows, and the alarm."""
    member = np.asarray(canaries["member"], dtype=bool)
    scores = canary_scores(canaries, q=q, sigma=sigma, clip=clip, model_scores=model_scores)
    alpha = 1 - confidence
    per = {
        name: bounds.one_run_bounds(s, member, alpha=alpha, delta=delta, strategy=strategy)
        for name, s in scores.items()
    }
    primary = PRIMARY[canaries["kind"]]
    lb = per[primary]["steinke"]["epsilon"]
    alarm = epsilon is not None and lb > epsilon
    out = {
        "kind": canaries["kind"],
        "canaries": int(len(member)),
        "included": int(member.sum()),
        "steps_observed": int(
            canaries["steps_observed"]
            if "steps_observed" in canaries
            else np.asarray(canaries["draws"]).shape[0]
        ),
        "accountant_epsilon": epsilon,
        "delta": delta,
        "confidence": confidence,
        "adversaries": per,
        "primary_adversary": primary,
        "epsilon_lower_bound": lb,
        "epsilon_lower_bound_fdp": per[primary]["fdp"]["epsilon"],
        "method": (
            f"Steinke, Nasr & Jagielski 2023 one-run bound at {confidence:.0%} confidence, "
            f"{primary}, {per[primary]['strategy']} over {per[primary]['tests']} guess counts"
        ),
        "ceiling": per[primary]["ceiling"],
        "alarm": bool(alarm),
    }
    if alarm:
        out["alarm_message"] = (
            f"PRIVACY ALARM: the {primary} audit shows epsilon >= {lb:.3f} at "
            f"{confidence:.0%} confidence, above the accountant's epsilon {epsilon:.3f}. "
            "The run does not do what the privacy proof assumes: this is a bug, not a result"
        )
    return out


def write(root: str | Path, result: dict) -> Path:
    path = Path(root) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    tmp.replace(path)
    return path


def summary_fields(result: dict) -> dict:
    """What result.json carries of an audit."""
    return {
        "epsilon_lower_bound": result["epsilon_lower_bound"],
        "epsilon_lower_bound_fdp": result["epsilon_lower_bound_fdp"],
        "epsilon_lower_bound_method": result["method"],
        "audit_canaries": result["canaries"],
        "audit_kind": result["kind"],
        "audit_known_batches_bound": result["adversaries"]
        .get("white-box, known batches", {})
        .get("steinke", {})
        .get("epsilon"),
        "privacy_alarm": result["alarm"],
    }
