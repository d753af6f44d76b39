"""The DP-SGD training loop, top to bottom.

One step:
  1. Poisson-sample a logical batch (each example joins with probability q).
  2. (public_batch norm) recompute the normalisation statistics from the public batch.
  3. For each physical chunk: normalise, make K augmented views on the device, and let
     the engine return the sum of the per-example clipped gradients (views averaged
     per example before clipping).
  4. Add Gaussian noise N(0, (sigma C)^2) once to the sum, divide by the *expected*
     batch size, and take an optimiser step; update the EMA.
  5. Record the step in the privacy ledger (the only source of the reported epsilon).
Non-private mode runs the same loop with no clipping, no noise and no ledger.

Evaluation runs at the end of each epoch (``steps_per_epoch = round(1/q)`` steps) and at
the last step; the reported accuracy is the last one, never the best.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scalemix import __version__
from scalemix.audit import Canaries, input_canary_scores, load_canaries, run_audit, summary_fields
from scalemix.audit import write as write_audit
from scalemix.data import ImageData, augment, load_data, load_public_images, normalize
from scalemix.diagnostics.recorder import CAVEAT, TrainingDiagnostics
from scalemix.diagnostics.recorder import COLUMNS as DIAG_COLUMNS
from scalemix.diagnostics.table import FIGURE, META, TABLE, plot_scale_ratio, read_diagnostics
from scalemix.engine import NonPrivateEngine, make_engine
from scalemix.engine.base import clip_margin, precision_policy
from scalemix.errors import ConfigError, Diverged, PrivacyError
from scalemix.models import create_model, refresh_public_stats
from scalemix.privacy import (
    Ledger,
    NoiseSource,
    PoissonSampler,
    RunRandomness,
    ShuffleSampler,
    sigma_for,
)
from scalemix.privacy.disclosure import CAVEAT as PRIVATE_CAVEAT
from scalemix.privacy.disclosure import NOT_COVERED, statement
from scalemix.privacy.mechanism import noisy_mean
from scalemix.privacy.randomness import tail_delta
from scalemix.runtime import keep_cpu_memory
from scalemix.train.config import TrainConfig
from scalemix.train.distributed import World
from scalemix.train.ema import EMA
from scalemix.train.optim import make_optimizer, make_schedule
from scalemix.train.rundir import CsvLog, RunDir, read_json, save_atomic, write_json_atomic
from scalemix.train.signals import deferred_signals, interrupt_on_sigterm

if TYPE_CHECKING:
    from scalemix.tracking import WandbSettings

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
PUBLIC_SPLIT_SEED = 1234  # the public hold-out is a property of the data, not of the run
AUG_PAD = 4  # reflect-pad crops shift by up to 4 px (De et al. 2022)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA device is available here; use --device auto or cpu"
        )
    return torch.device(name)


class Interrupted(Exception):
    """Raised by ``stop_after`` (tests) to simulate a crash after a step."""


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: ImageData | None = None,
        resume: bool = False,
        resume_diverged: bool = False,
        progress: bool = True,
        log=print,
        wandb: WandbSettings | None = None,
        world: World | None = None,
        noise_nonce: str | None = None,
    ):
        """``noise_nonce`` reproduces the noise of the seeded run that recorded it
        (``resolved.randomness.noise_nonce`` in its config.json): the two runs then share
        their noise, and only one of them may be published."""
        cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        # Data-parallel ranks (train/distributed.py): rank 0 writes the run directory,
        # rank r > 0 only its logs, under ranks/<r>/.
        self.world = world or World.from_env(self.device)
        self.main_dir = RunDir(cfg.out)  # rank 0's directory: it holds the run's checkpoint
        if self.world.distributed:
            if cfg.audit_canaries:
                raise ConfigError(
                    "--audit-canaries needs one process: audit a single-rank run of the same configuration"
                )
            if cfg.sampler != "poisson":
                raise ConfigError("several ranks need --sampler poisson (each samples its shard)")
            if self.world.rank > 0:
                cfg = cfg.replace(out=str(Path(cfg.out) / "ranks" / str(self.world.rank)))
                progress, log, wandb = False, (lambda *_: None), None
        self.cfg = cfg
        self.resume_diverged = resume_diverged
        self.wandb_settings = wandb
        self.wandb = None
        self.log = log
        self.progress = progress
        self.run_dir = RunDir(cfg.out)
        if self.device.type == "cpu":
            keep_cpu_memory()
        self._check_out_dir(resume)

        self.private = not cfg.non_private
        # a resumed run's checkpoint, read before anything it decides (noise, canaries)
        self._resume_state = self._read_checkpoint() if resume else None
        if self._resume_state is not None:  # the run goes on with its own noise key
            noise_nonce = (self._resume_state.get("rng") or {}).get("noise_nonce", "")
        elif noise_nonce is None and self.world.distributed:  # one nonce for every rank
            noise_nonce = self.world.gather_object(os.urandom(16).hex())[0]
        # Every random stream of the run, and who may know it: privacy/randomness.py.
        self.rng = RunRandomness(
            cfg.noise if self.private else "public",
            cfg.seed,
            self.device,
            rank=self.world.rank,
            identity=cfg.identity(),
            run_dir=cfg.out,
            noise_nonce=noise_nonce,
        )

        # ---- data (uint8 on the device; normalised per chunk)
        data = data or load_data(cfg.data, cfg.data_dir, download=cfg.download, size=cfg.image_size)
        self.data_summary = data.summary()
        self.num_classes = data.num_classes
        self.mean, self.std = data.mean, data.std
        train_x, train_y = data.train_x, data.train_y
        data_index = torch.arange(len(train_y))  # each private example's index in the data set
        self.public_x = None
        self.public_source = None
        if cfg.public_size:
            if cfg.public_source == "split":
                if cfg.public_size >= len(train_y):
                    raise ConfigError(f"--public-size {cfg.public_size} leaves no training data")
                # Carved out of the training split: these examples are used without privacy
                # (result.json and privacy.json say so); epsilon covers the rest.
                perm = torch.randperm(
                    len(train_y), generator=torch.Generator().manual_seed(PUBLIC_SPLIT_SEED)
                )
                pub, priv = perm[: cfg.public_size], perm[cfg.public_size :].sort().values
                public_u8 = train_x[pub]
                train_x, train_y, data_index = train_x[priv], train_y[priv], data_index[priv]
                self.public_source = (
                    f"{cfg.public_size} examples of the {data.name} training split "
                    f"(fixed split, seed {PUBLIC_SPLIT_SEED}): NOT protected"
                )
            else:
                public_u8 = load_public_images(
                    cfg.public_source, cfg.public_size, tuple(train_x.shape[1:])
                )
                self.public_source = f"{cfg.public_size} images from {cfg.public_source}"
            self.public_x = normalize(public_u8, data.mean, data.std).to(self.device)
        self.canaries = None
        self.audit_result: dict | None = None
        n_real = len(train_y)
        if cfg.audit_canaries and cfg.canary_kind == "input":
            # Canary examples leave the training data; the included ones come back,
            # mislabelled, as examples like any other (appended after the real ones).
            self.canaries = self._canaries(
                "input", data=(train_x, train_y, data.num_classes, data_index)
            )
            keep = torch.ones(len(train_y), dtype=torch.bool)
            keep[self.canaries.source_index] = False
            train_x = torch.cat([train_x[keep], self.canaries.x])
            train_y = torch.cat([train_y[keep], self.canaries.y])
            n_real = int(keep.sum())
        self.train_x, self.train_y = train_x.to(self.device), train_y.to(self.device)
        self.test_x, self.test_y = data.test_x.to(self.device), data.test_y.to(self.device)
        self.n = n_real  # private examples (canaries, if any, come after them)

        # ---- sampling and privacy
        self.q = cfg.batch_size / self.n
        if self.q > 1:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is larger than the {self.n} training examples; lower it"
            )
        self.steps_per_epoch = max(1, round(1 / self.q))
        self.total_steps = max(1, round(cfg.epochs / self.q))
        if self.private:
            if cfg.delta >= 1 / self.n:
                raise PrivacyError(
                    f"--delta {cfg.delta:g} is not below 1/N = {1 / self.n:.2e} for N = {self.n} "
                    "training examples; such a delta allows releasing an example outright. "
                    "Use a delta well below 1/N (e.g. 1e-5)"
                )
            self.ledger = Ledger(cfg.accountant, cfg.sampler)
            if cfg.sigma is not None:
                self.sigma = float(cfg.sigma)
            else:
                self.sigma = sigma_for(
                    epsilon=cfg.epsilon,
                    sample_rate=self.q,
                    steps=self.total_steps,
                    delta=cfg.delta,
                    accountant=cfg.accountant,
                )
        else:
            self.ledger, self.sigma = None, 0.0
        self.shard = self.world.shard(self.n) if self.world.distributed else None
        if self.shard is not None:  # this rank's examples, Poisson with the run's q
            self.sampler = PoissonSampler(len(self.shard), self.q, self.rng.sampler)
        elif cfg.sampler == "poisson":  # every canary gets a uniform too (see scalemix.audit)
            self.sampler = PoissonSampler(self.n + cfg.audit_canaries, self.q, self.rng.sampler)
        else:
            self.sampler = ShuffleSampler(self.n, cfg.batch_size, cfg.seed)
        self.noise = NoiseSource(self.rng.noise)

        # ---- model, engine, optimiser
        self.rng.init_model_rng()
        self.model = create_model(
            cfg.model,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            **cfg.model_axes().as_dict(),
        ).to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.engine = (
            make_engine(cfg.engine, self.model, cfg.clip)
            if self.private
            else NonPrivateEngine(self.model)
        )
        if cfg.audit_canaries and cfg.canary_kind == "gradient":
            self.canaries = self._canaries("gradient")
        self.optimizer = make_optimizer(
            cfg.optimizer, self.engine.params, cfg.lr, cfg.momentum, cfg.weight_decay
        )
        self.schedule = make_schedule(self.optimizer, cfg.lr_schedule, self.total_steps)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema else None
        self.step = 0
        self.train_seconds = 0.0
        self.images_seen = 0
        self.last_eval: dict = {}
        self.test_predictions: torch.Tensor | None = None  # of self.model, at the last evaluation
        self.test_predictions_ema: torch.Tensor | None = None  # of the EMA weights, likewise
        probe_x = None
        if cfg.diag_every and cfg.diag_source == "probe":
            probe_x = normalize(self.test_x[: cfg.diag_probe_size], self.mean, self.std)
        self.diag = TrainingDiagnostics(
            self.model,
            self.engine,
            every=cfg.diag_every,
            source=cfg.diag_source,
            probe_x=probe_x,
            sigma=self.sigma,
            clip=cfg.clip if self.private else None,
            last_step=self.total_steps,
        )
        self.last_diag: list[dict] = []

        self._committed_rng = self._rng_state()
        self.resumed_from = None
        self.abandoned_steps = 0  # steps released by earlier attempts beyond their checkpoint
        if self._resume_state is not None:
            self._load_checkpoint(self._resume_state)
            self._resume_state = None
        self.world.agree(self.step, "the step to resume from", self.device)
        # an earlier attempt in this directory (resumed, or restarted before its first
        # checkpoint) may have released steps that no checkpoint holds
        self._count_released_beyond_checkpoint()
        if resume:
            self.run_dir.result.unlink(missing_ok=True)  # a stale failed/diverged result
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir.config, self.resolved_config())
        self._write_privacy_statement()
        self.metrics = CsvLog(self.run_dir.metrics_path, STEP_COLUMNS)
        self.epochs_log = CsvLog(self.run_dir.epochs_path, EPOCH_COLUMNS)
        self.diag_log = CsvLog(self.run_dir.root / TABLE, DIAG_COLUMNS)
        logs = (self.metrics, self.epochs_log, self.diag_log)
        if self.resumed_from is not None:
            for lg in logs:
                lg.truncate_after(self.step)
        else:
            for lg in logs:
                lg.path.unlink(missing_ok=True)
        if cfg.diag_every:
            write_json_atomic(
                self.run_dir.root / META,
                {
                    "table": TABLE,
                    "columns": DIAG_COLUMNS,
                    "every": cfg.diag_every,
                    "block_source": self.diag.block_source_label,
                    "block_rows": "first physical chunk of the step's training batch"
                    if cfg.diag_source == "train"
                    else f"fixed held-out batch: the first {len(probe_x)} test examples",
                    "gradient_rows": "whole logical batch of training examples (source=train)"
                    if self.diag.grad_side
                    else None,
                    "rows_from_training_data": cfg.diag_source == "train" or self.diag.grad_side,
                    "caveat": CAVEAT,
                },
            )

    # ------------------------------------------------------------------ setup helpers

    def _check_out_dir(self, resume: bool) -> None:
        rd = self.run_dir
        if not rd.root.exists():
            return
        result = rd.read_result()
        if result is not None and not resume:
            raise ConfigError(
                f"{rd.root} already holds a finished run (status {result.get('status')}); "
                "choose another --out or delete it"
            )
        if result is not None and result.get("status") == "diverged" and not self.resume_diverged:
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
            if saved is not None and saved.get("config") != self.cfg.as_dict():
                diff = sorted(
                    k for k in self.cfg.as_dict() if saved["config"].get(k) != self.cfg.as_dict()[k]
                )
                raise ConfigError(
                    f"--resume: the configuration differs from the run in {rd.root} ({', '.join(diff)}); "
                    "resume with the same options"
                )

    def _write_privacy_statement(self) -> None:
        write_json_atomic(
            self.run_dir.privacy,
            statement(
                private=self.private,
                epsilon=self.epsilon(),
                delta=self.cfg.delta if self.private else None,
                randomness=self.rng.describe(),
                private_examples=self.n,
                public_examples=self.cfg.public_size,
                public_source=self.public_source,
                abandoned_steps=self.abandoned_steps,
                noise_tail_delta=self._noise_tail_delta(),
                canaries=self._canary_note(),
            ),
        )

    def _noise_tail_delta(self) -> float | None:
        """The delta the noise's cut tails add over the planned (and abandoned) steps."""
        if not self.private:
            return None
        steps = max(self.total_steps, self.step) + self.abandoned_steps
        d = self.num_params + self.cfg.audit_canaries
        eps = self.epsilon() or 0.0
        if self.cfg.sigma is None and self.cfg.epsilon is not None:  # the calibrated target
            eps = max(eps, self.cfg.epsilon)
        return tail_delta(eps, steps, d)

    def _canary_note(self) -> str | None:
        if self.canaries is None:
            return None
        if self.canaries.kind == "gradient":
            return (
                f"{self.canaries.m} gradient canaries on an audit vector beside the model (no "
                "training example involved); audit/canaries.npz holds their coins, draws and "
                "noisy observations"
            )
        return (
            f"{self.canaries.m} training examples were input canaries: taken out of the "
            "training data, the included half put back with a random wrong label; "
            "audit/canaries.npz holds their indices, label shifts and coins (no image, no "
            "label, not which steps drew them); epsilon covers the training data as modified"
        )

    def _count_released_beyond_checkpoint(self) -> None:
        """Resume after a divergence, a crash, an OOM or a kill: the steps the earlier
        attempt committed after its last checkpoint were released (metrics, diagnostics,
        W&B, the grid's log), so they are added to the ledger, and the secret streams go
        on past everything that attempt drew: nothing released is redone with other noise
        uncounted, and no draw is reused (docs/sharp-edges.md, item 7). Seeded runs too:
        redoing a released step with the same draws is only harmless if the redo is bit for
        bit the same computation, which a change of threads, device or engine plan breaks
        without notice."""
        rd = self.run_dir
        diverged = rd.divergence.exists()
        record = read_json(rd.divergence if diverged else rd.released) or {}
        extra = int(record.get("steps_released", self.step)) - self.step
        if self.world.distributed:  # a kill may land between two ranks' records: the most
            extra = max(self.world.gather_object(extra))  # any rank released counts for all
            diverged = any(self.world.gather_object(diverged))
        if extra <= 0 and not diverged:
            return
        if extra > 0 and self.private:
            self.ledger.step(self.sigma, self.q, count=extra)
            self.abandoned_steps += extra
        draws = record.get("stream_draws") or {}
        for name, stream in (("sampler", self.rng.sampler), ("noise", self.rng.noise)):
            # one draw of each per step: past the released steps, and past what was drawn
            stream.draws = max(stream.draws + max(extra, 0), int(draws.get(name, 0)))
        self._committed_rng = self._rng_state()
        what = "diverged run" if diverged else "run that stopped after its last checkpoint"
        self.log(
            f"resuming a {what} from step {self.step}: {max(extra, 0)} released step(s) of "
            "the earlier attempt are added to epsilon; its random draws are not reused"
        )
        rd.root.mkdir(parents=True, exist_ok=True)
        self.save_checkpoint()  # the counted steps are durable before anything else happens
        self._record_released()
        if diverged:
            rd.divergence.rename(
                rd.root / f"divergence-at-step-{record.get('diverged_at_step', 'unknown')}.json"
            )

    def _released_record(self) -> dict:
        """What this run has released so far: every committed step (its update reaches
        W&B, the logs and the diagnostics as soon as it commits) and the draws it took."""
        return {
            "steps_released": self.step,
            "abandoned_steps": self.abandoned_steps,
            "stream_draws": {"sampler": self.rng.sampler.draws, "noise": self.rng.noise.draws},
        }

    def _record_released(self) -> None:
        """Written in every step's commit block, before anything of the step leaves the
        process: a kill at any later moment leaves a record a resume counts. Atomic
        (rename), not fsynced: it must survive the process, not the machine."""
        write_json_atomic(self.run_dir.released, self._released_record(), fsync=False)

    def _canaries(self, kind: str, *, data=None) -> Canaries:
        """The run's canary set: a resumed run keeps the one its checkpoint holds (the coins
        its observations were made with), whatever its streams' keys are now."""
        saved = (self._resume_state or {}).get("audit") or {}
        if saved.get("set") is not None:
            return Canaries.restore(saved["set"], data=data)
        return Canaries.create(kind, self.cfg.audit_canaries, self.rng.canary, data=data)

    def resolved_config(self) -> dict:
        return {
            "config": self.cfg.as_dict(),
            "resolved": {
                "model_axes": self.model.axes.as_dict(),
                "num_params": self.num_params,
                "data": self.data_summary,
                "train_size": self.n,
                "public_size": self.cfg.public_size,
                "public_source": self.public_source,
                "private_examples": self.n,
                "private": self.private,
                "sigma": self.sigma,
                "sample_rate": self.q,
                "expected_batch_size": self.cfg.batch_size,
                "steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "noise": self.rng.label if self.private else None,
                "randomness": self.rng.describe(),
                "engine": self.engine.name,
                "device": str(self.device),
                "world_size": self.world.size,
                "precision_policy": precision_policy() if self.private else None,
                "torch": torch.__version__,
                "version": __version__,
            },
        }

    # ------------------------------------------------------------------ one step

    def _chunks(self, idx: torch.Tensor, idx_cpu: torch.Tensor):
        """The step's physical chunks: normalised, with K views each. Each example's views
        come from the secret augmentation stream keyed by (step, example index)."""
        cfg = self.cfg
        for chunk, chunk_cpu in zip(
            idx.split(cfg.physical_batch), idx_cpu.split(cfg.physical_batch)
        ):
            x = normalize(self.train_x[chunk], self.mean, self.std)
            views = None
            if cfg.aug != "none":
                views = self.rng.aug.views(self.step + 1, chunk_cpu, cfg.aug_mult, AUG_PAD)
            yield augment(x, cfg.aug_mult, None, cfg.aug, AUG_PAD, views=views), self.train_y[chunk]

    def train_step(self) -> dict:
        """One DP step. Everything private is computed first; then, in one block that no
        signal interrupts, the ledger, optimiser, schedule, EMA, step counter, random
        streams' committed state and the step's log rows advance together."""
        cfg, dev = self.cfg, self.device
        t0 = time.perf_counter()
        idx = self.sampler.next()  # on the CPU
        if self.shard is not None:
            idx = self.shard[idx]
        canaries_in = None
        if self.canaries is not None:
            idx, canaries_in = self.canaries.split(idx, self.n)
        idx_cpu, idx = idx, idx.to(dev)
        self.model.train()
        if self.public_x is not None:
            refresh_public_stats(self.model, self.public_x)
        grads = [torch.zeros_like(p) for p in self.engine.params]
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev)
        norms = []
        diag = self.diag
        diag.begin_step(self.step + 1)
        for i, (x, y) in enumerate(self._chunks(idx, idx_cpu)):
            with diag.chunk_context(i), self._autocast():
                r = self.engine(x, y)
            diag.after_chunk(i, x, r)
            torch._foreach_add_(grads, r.grads)
            loss_sum += r.loss_sum
            correct += r.correct
            if r.norms is not None:
                norms.append(r.norms)
        # one host synchronisation per step, whatever the number of chunks and layers: is
        # anything non-finite (loss or a per-example norm)? Nothing is released if so, and
        # every rank stops at the same step.
        bad = ~torch.isfinite(loss_sum)
        if norms:
            bad = bad | ~torch.isfinite(torch.cat(norms)).all()
        if self.world.any(bool(bad), dev):
            raise Diverged(
                f"non-finite training loss or per-example gradient at step {self.step + 1}"
            )
        b_local = len(idx)
        if self.world.distributed:
            counts = torch.stack([loss_sum, correct, torch.tensor(float(b_local), device=dev)])
            self.world.all_reduce_([counts])
            loss_sum, correct, b_total = counts[0], counts[1], int(counts[2].item())
        else:
            b_total = b_local
        diag.before_noise(grads)
        released = grads
        if canaries_in is not None:  # gradient canaries: their own coordinates, same mechanism
            audit_vec = self.canaries.audit_vector(dev, grads[0].dtype)
            self.canaries.add_gradients(audit_vec, canaries_in, cfg.clip)
            released = [*grads, audit_vec]  # one noise draw covers it like every parameter
        noisy_mean(  # with N ranks each adds a share of variance sigma^2 C^2 / N
            released,
            sigma=self.sigma / math.sqrt(self.world.size),
            clip=cfg.clip if self.private else None,
            expected_batch_size=cfg.batch_size,
            noise=self.noise,
        )
        self.world.all_reduce_(released)  # the one collective: noisy shares, summed
        observed = None
        if canaries_in is not None:  # the white-box view: the noisy sum on the audit vector
            observed = self.canaries.observe(released[-1]) * cfg.batch_size
        diag_rows = diag.end_step(self.step + 1)
        b = b_total
        row = {
            "step": self.step + 1,
            "epoch": (self.step + 1) * self.q,  # expected passes over the data
            "batch": b,
            "loss": float(loss_sum) / max(b, 1),
            "train_acc": float(correct) / max(b, 1),
        }
        if norms:
            n = torch.cat(norms)
            row["grad_norm_median"] = float(n.median())
            # scaled down: above C (1 - m), the clip rule's threshold (engine.base)
            row["clip_fraction"] = float((n > cfg.clip * (1 - clip_margin(n.dtype))).float().mean())
        with deferred_signals():  # the step becomes real: all of it, or none of it
            for p, g in zip(self.engine.params, grads):
                p.grad = g
            if self.private:
                self.ledger.step(self.sigma, self.q)
            self.optimizer.step()
            self.schedule.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            if self.canaries is not None:
                self.canaries.record(observed)
            self._committed_rng = self._rng_state()
            self._record_released()  # before any of the step leaves the process
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            self.images_seen += b
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["step_seconds"] = dt
            row["images_per_second"] = b / dt if dt > 0 else None
            self.metrics.append(row)
            self.diag_log.extend(diag_rows)
        self.last_diag = diag_rows
        return row

    def _autocast(self):
        """bf16 autocast for the forward and backward passes (--precision bf16); the engine
        takes norms, clip factors and sums in the parameters' fp32."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        )

    def _rng_state(self) -> dict:
        """The random streams' state at the start of the next step (what a checkpoint holds)."""
        state = {"rng": self.rng.state_dict()}
        if self.sampler.kind != "poisson":  # the Poisson sampler's state is its stream's
            state["sampler"] = self.sampler.state_dict()
        return state

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> tuple[float, float, torch.Tensor]:
        """Test accuracy, mean loss, and the predicted class of every test example."""
        model.eval()
        if self.public_x is not None:
            refresh_public_stats(model, self.public_x)
        correct, loss, preds = 0.0, 0.0, []
        for i in range(0, len(self.test_y), 500):
            x = normalize(self.test_x[i : i + 500], self.mean, self.std)
            y = self.test_y[i : i + 500]
            out = model(x)
            loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            pred = out.argmax(1)
            correct += float((pred == y).sum())
            preds.append(pred)
        n = len(self.test_y)
        return correct / n, loss / n, torch.cat(preds)

    def epsilon(self) -> float | None:
        return self.ledger.epsilon(self.cfg.delta) if self.private else None

    def eval_row(self) -> dict:
        acc, loss, self.test_predictions = self.evaluate(self.model)
        self.test_predictions_ema = None
        row = {
            "step": self.step,
            "epoch": self.step * self.q,
            "epsilon": self.epsilon(),
            "test_acc": acc,
            "test_loss": loss,
            "train_seconds": self.train_seconds,
        }
        if self.ema is not None:
            row["test_acc_ema"], row["test_loss_ema"], self.test_predictions_ema = self.evaluate(
                self.ema.model
            )
        self.last_eval = row
        return row

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "config": self.cfg.as_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "ledger": self.ledger.state_dict() if self.ledger else None,
            **self._committed_rng,  # never a key: draw counters and public generator states
            "train_seconds": self.train_seconds,
            "images_seen": self.images_seen,
            "abandoned_steps": self.abandoned_steps,
            "audit": self.canaries.state_dict() if self.canaries is not None else None,
            "last_eval": self.last_eval,
            "version": __version__,
        }
        if self.world.distributed:  # one file, written by rank 0, holds every rank's streams
            state["rng_ranks"] = self.world.gather_object(self._committed_rng)
            if self.world.rank > 0:
                return
        save_atomic(state, self.run_dir.checkpoint)

    def _read_checkpoint(self) -> dict | None:
        path = self.main_dir.checkpoint
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:
            raise ConfigError(f"cannot read checkpoint {path}: {e}") from None

    def _load_checkpoint(self, state: dict) -> None:
        path = self.main_dir.checkpoint
        ranks = state.get("rng_ranks")
        if (len(ranks) if ranks else 1) != self.world.size:
            raise ConfigError(
                f"--resume: {path} was written by {len(ranks) if ranks else 1} rank(s); "
                f"resume with the same --nproc ({len(ranks) if ranks else 1})"
            )
        if ranks:
            state.update(ranks[self.world.rank])  # this rank's own streams
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.ledger is not None:
            self.ledger.load_state_dict(state["ledger"])
        self.rng.load_state_dict(state["rng"])
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        self._committed_rng = self._rng_state()
        self.step = state["step"]
        self.train_seconds = state["train_seconds"]
        self.images_seen = state["images_seen"]
        self.abandoned_steps = state.get("abandoned_steps", 0)
        if self.canaries is not None and state.get("audit") is not None:
            self.canaries.load_state_dict(state["audit"], self.step)
        self.last_eval = state.get("last_eval") or {}
        self.resumed_from = self.step

    # ------------------------------------------------------------------ the run

    def result(self, status: str, error: str | None = None) -> dict:
        ev = self.last_eval
        return {
            "status": status,
            "test_acc": ev.get("test_acc"),
            "test_acc_ema": ev.get("test_acc_ema"),
            "test_loss": ev.get("test_loss"),
            "evaluated_at_step": ev.get("step"),
            "private": self.private,
            "epsilon": self.epsilon(),
            "delta": self.cfg.delta if self.private else None,
            "sigma": self.sigma,
            "clip": self.cfg.clip if self.private else None,
            "steps": self.step,
            "planned_steps": self.total_steps,
            "sample_rate": self.q,
            "expected_batch_size": self.cfg.batch_size,
            "accountant": self.cfg.accountant if self.private else None,
            "sampler": self.cfg.sampler,
            "noise": self.rng.label if self.private else None,
            "epsilon_assumes": self.rng.assumption if self.private else None,
            "abandoned_steps": self.abandoned_steps,
            "private_examples": self.n,
            "public_examples": self.cfg.public_size,
            "public_source": self.public_source,
            "not_covered_by_epsilon": sorted(NOT_COVERED["result.json"]),
            **(summary_fields(self.audit_result) if self.audit_result else {}),
            "train_seconds": self.train_seconds,
            "images_per_second": self.images_seen / self.train_seconds
            if self.train_seconds
            else None,
            "seed": self.cfg.seed,
            "model": self.cfg.model,
            "data": self.cfg.data,
            "num_params": self.num_params,
            "version": __version__,
            "error": error,
        }

    def run(self, stop_after: int | None = None) -> dict:
        """Train to the planned step count; write result.json; return the result."""
        if self.resumed_from is not None:
            self.log(f"resuming {self.run_dir.root} from step {self.step}/{self.total_steps}")
        else:
            self.log(
                f"{self.cfg.epochs:g} epochs = {self.total_steps} steps at sampling rate "
                f"q = {self.q:.4g} ({self.total_steps * self.q:.2f} expected passes over "
                f"{self.n} examples)"
            )
        bar = None
        heartbeat = self.progress and not sys.stderr.isatty()  # no bar: a line every 30 s
        last_beat = time.monotonic()
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                disable=not sys.stderr.isatty(),
                desc="train",
            )
        self._start_wandb()
        try:
            with self.diag, interrupt_on_sigterm():
                self._loop(bar, heartbeat, last_beat, stop_after)
        except Diverged as e:
            # What this attempt released (the committed steps' updates, in W&B / metrics) is
            # recorded, so that a resume can count it and never replay its randomness.
            write_json_atomic(
                self.run_dir.divergence,
                {
                    "diverged_at_step": self.step + 1,
                    "steps_released": self.step,
                    "stream_draws": {
                        "sampler": self.rng.sampler.draws,
                        "noise": self.rng.noise.draws,
                    },
                    "error": str(e),
                },
            )
            result = self.result("diverged", str(e))
            write_json_atomic(self.run_dir.result, result)
            self._finish_outputs(result, exit_code=1)
            return result
        except (KeyboardInterrupt, Interrupted):
            self.save_checkpoint()
            self._finish_outputs(None, exit_code=1)
            raise
        except Exception as e:
            self.run_dir.error_log.write_text(traceback.format_exc())
            result = self.result("failed", f"{type(e).__name__}: {e}")
            write_json_atomic(self.run_dir.result, result)
            self._finish_outputs(result, exit_code=1)
            raise
        finally:
            if bar is not None:
                bar.close()
            for lg in (self.metrics, self.epochs_log, self.diag_log):
                lg.close()
        self._save_final_model()
        self._save_test_predictions()
        self._write_privacy_statement()
        if self.canaries is not None:
            self._audit()
        result = self.result("done")
        self._finish_outputs(result, exit_code=0)
        write_json_atomic(self.run_dir.result, result)  # last: its presence means "ended"
        self.run_dir.checkpoint.unlink(missing_ok=True)
        return result

    def _loop(self, bar, heartbeat: bool, last_beat: float, stop_after: int | None) -> None:
        cfg = self.cfg
        while self.step < self.total_steps:
            row = self.train_step()
            if self.wandb is not None:
                self.wandb.log({f"train/{k}": v for k, v in row.items()}, self.step)
                if self.last_diag:
                    self.wandb.log_diagnostics(self.last_diag, self.step)
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if end_of_epoch:
                ev = self.eval_row()
                self.epochs_log.append(ev)
                if self.wandb is not None:
                    self.wandb.log({f"eval/{k}": v for k, v in ev.items()}, self.step)
                eps = ev["epsilon"]
                self.log(
                    f"epoch {ev['epoch']:.2f}  step {self.step}/{self.total_steps}  "
                    f"test_acc {ev['test_acc']:.4f}"
                    + (f"  ema {ev['test_acc_ema']:.4f}" if "test_acc_ema" in ev else "")
                    + (f"  eps {eps:.3f}" if eps is not None else "  non-private")
                    + f"  {self.images_seen / self.train_seconds:.1f} img/s"
                )
            if end_of_epoch or self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if heartbeat and time.monotonic() - last_beat > 30:
                last_beat = time.monotonic()
                self.log(
                    f"step {self.step}/{self.total_steps}  loss {row['loss']:.3f}  "
                    f"{self.images_seen / self.train_seconds:.1f} img/s"
                )
            if bar is not None:
                eps = self.last_eval.get("epsilon")
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}",
                    eps="-" if eps is None else f"{eps:.2f}",
                    img_s=f"{row['images_per_second'] or 0:.0f}",
                )
                bar.update(1)
            if stop_after is not None and self.step >= stop_after and self.step < self.total_steps:
                self.save_checkpoint()
                raise Interrupted(f"stopped after step {self.step}")

    # ------------------------------------------------------------------ outputs

    def _start_wandb(self) -> None:
        if self.wandb_settings is None:
            return
        from dataclasses import replace

        from scalemix.tracking import WandbRun

        settings = self.wandb_settings
        notes = [settings.notes or ""]
        if self.private:
            notes += [self.rng.assumption + ".", PRIVATE_CAVEAT]
        if self.cfg.diag_every and (self.cfg.diag_source == "train" or self.diag.grad_side):
            notes.append(CAVEAT)
        settings = replace(settings, notes=" ".join(n for n in notes if n).strip())
        self.wandb = WandbRun(settings, self.run_dir.root, self.resolved_config())

    def _finish_outputs(self, result: dict | None, exit_code: int) -> None:
        """The diagnostics figure and the W&B summary; never raises over the real outcome."""
        try:
            self.diag_log.close()
            df = read_diagnostics(self.run_dir.root)
            plot_scale_ratio(
                df,
                self.run_dir.root / FIGURE,
                title=f"{self.cfg.model} {self.model.axes.short()}",
            )
        except Exception as e:  # pragma: no cover - a figure must not lose a run
            self.log(f"warning: diagnostics figure not written: {e}")
        if self.wandb is not None:
            try:
                if result is not None:
                    self.wandb.summary({f"result/{k}": v for k, v in result.items()})
                cmd = self.wandb.finish(exit_code)
                if cmd:
                    self.log(f"W&B run written offline; upload it with: {cmd}")
            except Exception as e:  # pragma: no cover
                self.log(f"warning: W&B run not finished cleanly: {e}")
            self.wandb = None

    def _audit(self) -> None:
        """Save the canaries, compute the one-run lower bounds, and raise the alarm if one
        exceeds the accountant's epsilon (scalemix.audit)."""
        cfg = self.cfg
        self.canaries.save(
            self.run_dir.root,
            q=self.q,
            sigma=self.sigma,
            clip=cfg.clip,
            delta=cfg.delta if self.private else 1e-5,
            epsilon=self.epsilon() if self.private else np.nan,
            mean=np.array(self.mean),
            std=np.array(self.std),
            num_classes=self.num_classes,
        )
        model_scores = None
        if self.canaries.kind == "input":
            model_scores = input_canary_scores(
                self.model,
                normalize(self.canaries.x.to(self.device), self.mean, self.std),
                self.canaries.y.to(self.device),
            )
        self.audit_result = run_audit(
            load_canaries(self.run_dir.root),
            q=self.q,
            sigma=self.sigma,
            clip=cfg.clip,
            epsilon=self.epsilon(),
            delta=cfg.delta if self.private else 1e-5,
            model_scores=model_scores,
        )
        write_audit(self.run_dir.root, self.audit_result)
        a = self.audit_result
        self.log(
            f"audit ({a['canaries']} {a['kind']} canaries, {a['primary_adversary']}): "
            f"epsilon >= {a['epsilon_lower_bound']:.3f} (Steinke et al.), "
            f">= {a['epsilon_lower_bound_fdp']:.3f} (f-DP, GDP curve) at {a['confidence']:.0%}; "
            f"ceiling {a['ceiling']['steinke']:.2f}; accountant "
            + ("-" if a["accountant_epsilon"] is None else f"{a['accountant_epsilon']:.3f}")
        )
        if a["alarm"]:
            self.log(a["alarm_message"])

    def _save_test_predictions(self) -> None:
        """The final model's class for every test example (test_predictions.npy, and
        test_predictions_ema.npy for the EMA weights, with the test labels beside them in
        test_labels.npy): runs on the same test set can then be compared example by example
        (McNemar, paired bootstrap over test examples). Taken from the last step's
        evaluation; evaluated again only when this process did not evaluate the final model
        (a resume at the end)."""
        fresh = self.last_eval.get("step") == self.step
        preds = self.test_predictions if fresh else None
        if preds is None:
            preds = self.evaluate(self.model)[2]
        root = Path(self.run_dir.root)
        np.save(root / "test_predictions.npy", preds.to(torch.int16).cpu().numpy())
        if self.ema is not None:
            ema = self.test_predictions_ema if fresh else None
            if ema is None:
                ema = self.evaluate(self.ema.model)[2]
            np.save(root / "test_predictions_ema.npy", ema.to(torch.int16).cpu().numpy())
        np.save(root / "test_labels.npy", self.test_y.to(torch.int16).cpu().numpy())

    def _save_final_model(self) -> None:
        state = {"model": self.model.state_dict(), "config": self.cfg.as_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.model.state_dict()
        save_atomic(state, Path(self.run_dir.root) / "model.pt")


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    resume_diverged: bool = False,
    progress: bool = True,
    log=print,
    wandb: WandbSettings | None = None,
    noise_nonce: str | None = None,
) -> dict:
    """Train one configuration into ``cfg.out``; return the result dictionary."""
    rd = RunDir(cfg.out)
    if resume and (res := rd.read_result()) is not None and res.get("status") == "done":
        log(f"{rd.root} is already finished; nothing to do")
        return res
    return Trainer(
        cfg,
        resume=resume,
        resume_diverged=resume_diverged,
        progress=progress,
        log=log,
        wandb=wandb,
        noise_nonce=noise_nonce,
    ).run()
