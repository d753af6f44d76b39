"""Resuming a run without redoing or hiding what an earlier attempt released: the
checks before a run directory is reused, and the record of released steps that every
step's commit block writes (released.json) and a resume counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalemix.errors import ConfigError
from scalemix.train.config import TrainConfig
from scalemix.train.rundir import RunDir, read_json, write_json_atomic

if TYPE_CHECKING:
    from scalemix.train.loop import Trainer


def check_out_dir(rd: RunDir, cfg: TrainConfig, resume: bool, resume_diverged: bool) -> None:
    """Refuse to overwrite a finished run, to restart an unfinished one without --resume,
    to resume a diverged one without --resume-diverged, or with another configuration."""
    if not rd.root.exists():
        return
    result = rd.read_result()
    if result is not None and not resume:
        raise ConfigError(
            f"{rd.root} already holds a finished run (status {result.get('status')}); "
            "choose another --out or delete it"
        )
    if result is not None and result.get("status") == "diverged" and not resume_diverged:
        div = read_json(rd.divergence) or {}
        raise ConfigError(
            f"{rd.root} diverged at step {div.get('diverged_at_step', '?')}; --resume would "
            "redo steps whose updates were already released. Add --resume-diverged to go on "
            "from the last checkpoint with fresh randomness, counting the released steps in "
            "epsilon (which then exceeds the target), or start a new run"
        )
    if rd.checkpoint.exists() and not resume:
        raise ConfigError(
            f"{rd.root} holds an unfinished run; add --resume to continue it, or choose another --out"
        )
    if resume and rd.checkpoint.exists():
        saved = rd.read_config()
        if saved is not None and saved.get("config") != cfg.as_dict():
            diff = sorted(k for k in cfg.as_dict() if saved["config"].get(k) != cfg.as_dict()[k])
            raise ConfigError(
                f"--resume: the configuration differs from the run in {rd.root} ({', '.join(diff)}); "
                "resume with the same options"
            )


def count_released_beyond_checkpoint(tr: Trainer) -> dict | None:
    """Resume after a divergence, a crash, an OOM or a kill: the steps the earlier
    attempt committed after its last checkpoint were released (metrics, diagnostics,
    W&B, the grid's log), so they are added to the ledger, and the secret streams go
    on past everything that attempt drew: nothing released is redone with other noise
    uncounted, and no draw is reused (docs/sharp-edges.md, item 7). Seeded runs too:
    redoing a released step with the same draws is only harmless if the redo is bit for
    bit the same computation, which a change of threads, device or engine plan breaks
    without notice.

    Counted when the trainer is built (its ledger and streams are right from the start);
    made durable by ``persist_counted`` when the run directory opens. Returns what
    ``persist_counted`` needs, or None when nothing was released beyond the checkpoint."""
    rd = tr.run_dir
    diverged = rd.divergence.exists()
    record = read_json(rd.divergence if diverged else rd.released) or {}
    extra = int(record.get("steps_released", tr.step)) - tr.step
    if tr.world.distributed:  # a kill may land between two ranks' records: the most
        extra = max(tr.world.gather_object(extra))  # any rank released counts for all
        diverged = any(tr.world.gather_object(diverged))
    if extra <= 0 and not diverged:
        return None
    if extra > 0 and tr.private:
        tr.ledger.step(tr.sigma, tr.q, count=extra)
        tr.abandoned_steps += extra
    draws = record.get("stream_draws") or {}
    for name, stream in (("sampler", tr.rng.sampler), ("noise", tr.rng.noise)):
        # one draw of each per step: past the released steps, and past what was drawn
        stream.draws = max(stream.draws + max(extra, 0), int(draws.get(name, 0)))
    tr.committed_rng = tr.rng_state()
    return {"record": record, "diverged": diverged, "extra": max(extra, 0)}


def persist_counted(tr: Trainer, counted: dict | None) -> None:
    """Make what ``count_released_beyond_checkpoint`` counted durable, before anything of
    this attempt is released: a checkpoint with the counted steps, the released record,
    and the divergence record renamed (it is history now)."""
    if counted is None:
        return
    rd = tr.run_dir
    what = "diverged run" if counted["diverged"] else "run that stopped after its last checkpoint"
    tr.log(
        f"resuming a {what} from step {tr.step}: {counted['extra']} released step(s) of "
        "the earlier attempt are added to epsilon; its random draws are not reused"
    )
    rd.root.mkdir(parents=True, exist_ok=True)
    tr.save_checkpoint()  # the counted steps are durable before anything else happens
    record_released(tr)
    if counted["diverged"]:
        at = counted["record"].get("diverged_at_step", "unknown")
        rd.divergence.rename(rd.root / f"divergence-at-step-{at}.json")


def released_record(tr: Trainer) -> dict:
    """What this run has released so far: every committed step (its update reaches
    W&B, the logs and the diagnostics as soon as it commits) and the draws it took."""
    return {
        "steps_released": tr.step,
        "abandoned_steps": tr.abandoned_steps,
        "stream_draws": {"sampler": tr.rng.sampler.draws, "noise": tr.rng.noise.draws},
    }


def record_released(tr: Trainer) -> None:
    """Written in every step's commit block, before anything of the step leaves the
    process: a kill at any later moment leaves a record a resume counts. Atomic
    (rename), not fsynced: it must survive the process, not the machine."""
    write_json_atomic(tr.run_dir.released, released_record(tr), fsync=False)
