"""What a run writes besides its steps: the run directory opened at the start (config,
privacy statement, logs) and the outputs of its end (model, predictions, audit, figure).
The paths are ``RunDir``'s (train/rundir.py); the order of the end is ``Trainer.run``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from scalemix.audit import input_canary_scores, load_canaries, run_audit
from scalemix.audit import write as write_audit
from scalemix.data import normalize
from scalemix.diagnostics.recorder import CAVEAT
from scalemix.diagnostics.recorder import COLUMNS as DIAG_COLUMNS
from scalemix.diagnostics.table import TABLE, plot_scale_ratio, read_diagnostics
from scalemix.privacy.disclosure import statement
from scalemix.train.rundir import CsvLog, save_atomic, write_json_atomic

if TYPE_CHECKING:
    from scalemix.train.loop import Trainer

STEP_COLUMNS = [
    "step",
    "epoch",
    "batch",
    "loss",
    "train_acc",
    "lr",
    "grad_norm_median",
    "clip_fraction",
    "step_seconds",
    "images_per_second",
]
EPOCH_COLUMNS = [
    "step",
    "epoch",
    "epsilon",
    "test_acc",
    "test_loss",
    "test_acc_ema",
    "test_loss_ema",
    "train_seconds",
]


def open_logs(tr: Trainer) -> tuple[CsvLog, CsvLog, CsvLog]:
    """config.json, privacy.json, the diagnostics' description, and the three CSV logs
    (a resumed run's cut after its checkpoint's step; a new run's started afresh)."""
    rd, cfg = tr.run_dir, tr.cfg
    rd.root.mkdir(parents=True, exist_ok=True)
    if tr.world.rank == 0:  # ranks > 0 write only their logs
        write_json_atomic(rd.config, tr.resolved_config())
        write_privacy_statement(tr)
    logs = (
        CsvLog(rd.metrics_path, STEP_COLUMNS),
        CsvLog(rd.epochs_path, EPOCH_COLUMNS),
        CsvLog(rd.diagnostics, DIAG_COLUMNS),
    )
    for lg in logs:
        if tr.resumed_from is not None:
            lg.truncate_after(tr.step)
        else:
            lg.path.unlink(missing_ok=True)
    if cfg.diag_every and tr.world.rank == 0:
        probe = cfg.diag_source == "probe"
        write_json_atomic(
            rd.diagnostics_meta,
            {
                "table": TABLE,
                "columns": DIAG_COLUMNS,
                "every": cfg.diag_every,
                "block_source": tr.diag.block_source_label,
                "block_rows": f"fixed held-out batch: the first {min(cfg.diag_probe_size, len(tr.test_y))} test examples"
                if probe
                else "first physical chunk of the step's training batch",
                "gradient_rows": "whole logical batch of training examples (source=train)"
                if tr.diag.grad_side
                else None,
                "rows_from_training_data": cfg.diag_source == "train" or tr.diag.grad_side,
                "caveat": CAVEAT,
            },
        )
    return logs


def write_privacy_statement(tr: Trainer) -> None:
    write_json_atomic(
        tr.run_dir.privacy,
        statement(
            private=tr.private,
            epsilon=tr.epsilon(),
            delta=tr.cfg.delta if tr.private else None,
            randomness=tr.rng.describe(),
            private_examples=tr.n,
            public_examples=tr.cfg.public_size,
            public_source=tr.public_source,
            abandoned_steps=tr.abandoned_steps,
            noise_tail_delta=tr.noise_tail_delta(),
            canaries=tr.canary_note(),
        ),
    )


def save_final_model(tr: Trainer) -> None:
    state = {"model": tr.model.state_dict(), "config": tr.cfg.as_dict()}
    if tr.ema is not None:
        state["ema"] = tr.ema.model.state_dict()
    save_atomic(state, tr.run_dir.model)


def save_test_predictions(tr: Trainer) -> None:
    """The final model's class for every test example (and the EMA weights', with the test
    labels beside them): runs on the same test set can then be compared example by example
    (McNemar, paired bootstrap over test examples). Taken from the last step's evaluation;
    evaluated again only when this process did not evaluate the final model (a resume at
    the end)."""
    rd = tr.run_dir
    fresh = tr.last_eval.get("step") == tr.step
    preds = tr.test_predictions if fresh else None
    if preds is None:
        preds = tr.evaluate(tr.model)[2]
    np.save(rd.test_predictions, preds.to(torch.int16).cpu().numpy())
    if tr.ema is not None:
        ema = tr.test_predictions_ema if fresh else None
        if ema is None:
            ema = tr.evaluate(tr.ema.model)[2]
        np.save(rd.test_predictions_ema, ema.to(torch.int16).cpu().numpy())
    np.save(rd.test_labels, tr.test_y.to(torch.int16).cpu().numpy())


def audit(tr: Trainer) -> dict:
    """Save the canaries, compute the one-run lower bounds, and raise the alarm if one
    exceeds the accountant's epsilon (scalemix.audit)."""
    cfg, rd = tr.cfg, tr.run_dir
    tr.canaries.save(
        rd.root,
        q=tr.q,
        sigma=tr.sigma,
        clip=cfg.clip,
        delta=cfg.delta if tr.private else 1e-5,
        epsilon=tr.epsilon() if tr.private else np.nan,
        mean=np.array(tr.mean),
        std=np.array(tr.std),
        num_classes=tr.num_classes,
    )
    model_scores = None
    if tr.canaries.kind == "input":
        model_scores = input_canary_scores(
            tr.model,
            normalize(tr.canaries.x.to(tr.device), tr.mean, tr.std),
            tr.canaries.y.to(tr.device),
        )
    a = run_audit(
        load_canaries(rd.root),
        q=tr.q,
        sigma=tr.sigma,
        clip=cfg.clip,
        epsilon=tr.epsilon(),
        delta=cfg.delta if tr.private else 1e-5,
        model_scores=model_scores,
    )
    write_audit(rd.root, a)
    tr.log(
        f"audit ({a['canaries']} {a['kind']} canaries, {a['primary_adversary']}): "
        f"epsilon >= {a['epsilon_lower_bound']:.3f} (Steinke et al.), "
        f">= {a['epsilon_lower_bound_fdp']:.3f} (f-DP, GDP curve) at {a['confidence']:.0%}; "
        f"ceiling {a['ceiling']['steinke']:.2f}; accountant "
        + ("-" if a["accountant_epsilon"] is None else f"{a['accountant_epsilon']:.3f}")
    )
    if a["alarm"]:
        tr.log(a["alarm_message"])
    return a


def diagnostics_figure(tr: Trainer) -> None:
    """The scale-ratio figure from the diagnostics table; never raises over the outcome."""
    try:
        tr.diag_log.close()
        plot_scale_ratio(
            read_diagnostics(tr.run_dir.root),
            tr.run_dir.diagnostics_figure,
            title=f"{tr.cfg.model} {tr.model.axes.short()}",
        )
    except Exception as e:  # pragma: no cover - a figure must not lose a run
        tr.log(f"warning: diagnostics figure not written: {e}")
