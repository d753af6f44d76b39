"""The training configuration: one frozen, keyword-only dataclass, each field declared once.

Every field carries its default and a ``Setting``: help text, help panel, allowed values,
how its flag is spelt, and whether it names what a run computes. ``scalemix train``'s
options, ``--config FILE``, ``--set key=value``, the grid validator and
``docs/config.md`` are generated from these declarations (``scalemix.cli.options``), so
no field is described in two places that could drift apart.

``batch_size`` is the *expected* logical batch size that Poisson sampling and the
accountant assume (q = batch_size / train set size); ``physical_batch`` only bounds
memory. ``validate()`` checks every field and refuses unsafe privacy settings with the
reason (BatchNorm under DP, a sampler the accountant does not describe, ...).
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, field, fields, replace

from scalemix.choices import (
    ACCOUNTANTS,
    ACTS,
    AUGMENTATIONS,
    BATCH_COUPLED_NORMS,
    CANARY_KINDS,
    DATASETS,
    DEVICES,
    DIAG_SOURCES,
    DP_ENGINES,
    NOISE_MODES,
    NORMS,
    OPTIMIZERS,
    PLACEMENTS,
    PRECISIONS,
    SAMPLERS,
    SCHEDULES,
    WS_MODES,
)
from scalemix.errors import ConfigError, PrivacyError

# the help panels of 'scalemix train --help' and the sections of docs/config.md
MODEL = "Model (default: the architecture's; see 'scalemix models')"
DATA, PRIVACY, OPTIM, DIAG, RUN = "Data", "Privacy", "Optimisation", "Diagnostics", "Run"
PANELS = (MODEL, DATA, PRIVACY, OPTIM, DIAG, RUN)


@dataclass(frozen=True, kw_only=True)
class Setting:
    """What one configuration field means to people and to the command line."""

    help: str  # the flag's help and the field's documentation (Markdown, one paragraph)
    panel: str  # help panel and docs section
    choices: tuple[str, ...] = ()  # the allowed values (validate() checks them)
    positive: bool = False  # validate(): must be a number > 0
    path: bool = False  # a file or folder: the flag parses a path; stored as a string
    short: str | None = None  # a one-letter alias of the flag, e.g. -o
    off: str | None = None  # help of a --no-NAME flag that sets the field to None
    clears: tuple[str, ...] = ()  # fields that this flag, when given, sets to None
    flag: bool = True  # False: no flag; set in a config file or with --set
    identity: bool = True  # part of TrainConfig.identity() (changes what a run computes)
    cell: str = "always"  # in a grid cell's hash: always | never | unless-default


def setting(default, help: str, panel: str, **kw) -> Field:
    """A dataclass field: its default and its ``Setting``."""
    return field(default=default, metadata={"setting": Setting(help=help, panel=panel, **kw)})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # --- model (None = the architecture's default; see `scalemix models`)
    model: str = setting(
        "resnet9",
        "Architecture: resnet9, resnet9_small, resnet9_tiny, resnet18, resnet50, wrn16_4, "
        "wrn40_4, nf_resnet (see `scalemix models`).",
        MODEL,
    )
    norm: str | None = setting(
        None,
        "group | layer | instance | none | public_batch | batch (batch: --non-private only).",
        MODEL,
        choices=NORMS,
    )
    groups: int | None = setting(
        None, "GroupNorm groups (1-64, min(groups, C) per layer; must divide the channels).", MODEL
    )
    scalenorm: bool | None = setting(
        None, "Extra norm right after every residual addition (Klause et al.).", MODEL
    )
    placement: str | None = setting(
        None, "standard (conv->norm->act) | preact (norm->act->conv).", MODEL, choices=PLACEMENTS
    )
    ws: str | None = setting(
        None, "Weight standardisation: none | plain | scaled.", MODEL, choices=WS_MODES
    )
    act: str | None = setting(None, "Activation: relu | mish | silu.", MODEL, choices=ACTS)
    # --- data
    data: str = setting(
        "digits",
        "digits (embedded in scikit-learn, offline) | cifar10 | imagenette.",
        DATA,
        choices=DATASETS,
    )
    data_dir: str | None = setting(
        None,
        "Folder with cifar-10-batches-py/ (CIFAR-10) or train/ and val/ (ImageNette).",
        DATA,
        path=True,
    )
    download: bool = setting(
        False, "Download CIFAR-10 / ImageNette into --data-dir when missing.", DATA
    )
    image_size: int | None = setting(
        None, "ImageNette size in px (default 160); digits upsampling (default 16).", DATA
    )
    public_size: int = setting(
        0,
        "Public examples for --norm public_batch statistics (NOT protected by DP; recorded in "
        "result.json).",
        DATA,
    )
    public_source: str = setting(
        "split",
        "Where the public examples come from: split (held out of the training split) or a "
        ".npy/.pt file of uint8 images N x C x H x W from outside the private data.",
        DATA,
    )
    aug: str = setting(
        "none",
        "Augmentation: none | crop (reflect-pad 4 crop) | crop-flip (crop + horizontal flip); "
        "on the device.",
        DATA,
        choices=AUGMENTATIONS,
    )
    aug_mult: int = setting(
        1, "K augmented views per example, averaged before clipping.", DATA, positive=True
    )
    # --- privacy
    non_private: bool = setting(
        False,
        "Same loop without clipping and noise; reports no epsilon.",
        PRIVACY,
        clears=("epsilon",),
    )
    epsilon: float | None = setting(
        8.0, "Target epsilon; the noise multiplier is calibrated to it.", PRIVACY
    )
    sigma: float | None = setting(
        None,
        "Use this noise multiplier instead; the epsilon spent is reported.",
        PRIVACY,
        clears=("epsilon",),
    )
    delta: float = setting(1e-5, "Target delta (must be below 1/N).", PRIVACY)
    clip: float = setting(1.5, "Per-example gradient norm bound C.", PRIVACY)
    accountant: str = setting("prv", "prv (default) | rdp.", PRIVACY, choices=ACCOUNTANTS)
    sampler: str = setting(
        "poisson",
        "poisson (required under DP) | shuffle (non-private only).",
        PRIVACY,
        choices=SAMPLERS,
    )
    noise: str = setting(
        "secure",
        "secure (default: batches and noise from a 256-bit OS-CSPRNG key that is never "
        "written) | seeded (reproducible: keyed by --seed and a secret seed key kept outside "
        "the run, $SCALEMIX_SEED_KEY or ~/.config/scalemix/seed-key; epsilon assumes that key "
        "stays secret) | seeded-shared (as seeded, and the runs of one seed share their noise "
        "too: each run alone is DP, two together are not).",
        PRIVACY,
        choices=NOISE_MODES,
    )
    audit_canaries: int = setting(
        0,
        "Add M canaries (each included with probability 1/2) and audit the run: an empirical "
        "lower bound on epsilon beside the accountant's ('scalemix audit').",
        PRIVACY,
    )
    canary_kind: str = setting(
        "gradient",
        "gradient (white-box Dirac gradients, observed at every step) | input (mislabelled "
        "training examples, scored by the final model).",
        PRIVACY,
        choices=CANARY_KINDS,
    )
    engine: str = setting(
        "scalemix",
        "Per-example clipping engine: scalemix (fast: book-keeping with ghost norms) | vmap "
        "(torch.func reference).",
        PRIVACY,
        choices=DP_ENGINES,
    )
    precision: str = setting(
        "fp32",
        "fp32 | bf16: forward and backward under bf16 autocast; per-example norms, clip "
        "factors, the clipped sum and the noise stay fp32, so the bound C holds exactly.",
        RUN,
        choices=PRECISIONS,
        cell="unless-default",  # added after the first grids ran: their cell ids stay valid
    )
    # --- optimisation
    epochs: float = setting(
        10.0,
        "Expected passes over the data (steps = round(epochs / q)); may be fractional.",
        OPTIM,
        positive=True,
    )
    batch_size: int = setting(
        256,
        "Expected logical batch size (Poisson: q = batch_size / N).",
        OPTIM,
        positive=True,
    )
    physical_batch: int = setting(
        32, "Examples per forward/backward chunk (bounds memory).", OPTIM, positive=True
    )
    lr: float = setting(1e-3, "Learning rate.", OPTIM, positive=True)
    optimizer: str = setting(
        "nadam",
        "sgd | momentum (0.9 unless --set momentum=..., Nesterov) | nadam.",
        OPTIM,
        choices=OPTIMIZERS,
    )
    momentum: float = setting(
        0.9,
        "Momentum of --optimizer momentum, in [0, 1) (no flag: --set momentum=0.95 or a "
        "config file).",
        OPTIM,
        flag=False,
    )
    weight_decay: float = setting(0.0, "Weight decay.", OPTIM)
    lr_schedule: str = setting("constant", "constant | cosine.", OPTIM, choices=SCHEDULES)
    ema: float | None = setting(0.999, "EMA decay of the parameters.", OPTIM, off="Keep no EMA.")
    # --- diagnostics (scalemix.diagnostics)
    diag_every: int = setting(
        10, "Steps between diagnostics rows in diagnostics.csv (0: off; step 1 always).", DIAG
    )
    diag_source: str = setting(
        "train",
        "train: read the step's own batch (free, but NOT covered by DP) | probe: a fixed "
        "held-out batch in one extra forward pass.",
        DIAG,
        choices=DIAG_SOURCES,
    )
    diag_probe_size: int = setting(
        256, "--diag-source probe: test-split examples in the probe batch.", DIAG
    )
    # --- run
    seed: int = setting(
        0,
        "Public seed of the model's initialisation; in the seeded noise modes it also keys "
        "(with the secret seed key) the batches, augmentations, canaries and noise.",
        RUN,
    )
    device: str = setting(
        "auto",
        "auto (a GPU when there is one) | cpu | cuda.",
        RUN,
        choices=DEVICES,
        cell="never",  # the same experiment on another device is the same grid cell
    )
    out: str = setting(
        "runs/train",
        "Run directory (config.json, metrics.csv, epochs.csv, result.json).",
        RUN,
        path=True,
        short="-o",
        identity=False,
        cell="never",
    )
    checkpoint_every: int = setting(
        50,
        "Steps between checkpoints (also at each epoch end).",
        RUN,
        positive=True,
        identity=False,
        cell="never",
    )
    threads: int | None = setting(None, "CPU threads for torch.", RUN, identity=False, cell="never")

    def replace(self, **kw) -> TrainConfig:
        return replace(self, **kw)

    def as_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> str:
        """A name for what this run computes: a hash of every field except where it is
        written and how fast. A seeded run's noise is keyed by it, so two different runs
        never share a noise draw, while re-running a configuration into another directory
        reproduces it bit for bit (docs/sharp-edges.md, "Randomness across runs")."""
        import hashlib
        import json

        d = {k: v for k, v in self.as_dict().items() if SETTINGS[k].identity}
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
                "(docs/config.md lists the fields: the flags of 'scalemix train --help', "
                "with _ for -)"
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
            v, (base, optional) = getattr(self, f.name), field_type(f)
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
        for name, s in SETTINGS.items():
            v, flag = getattr(self, name), "--" + name.replace("_", "-")
            if s.choices and v is not None and v not in s.choices:
                raise ConfigError(f"{flag} {v!r} is not one of: {', '.join(s.choices)}")
            if s.positive and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{flag} must be a positive number, got {v}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("--weight-decay must be >= 0 and --momentum in [0, 1)")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"--ema must be in (0, 1) (or --no-ema), got {self.ema}")
        if self.diag_every < 0 or self.diag_probe_size < 1:
            raise ConfigError(
                f"--diag-every must be >= 0 (0: off) and --diag-probe-size >= 1, "
                f"got {self.diag_every} and {self.diag_probe_size}"
            )
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
        if self.precision == "bf16" and self.engine != "scalemix":
            raise ConfigError(
                "--precision bf16 needs --engine scalemix (it keeps the norms in fp32)"
            )
        return self


SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in fields(TrainConfig)}


def field_type(f: Field) -> tuple[str, bool]:
    """A field's base type (int, float, bool or str) and whether it may be None."""
    t = str(f.type)
    return t.replace(" | None", "").strip(), "None" in t


def with_implied(given: dict) -> dict:
    """The fields given as command-line flags, and what they imply: a given --sigma (or
    --non-private) leaves no target epsilon (``Setting.clears``)."""
    out = dict(given)
    for name, v in given.items():
        if v is not None and v is not False:
            out.update(dict.fromkeys(SETTINGS[name].clears))
    return out
