"""What epsilon covers in a run's outputs, and what it does not: one catalogue for all outputs.

The attacker reads everything a run writes (DESIGN.md). epsilon bounds what the *noisy
updates* (and so the model, its test metrics and anything computed from them) reveal
about one training example. Anything computed from private training data without noise
is outside the guarantee; this module lists every such quantity, file by file, so that
``privacy.json`` in each run directory, the README and the W&B run say the same.
"""

from __future__ import annotations

# file -> {field: why it is outside the guarantee}
NOT_COVERED: dict[str, dict[str, str]] = {
    "metrics.csv": {
        "batch": "the realised batch size |B_t| counts which private examples the sampler drew",
        "loss": "mean training loss on the private batch, without noise",
        "train_acc": "training accuracy on the private batch, without noise",
        "grad_norm_median": "median per-example gradient norm of private examples",
        "clip_fraction": "fraction of private examples whose gradient was clipped",
        "step_seconds": "step time grows with |B_t| (a timing side channel)",
        "images_per_second": "|B_t| divided by the step time",
    },
    "epochs.csv": {
        "train_seconds": "cumulative step time (depends on every |B_t|)",
    },
    "diagnostics.csv": {
        "rows with source = train": "block statistics and gradient norms / SNR / clip "
        "fractions read from private training examples without noise",
    },
    "result.json": {
        "status": "a divergence (non-finite loss) is a function of private batches",
        "error": "the message of a divergence or failure",
        "train_seconds": "total step time (depends on every |B_t|)",
        "images_per_second": "examples drawn divided by time",
    },
    "wandb run": {
        "train/*": "the metrics.csv fields above",
        "diag/* (source train)": "the diagnostics rows above",
        "result/train_seconds, result/images_per_second, result/status": "as in result.json",
    },
}

COVERED = (
    "model.pt (final weights and EMA weights), the noisy updates of every step, test "
    "accuracy and loss in epochs.csv / result.json, diagnostics rows with source = heldout"
)

CAVEAT = (
    "Not covered by the DP guarantee: everything computed from private training data "
    "without noise (training loss and accuracy, realised batch sizes |B_t|, step times and "
    "images/s, per-example gradient norms, clip fractions, train-source diagnostics, the "
    "run's status). See privacy.json."
)


def statement(
    *,
    private: bool,
    epsilon: float | None,
    delta: float | None,
    randomness: dict,
    private_examples: int,
    public_examples: int,
    public_source: str | None,
    abandoned_steps: int = 0,
) -> dict:
    """The content of ``privacy.json``: what epsilon covers, assumes and leaves out."""
    out = {
        "private": private,
        "epsilon": epsilon,
        "delta": delta,
        "protected_examples": private_examples,
        "unprotected_public_examples": public_examples,
        "public_source": public_source,
        "randomness": randomness,
        "epsilon_assumes": randomness.get("epsilon_assumes"),
        "covered": COVERED if private else None,
        "not_covered": NOT_COVERED,
        "abandoned_steps_counted": abandoned_steps,
    }
    if public_examples:
        out["public_note"] = (
            f"{public_examples} examples ({public_source}) are used without privacy for the "
            "public-statistics normalisation; epsilon covers only the other "
            f"{private_examples} training examples"
        )
    return out
