"""The training configuration: one frozen, keyword-only dataclass with documented fields.

``batch_size`` is the *expected* logical batch size that Poisson sampling and the
accountant assume (q = batch_size / train set size); ``physical_batch`` only bounds
memory. ``resolve()`` checks every field and refuses unsafe privacy settings with the
reason (BatchNorm under DP, a sampler the accountant does not describe, ...).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from scalemix.choices import (
    ACCOUNTANTS,
    AUGMENTATIONS,
    BATCH_COUPLED_NORMS,
    CANARY_KINDS,
    DATASETS,
    DEVICES,
    DIAG_SOURCES,
    DP_ENGINES,
    NOISE_MODES,
    OPTIMIZERS,
    PRECISIONS,
    SAMPLERS,
    SCHEDULES,
)
from scalemix.errors import ConfigError, PrivacyError


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # --- model (None = the architecture's default; see `scalemix models`)
    model: str = "resnet9"
    norm: str | None = None  # group | layer | instance | none | public_batch | batch
    groups: int | None = None  # GroupNorm groups, 1..64, must divide the channels
    scalenorm: bool | None = None  # extra norm right after each residual addition
    placement: str | None = None  # standard (conv->norm->act) | preact (norm->act->conv)
    ws: str | None = None  # weight standardisation: none | plain | scaled
    act: str | None = None  # relu | mish | silu
    # --- data
    data: str = "digits"  # digits (embedded, offline) | cifar10 | imagenette
    data_dir: str | None = None  # folder with cifar-10-batches-py/ or ImageNette's train/ val/
    download: bool = False  # fetch CIFAR-10 / ImageNette into data_dir when missing
    image_size: int | None = None  # ImageNette resize (default 160) / digits upsampling (16)
    public_size: int = 0  # examples of public data for public_batch norm (NOT protected by DP)
    public_source: str = "split"  # split (held out of the training split) | FILE (.npy/.pt uint8)
    aug: str = "none"  # none | crop-flip (reflect-pad 4 + random crop, horizontal flip)
    aug_mult: int = 1  # K: augmented views per example, averaged before clipping
    # --- privacy
    non_private: bool = False  # same loop, no clipping, no noise, no epsilon
    epsilon: float | None = 8.0  # target epsilon: sigma is calibrated to it
    sigma: float | None = None  # or: a given noise multiplier (epsilon is then reported)
    delta: float = 1e-5
    clip: float = 1.5  # per-example gradient norm bound C
    accountant: str = "prv"  # prv (default) | rdp
    sampler: str = "poisson"  # poisson (DP) | shuffle (non-private only)
    noise: str = "secure"  # secure (OS CSPRNG key, never written) | seeded (secret seed key; noise per run) | seeded-shared
    audit_canaries: int = 0  # M canaries for a one-run privacy audit (0: none); see scalemix.audit
    canary_kind: str = "gradient"  # gradient (white box, Dirac) | input (black box, mislabelled)
    engine: str = "scalemix"  # per-example engine: scalemix (fast, ghost norms) | vmap (reference)
    precision: str = "fp32"  # fp32 | bf16 (autocast; norms, clip factors, sums, noise in fp32)
    # --- optimisation
    epochs: float = 10.0  # passes over the data in expectation: steps = round(epochs / q)
    batch_size: int = 256  # expected logical batch size (what the accountant assumes)
    physical_batch: int = 32  # examples per forward/backward chunk (memory bound)
    lr: float = 1e-3
    optimizer: str = "nadam"  # sgd | momentum (0.9, Nesterov) | nadam
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (over the planned steps)
    ema: float | None = 0.999  # EMA decay of the parameters (None: off)
    # --- diagnostics (scalemix.diagnostics)
    diag_every: int = 10  # steps between diagnostics rows (0: off); step 1 is always logged
    diag_source: str = "train"  # train (the step's own batch: NOT covered by DP) | probe (held-out)
    diag_probe_size: int = 256  # probe: examples of the test split read at each logging step
    # --- run
    seed: int = 0  # public: model init; (seeded modes) with the secret seed key, keys batches, augmentation and noise
    device: str = "auto"  # auto | cpu | cuda
    out: str = "runs/train"
    checkpoint_every: int = 50  # steps between checkpoints (and at every epoch end)
    threads: int | None = None  # CPU threads for torch (default: torch's choice)

    def replace(self, **kw) -> TrainConfig:
        return replace(self, **kw)

    def as_dict(self) -> dict:
        return asdict(self)

    # fields that change no number a run releases: they are not part of its identity
    _NOT_IDENTITY = ("out", "threads", "checkpoint_every")

    def identity(self) -> str:
        """A name for what this run computes: a hash of every field except where it is
        written and how fast. A seeded run's noise is keyed by it, so two different runs
        never share a noise draw, while re-running a configuration into another directory
        reproduces it bit for bit (docs/sharp-edges.md, "Randomness across runs")."""
        import hashlib
        import json

        d = {k: v for k, v in self.as_dict().items() if k not in self._NOT_IDENTITY}
        if self.canary_kind == "gradient":
            # gradient canaries live on an audit vector beside the model: the model's
            # updates are those of the same run without them, so it is the same release
            d.pop("audit_canaries"), d.pop("canary_kind")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(b"scalemix/run-identity/v1/" + blob.encode()).hexdigest()[:32]

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(
                f"unknown configuration keys: {', '.join(sorted(unknown))} "
                f"(the fields are those of 'scalemix train --help', with _ for -)"
            )
        return cls(**d)

    def model_axes(self):
        from scalemix.models import resolve_axes

        return resolve_axes(
            self.model,
            norm=self.norm,
            groups=self.groups,
            scalenorm=self.scalenorm,
            placement=self.placement,
            ws=self.ws,
            act=self.act,
        )

    def check_types(self) -> TrainConfig:
        """Every field has its declared type (a string from a config file or --set that
        should be a number is named here, before anything else reads it)."""
        for f in fields(self):
            v, t = getattr(self, f.name), str(f.type)
            optional = "None" in t
            base = t.replace(" | None", "").strip()
            flag = "--" + f.name.replace("_", "-")
            if v is None:
                if optional:
                    continue
                raise ConfigError(f"{flag} needs a value ({base})")
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                "bool": isinstance(v, bool),
                "str": isinstance(v, str),
            }[base]
            if ok and base == "float" and not math.isfinite(v):
                ok = False
            if not ok:
                kind = {"int": "an integer", "float": "a finite number"}.get(base, f"a {base}")
                raise ConfigError(f"{flag} must be {kind}, got {v!r}")
        return self

    def check_model(self) -> None:
        """Build the model on torch's meta device (no memory, no compute): a group count
        that does not divide some layer, or an axis the architecture refuses, is found
        here, before any run starts."""
        import torch

        from scalemix.models import create_model

        with torch.device("meta"):
            create_model(self.model, **self.model_axes().as_dict())

    def validate(self) -> TrainConfig:
        """Check every field; raise ConfigError / PrivacyError with what to do."""
        self.check_types()

        def choice(value, allowed, flag):
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")

        choice(self.data, DATASETS, "--data")
        choice(self.aug, AUGMENTATIONS, "--aug")
        choice(self.accountant, ACCOUNTANTS, "--accountant")
        choice(self.sampler, SAMPLERS, "--sampler")
        choice(self.noise, NOISE_MODES, "--noise")
        choice(self.optimizer, OPTIMIZERS, "--optimizer")
        choice(self.lr_schedule, SCHEDULES, "--lr-schedule")
        choice(self.device, DEVICES, "--device")
        positive = {
            "--epochs": self.epochs,
            "--batch-size": self.batch_size,
            "--physical-batch": self.physical_batch,
            "--lr": self.lr,
            "--aug-mult": self.aug_mult,
            "--checkpoint-every": self.checkpoint_every,
        }
        for flag, v in positive.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{flag} must be a positive number, got {v}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("--weight-decay must be >= 0 and --momentum in [0, 1)")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"--ema must be in (0, 1) (or --no-ema), got {self.ema}")
        choice(self.diag_source, DIAG_SOURCES, "--diag-source")
        if self.diag_every < 0 or self.diag_probe_size < 1:
            raise ConfigError(
                f"--diag-every must be >= 0 (0: off) and --diag-probe-size >= 1, "
                f"got {self.diag_every} and {self.diag_probe_size}"
            )
        choice(self.canary_kind, CANARY_KINDS, "--canary-kind")
        if self.audit_canaries < 0 or (self.audit_canaries and self.sampler != "poisson"):
            raise ConfigError(
                f"--audit-canaries must be >= 0 and needs --sampler poisson, got "
                f"{self.audit_canaries} with {self.sampler}"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.image_size is not None and not 4 <= self.image_size <= 1024:
            raise ConfigError(f"--image-size must be in 4..1024, got {self.image_size}")
        if self.public_size < 0:
            raise ConfigError(f"--public-size must be >= 0, got {self.public_size}")
        if self.aug_mult > 1 and self.aug == "none":
            raise ConfigError(f"--aug-mult {self.aug_mult} needs augmentation: add --aug crop-flip")
        axes = self.model_axes()
        self.check_model()
        if axes.norm == "public_batch" and self.public_size < 1:
            raise ConfigError(
                "--norm public_batch needs --public-size N (examples held out as public data)"
            )
        if self.non_private:
            return self
        # ---- DP only from here: refuse what would break the guarantee.
        if axes.norm in BATCH_COUPLED_NORMS:
            raise PrivacyError(
                "BatchNorm normalises each example with statistics of the whole batch, so one "
                "example's output and gradient depend on the others and per-example clipping no "
                "longer bounds its influence (DP-SGD's sensitivity breaks). Use --norm group "
                "(or layer/instance), --norm public_batch --public-size N (statistics from public "
                "data only, Davody et al. 2020), or --non-private for a baseline"
            )
        if self.sampler != "poisson":
            from scalemix.privacy import check_sampler

            check_sampler(self.sampler, self.accountant)
        if self.clip is None or not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"--clip must be a positive number, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta}")
        if self.sigma is not None:
            if not (math.isfinite(self.sigma) and self.sigma > 0):
                raise ConfigError(f"--sigma must be a positive number, got {self.sigma}")
        elif self.epsilon is None or not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"--epsilon must be a positive number, got {self.epsilon}")
        choice(self.engine, DP_ENGINES, "--engine")
        choice(self.precision, PRECISIONS, "--precision")
        if self.precision == "bf16" and self.engine != "scalemix":
            raise ConfigError(
                "--precision bf16 needs --engine scalemix (it keeps the norms in fp32)"
            )
        return self
