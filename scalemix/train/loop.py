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
import time
import traceback
from typing import TYPE_CHECKING

import torch

from scalemix import __version__
from scalemix.audit import Canaries, summary_fields
from scalemix.data import ImageData, augment, load_data, normalize
from scalemix.diagnostics.recorder import TrainingDiagnostics
from scalemix.engine import NonPrivateEngine, make_engine
from scalemix.engine.base import clip_margin, precision_policy
from scalemix.errors import ConfigError, Diverged
from scalemix.models import create_model, refresh_public_stats
from scalemix.privacy import NoiseSource, PoissonSampler, RunRandomness, ShuffleSampler
from scalemix.privacy.disclosure import NOT_COVERED
from scalemix.privacy.mechanism import noisy_mean
from scalemix.privacy.randomness import SecretStream, tail_delta
from scalemix.runtime import keep_cpu_memory
from scalemix.train import checkpoint, outputs
from scalemix.train import resume as resume_records
from scalemix.train.callbacks import Callback, Interrupted, Progress, StopAfter, Wandb
from scalemix.train.config import TrainConfig
from scalemix.train.distributed import World
from scalemix.train.ema import EMA
from scalemix.train.optim import make_optimizer, make_schedule
from scalemix.train.rundir import RunDir, write_json_atomic
from scalemix.train.setup import plan_privacy, prepare_data, resolve_device
from scalemix.train.signals import deferred_signals, interrupt_on_sigterm

if TYPE_CHECKING:
    from scalemix.tracking import WandbSettings

__all__ = ["Interrupted", "Trainer", "resolve_device", "train"]

AUG_PAD = 4  # reflect-pad crops shift by up to 4 px (De et al. 2022)


# The fast engine's floating-point guard joins the step's one host read (Engine.defer_guard);
# off, it reads the host once per physical chunk (the reference the tests compare with).
DEFER_GUARD = True


