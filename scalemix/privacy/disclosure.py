"""What epsilon covers in a run's outputs, and what it does not: one catalogue for all outputs.

The attacker reads everything a run writes, and every other run of its grid
(docs/sharp-edges.md, "What epsilon does not cover"). epsilon bounds what the *noisy
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
        "step_seconds": "step time grows with |B_t|, and about doubles when the fast engine's "
        "rounding guard flags an example of the batch, which a chosen example can be made to "
        "do (a timing side channel)",
        "images_per_second": "|B_t| divided by the step time",
    },
    "epochs.csv": {
        "train_seconds": "cumulative step time (depends on every |B_t| and on the steps "
        "the rounding guard computed twice)",
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
        "diag/train/* (source train)": "the diagnostics rows above",
        "result/train_seconds, result/images_per_second, result/status": "as in result.json",
        "system metrics (CPU, GPU, memory, time)": "load and timing follow every |B_t|",
    },
    "printed output and train.log": {
        "step and epoch lines, progress bar": "loss and images/s of private batches, timings",
        "the grid's train.log of each cell": "the same lines, kept beside the cell",
        "the closing clipping note": "how many steps clipped every example, and the range of "
        "the steps' median per-example gradient norms (metrics.csv's fields, summarised)",
    },
    "checkpoint.pt": {
        "images_seen": "the sum of every realised batch size |B_t|",
        "train_seconds": "total step time",
        "audit": "the canary set and, for gradient canaries, the steps that drew each",
    },
    "released.json and divergence.json": {
        "steps_released, stream_draws": "how far the run got; a divergence depends on private "
        "batches",
    },
    "audit/canaries.npz": {
        "data_index, shift, member": "which training examples were input canaries, their "
        "label shifts and coins (functions of the secret canary stream; no image, no label, "
        "and not which steps drew them)",
        "draws, obs (gradient canaries)": "the steps that drew each gradient canary and the "
        "noisy audit vector (no training example involved)",
    },
    "grid directory": {
        "cells/<id>/attempts.jsonl, error.log": "when each attempt started and how a run "
        "failed (timings and failures follow private data)",
    },
    "ranks/<r>/": {
        "metrics.csv, epochs.csv, diagnostics.csv": "rank r's own shard, as above",
    },
    "config.json / privacy.json": {
        "train_size, private_examples": "the number of private examples N (the data set's "
        "size is treated as public, as DP-SGD's add/remove accounting does)",
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
    noise_tail_delta: float | None = None,
    canaries: str | None = None,
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
        "grid": (
            "a run of an ablation grid shares its batches, augmentations and canaries with "
            "the grid's other runs of the same seed (seeded modes): what the grid publishes "
            "together is covered by the grid's joint epsilon ('scalemix status' and the "
            "report), not by this run's"
        ),
    }
    if noise_tail_delta is not None:
        out["noise_tail_delta"] = noise_tail_delta
        out["noise_tail_note"] = (
            "Box-Muller from 96-bit uniforms cuts the noise's tails at 11.5 sigma; this adds "
            "at most noise_tail_delta to delta (included in no other figure)"
        )
    if canaries:
        out["canaries"] = canaries
    if public_examples:
        out["public_note"] = (
            f"{public_examples} examples ({public_source}) are used without privacy for the "
            "public-statistics normalisation; epsilon covers only the other "
            f"{private_examples} training examples"
        )
    return out
