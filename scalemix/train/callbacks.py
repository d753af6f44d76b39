"""Observers of a run: they read what a committed step or an evaluation produced and
show or send it. None of them sits inside a step's commit block, and none changes what
the run computes (``StopAfter`` only ends it, as a crash would).

    Progress   the console: a bar on a terminal, else a line every 30 s; a line per epoch
    Wandb      a W&B run (offline or online) with the step, evaluation and diagnostics rows
    StopAfter  tests: stop after step n as a crash would (checkpoint, then Interrupted)
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scalemix.tracking import WandbSettings
    from scalemix.train.loop import Trainer


class Callback:
    def on_start(self, tr: Trainer) -> None: ...

    def on_step(self, tr: Trainer, row: dict) -> None: ...

    def on_eval(self, tr: Trainer, row: dict) -> None: ...

    def after_checkpoint(self, tr: Trainer) -> None:
        """After the step's evaluation and checkpoint (if any)."""

    def on_end(self, tr: Trainer, result: dict | None, exit_code: int) -> None: ...


class Interrupted(Exception):
    """Raised by ``StopAfter`` (tests) to simulate a crash after a step."""


class StopAfter(Callback):
    def __init__(self, step: int):
        self.stop = step

    def after_checkpoint(self, tr: Trainer) -> None:
        if tr.step >= self.stop and tr.step < tr.total_steps:
            tr.save_checkpoint()
            raise Interrupted(f"stopped after step {tr.step}")


class Progress(Callback):
    """A tqdm bar on a terminal; otherwise a line every 30 s. One line per evaluation."""

    def __init__(self, log, enabled: bool = True):
        self.log, self.enabled = log, enabled
        self.bar = None
        self.last_beat = time.monotonic()
        self.clipped: list[tuple[float, float]] = []  # (clip fraction, median norm) per step

    def on_start(self, tr: Trainer) -> None:
        if tr.resumed_from is not None:
            self.log(f"resuming {tr.run_dir.root} from step {tr.step}/{tr.total_steps}")
        else:
            self.log(
                f"{tr.cfg.epochs:g} epochs = {tr.total_steps} steps at sampling rate "
                f"q = {tr.q:.4g} ({tr.total_steps * tr.q:.2f} expected passes over "
                f"{tr.n} examples)"
            )
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=tr.total_steps, initial=tr.step, unit="step", dynamic_ncols=True, desc="train"
            )

    def on_step(self, tr: Trainer, row: dict) -> None:
        if row.get("clip_fraction") is not None:
            self.clipped.append((row["clip_fraction"], row["grad_norm_median"]))
        if self.bar is not None:
            eps = tr.last_eval.get("epsilon")
            self.bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                eps="-" if eps is None else f"{eps:.2f}",
                img_s=f"{row['images_per_second'] or 0:.0f}",
            )
            self.bar.update(1)
        elif self.enabled and time.monotonic() - self.last_beat > 30:
            self.last_beat = time.monotonic()
            self.log(
                f"step {tr.step}/{tr.total_steps}  loss {row['loss']:.3f}  "
                f"{tr.images_seen / tr.train_seconds:.1f} img/s"
            )

    def on_eval(self, tr: Trainer, ev: dict) -> None:
        eps = ev["epsilon"]
        self.log(
            f"epoch {ev['epoch']:.2f}  step {tr.step}/{tr.total_steps}  "
            f"test_acc {ev['test_acc']:.4f}"
            + (f"  ema {ev['test_acc_ema']:.4f}" if "test_acc_ema" in ev else "")
            + (f"  eps {eps:.3f}" if eps is not None else "  non-private")
            + f"  {tr.images_seen / tr.train_seconds:.1f} img/s"
        )

    def on_end(self, tr: Trainer, result: dict | None, exit_code: int) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if result is not None and result.get("status") == "done":
            note = clipping_note(self.clipped, tr.cfg.clip)
            if note:
                self.log(note)


def clipping_note(clipped: list[tuple[float, float]], clip: float) -> str | None:
    """A line for the reader when (nearly) every example was clipped on most steps: usual
    under DP-SGD, but it looks like a bug to someone who has not seen it."""
    if not clipped:
        return None
    all_clipped = sum(f >= 0.99 for f, _ in clipped)
    if all_clipped < len(clipped) / 2:
        return None
    norms = sorted(m for _, m in clipped)
    lo, hi = norms[len(norms) // 10], norms[-1 - len(norms) // 10]
    return (
        f"note: every example was clipped on {all_clipped} of {len(clipped)} steps "
        f"(median per-example gradient norm {lo:.3g}-{hi:.3g} against C = {clip:g}). Usual "
        "under DP-SGD: each clipped gradient has norm C, and C sets the noise's scale, so "
        "what matters is the direction of the clipped sum (metrics.csv: clip_fraction, "
        "grad_norm_median; docs/training.md, 'Diagnostics while training')"
    )


class Wandb(Callback):
    """The run as a W&B run: step rows under train/, evaluations under eval/, the
    diagnostics rows, and the result as the summary."""

    def __init__(self, settings: WandbSettings, log):
        self.settings, self.log = settings, log
        self.run = None

    def on_start(self, tr: Trainer) -> None:
        from scalemix.diagnostics.recorder import CAVEAT
        from scalemix.privacy.disclosure import CAVEAT as PRIVATE_CAVEAT
        from scalemix.tracking import WandbRun

        notes = [self.settings.notes or ""]
        if tr.private:
            notes += [tr.rng.assumption + ".", PRIVATE_CAVEAT]
        if tr.cfg.diag_every and (tr.cfg.diag_source == "train" or tr.diag.grad_side):
            notes.append(CAVEAT)
        settings = replace(self.settings, notes=" ".join(n for n in notes if n).strip())
        self.run = WandbRun(settings, tr.run_dir.root, tr.resolved_config())

    def on_step(self, tr: Trainer, row: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in row.items()}, tr.step)
        if tr.last_diag:
            self.run.log_diagnostics(tr.last_diag, tr.step)

    def on_eval(self, tr: Trainer, ev: dict) -> None:
        self.run.log({f"eval/{k}": v for k, v in ev.items()}, tr.step)

    def on_end(self, tr: Trainer, result: dict | None, exit_code: int) -> None:
        if self.run is None:
            return
        try:
            if result is not None:
                self.run.summary({f"result/{k}": v for k, v in result.items()})
            cmd = self.run.finish(exit_code)
            if cmd:
                self.log(f"W&B run written offline; upload it with: {cmd}")
        except Exception as e:  # pragma: no cover - W&B must not lose a run
            self.log(f"warning: W&B run not finished cleanly: {e}")
        self.run = None