class Trainer:
    """One training run. ``__init__`` sets it up (no file is written), ``train_step`` takes
    one DP step, ``run`` takes them all and writes the run directory (train/rundir.py)."""

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
        SecretStream.on_device(self.device)  # a bad $SCALEMIX_CHACHA stops here, not mid-run
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
                cfg = cfg.replace(out=str(self.main_dir.rank(self.world.rank)))
                progress, log, wandb = False, (lambda *_: None), None
        self.cfg = cfg
        self.resume, self.resume_diverged = resume, resume_diverged
        self.log = log
        self.callbacks: list[Callback] = [Progress(log, progress)]
        if wandb is not None:
            self.callbacks.append(Wandb(wandb, log))
        self.run_dir = RunDir(cfg.out)
        if self.device.type == "cpu":
            keep_cpu_memory()
        resume_records.check_out_dir(self.run_dir, cfg, resume, resume_diverged)
        self.private = not cfg.non_private

        # ---- randomness: a resumed run goes on with its own noise key (its checkpoint's)
        self._resume_state = (
            checkpoint.read(self.main_dir.checkpoint, self.device) if resume else None
        )
        if self._resume_state is not None:
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

        # ---- data (uint8 on the device; normalised per chunk), public split, canaries
        data = data or load_data(cfg.data, cfg.data_dir, download=cfg.download, size=cfg.image_size)
        self.data_summary = data.summary()
        self.num_classes = data.num_classes
        self.mean, self.std = data.mean, data.std
        d = prepare_data(cfg, data, self.device, lambda t: self._canaries("input", data=t))
        self.train_x, self.train_y, self.test_x, self.test_y = (
            d.train_x,
            d.train_y,
            d.test_x,
            d.test_y,
        )
        self.n = d.n  # private examples (canaries, if any, come after them)
        self.public_x, self.public_source, self.canaries = d.public_x, d.public_source, d.canaries
        self.audit_result: dict | None = None

        # ---- sampling and privacy
        plan, self.ledger = plan_privacy(cfg, self.n, self.private)
        self.q, self.sigma = plan.q, plan.sigma
        self.steps_per_epoch, self.total_steps = plan.steps_per_epoch, plan.total_steps
        self.shard = self.world.shard(self.n) if self.world.distributed else None
        if self.shard is not None:  # this rank's examples, Poisson with the run's q
            self.sampler = PoissonSampler(len(self.shard), self.q, self.rng.sampler)
        elif cfg.sampler == "poisson":  # every canary gets a uniform too (see scalemix.audit)
            self.sampler = PoissonSampler(self.n + cfg.audit_canaries, self.q, self.rng.sampler)
        else:
            self.sampler = ShuffleSampler(self.n, cfg.batch_size, cfg.seed)
        self.noise = NoiseSource(self.rng.noise)

        # ---- model, engine, optimiser, schedule, EMA, diagnostics
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

        # ---- counters, then the checkpoint's state over them
        self.step = 0
        self.train_seconds = 0.0
        self.guard_redone = 0  # steps the deferred guard flagged and computed again (not written:
        # a function of private data without noise, like the step times)
        self.images_seen = 0
        self.abandoned_steps = 0  # steps released by earlier attempts beyond their checkpoint
        self.last_eval: dict = {}
        self.last_diag: list[dict] = []
        self.test_predictions: torch.Tensor | None = None  # of self.model, at the last evaluation
        self.test_predictions_ema: torch.Tensor | None = None  # of the EMA weights, likewise
        self.committed_rng = self.rng_state()
        self.resumed_from = None
        if self._resume_state is not None:
            checkpoint.load(self, self._resume_state, self.main_dir.checkpoint)
            self._resume_state = None
        self.world.agree(self.step, "the step to resume from", self.device)
        # an earlier attempt in this directory (resumed, or restarted before its first
        # checkpoint) may have released steps that no checkpoint holds: counted now
        self._counted = resume_records.count_released_beyond_checkpoint(self)
        self.opened = False  # the run directory is written by open(), on the first step

    def open(self) -> None:
        """Open the run directory: count what an earlier attempt released beyond its
        checkpoint (a resume), then write config.json, privacy.json and the logs' heads."""
        if self.opened:
            return
        self.opened = True
        resume_records.persist_counted(self, self._counted)
        if self.resume:
            self.run_dir.result.unlink(missing_ok=True)  # a stale failed/diverged result
        self.metrics, self.epochs_log, self.diag_log = outputs.open_logs(self)

    # ------------------------------------------------------------------ setup helpers

    def noise_tail_delta(self) -> float | None:
        """The delta the noise's cut tails add over the planned (and abandoned) steps."""
        if not self.private:
            return None
        steps = max(self.total_steps, self.step) + self.abandoned_steps
        d = self.num_params + self.cfg.audit_canaries
        eps = self.epsilon() or 0.0
        if self.cfg.sigma is None and self.cfg.epsilon is not None:  # the calibrated target
            eps = max(eps, self.cfg.epsilon)
        return tail_delta(eps, steps, d)

    def canary_note(self) -> str | None:
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

    def _canaries(self, kind: str, *, data=None) -> Canaries:
        """The run's canary set: a resumed run keeps the one its checkpoint holds (the coins
        its observations were made with), whatever its streams' keys are now."""
        saved = (self._resume_state or {}).get("audit") or {}
        if saved.get("set") is not None:
            return Canaries.restore(saved["set"], data=data)
        return Canaries.create(kind, self.cfg.audit_canaries, self.rng.canary, data=data)

    def resolved_config(self) -> dict:
        """config.json: ``run``, the values this run used, where a reader looks first;
        ``config``, the fields as given (null: the model's or the data set's default;
        compared on --resume, read by --config); ``resolved``, everything derived."""
        cfg = self.cfg
        run = {
            "model": cfg.model,
            **self.model.axes.as_dict(),
            "data": self.data_summary.get("name", cfg.data),
            "image_size": int(self.train_x.shape[-1]),
            "private_examples": self.n,
            "test_examples": len(self.test_y),
            "epsilon": (cfg.epsilon if cfg.sigma is None else None) if self.private else None,
            "delta": cfg.delta if self.private else None,
            "sigma": self.sigma,
            "clip": cfg.clip if self.private else None,
            "batch_size": cfg.batch_size,
            "aug": cfg.aug,
            "aug_mult": cfg.aug_mult,
            "epochs": cfg.epochs,
            "steps": self.total_steps,
            "sample_rate": self.q,
            "noise": cfg.noise if self.private else "non-private",
            "seed": cfg.seed,
        }
        return {
            "run": run,
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
                "keystream": SecretStream.source(self.device),
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
            if cfg.aug != "none":  # made on the device where its ChaCha20 kernel runs
                src = chunk if SecretStream.on_device(chunk.device) else chunk_cpu
                views = self.rng.aug.views(self.step + 1, src, cfg.aug_mult, AUG_PAD)
            yield augment(x, cfg.aug_mult, None, cfg.aug, AUG_PAD, views=views), self.train_y[chunk]

    def _clipped_sums(self, idx: torch.Tensor, idx_cpu: torch.Tensor):
        """The step's clipped gradient sums over its chunks, with the summed loss and
        correct count and every example's norm (None for a non-private engine): all on
        the device, nothing read back."""
        diag = self.diag
        diag.begin_step(self.step + 1)
        self.engine.begin_step()
        grads = [torch.zeros_like(p) for p in self.engine.params]
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        norms = []
        for i, (x, y) in enumerate(self._chunks(idx, idx_cpu)):
            with diag.chunk_context(i), self._autocast():
                r = self.engine(x, y)
            diag.after_chunk(i, x, r)
            torch._foreach_add_(grads, r.grads)
            loss_sum += r.loss_sum
            correct += r.correct
            if r.norms is not None:
                norms.append(r.norms)
        return grads, loss_sum, correct, torch.cat(norms) if norms else None

    def train_step(self) -> dict:
        """One DP step. Everything private is computed first; then, in one block that no
        signal interrupts, the ledger, optimiser, schedule, EMA, step counter, random
        streams' committed state and the step's log rows advance together."""
        self.open()
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
        diag = self.diag
        # The fast engine's guard is read with the step's one host read (Engine.defer_guard);
        # a step it flags is computed again, the guard then synchronous, before anything
        # of it is released (nothing random is drawn before the vote).
        for attempt in range(2):
            self.engine.defer_guard = DEFER_GUARD and attempt == 0
            grads, loss_sum, correct, norm_all = self._clipped_sums(idx, idx_cpu)
            guard = self.engine.guard_flag()
            # One host synchronisation per step, whatever the number of chunks and layers:
            # the finiteness vote (a non-finite loss or per-example norm releases nothing,
            # and every rank stops at the same step), the guard's flag and the step's
            # statistics come back together.
            bad = ~torch.isfinite(loss_sum)
            if norm_all is not None:
                bad = bad | ~torch.isfinite(norm_all).all()
            summed = [bad, loss_sum, correct]  # summed over the ranks (one collective)
            if self.world.distributed:
                summed.append(torch.full((), float(len(idx)), device=dev))
            if self.engine.defer_guard:  # every rank redoes the step if one was flagged
                summed.append(guard if guard is not None else torch.zeros((), device=dev))
            summed = torch.stack([t.float() for t in summed])
            self.world.all_reduce_([summed])
            local = []  # this rank's: the median norm, and the share above C (1 - m), the
            if norm_all is not None:  # clip rule's threshold (engine/base.py)
                above = norm_all > cfg.clip * (1 - clip_margin(norm_all.dtype))
                local = [norm_all.median().float(), above.float().mean()]
            vals = torch.cat([summed, torch.stack(local)]).tolist() if local else summed.tolist()
            if not (self.engine.defer_guard and vals[len(summed) - 1] > 0):
                break
            self.guard_redone += 1
            grads.clear()  # the first attempt's sums are not kept during the redo
        self.engine.defer_guard = False
        if vals[0] > 0:
            raise Diverged(
                f"non-finite training loss or per-example gradient at step {self.step + 1}"
            )
        b = int(vals[3]) if self.world.distributed else len(idx)
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
        self.world.all_reduce_(released)  # the noisy shares, summed
        observed = None
        if canaries_in is not None:  # the white-box view: the noisy sum on the audit vector
            observed = self.canaries.observe(released[-1]) * cfg.batch_size
        diag_rows = diag.end_step(self.step + 1)
        row = {
            "step": self.step + 1,
            "epoch": (self.step + 1) * self.q,  # expected passes over the data
            "batch": b,
            "loss": vals[1] / max(b, 1),
            "train_acc": vals[2] / max(b, 1),
        }
        if local:
            row["grad_norm_median"], row["clip_fraction"] = vals[-2], vals[-1]
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
            self.committed_rng = self.rng_state()
            resume_records.record_released(self)  # before any of the step leaves the process
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

    def rng_state(self) -> dict:
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
        checkpoint.save(self)  # what it holds: train/checkpoint.py

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
            "world_size": self.world.size,
            "version": __version__,
            "error": error,
        }

    def run(self, stop_after: int | None = None) -> dict:
        """Train to the planned step count; write result.json; return the result.
        ``stop_after`` (tests) stops after that step as a crash would."""
        self.open()
        callbacks = [*self.callbacks, *([StopAfter(stop_after)] if stop_after else [])]
        for cb in callbacks:
            cb.on_start(self)
        try:
            with self.diag, interrupt_on_sigterm():
                while self.step < self.total_steps:
                    row = self.train_step()
                    for cb in callbacks:
                        cb.on_step(self, row)
                    end_of_epoch = (
                        self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                    )
                    if end_of_epoch:
                        ev = self.eval_row()
                        self.epochs_log.append(ev)
                        for cb in callbacks:
                            cb.on_eval(self, ev)
                    if end_of_epoch or self.step % self.cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    for cb in callbacks:
                        cb.after_checkpoint(self)
        except Diverged as e:
            # What this attempt released (the committed steps' updates, in W&B / metrics) is
            # recorded, so that a resume can count it and never replay its randomness.
            write_json_atomic(
                self.run_dir.divergence,
                {
                    "diverged_at_step": self.step + 1,
                    **resume_records.released_record(self),
                    "error": str(e),
                },
            )
            return self._end(callbacks, self.result("diverged", str(e)), exit_code=1)
        except (KeyboardInterrupt, Interrupted):
            self.save_checkpoint()
            self._end(callbacks, None, exit_code=1)
            raise
        except Exception as e:
            self.run_dir.error_log.write_text(traceback.format_exc())
            self._end(callbacks, self.result("failed", f"{type(e).__name__}: {e}"), exit_code=1)
            raise
        finally:
            for lg in (self.metrics, self.epochs_log, self.diag_log):
                lg.close()
        if self.world.rank > 0:  # ranks > 0 write only their logs
            return self._end(callbacks, self.result("done"), exit_code=0, write=False)
        # The end of a run, in this order; result.json last (its presence means "ended").
        outputs.save_final_model(self)
        outputs.save_test_predictions(self)
        outputs.write_privacy_statement(self)
        if self.canaries is not None:
            self.audit_result = outputs.audit(self)
        result = self._end(callbacks, self.result("done"), exit_code=0)
        self.run_dir.checkpoint.unlink(missing_ok=True)
        return result

    def _end(self, callbacks, result: dict | None, exit_code: int, write: bool = True):
        """The figure and the callbacks' ends (never raising over the outcome), then
        result.json."""
        if self.world.rank == 0:
            outputs.diagnostics_figure(self)
        for cb in callbacks:
            cb.on_end(self, result, exit_code)
        if result is not None and write and self.world.rank == 0:
            write_json_atomic(self.run_dir.result, result)
        return result


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
