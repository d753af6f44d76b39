"""Setting a run up, without writing anything: the device, the data (with its public
split and input canaries), the sampling and privacy plan (q, steps, sigma, ledger). The
model, engine and optimiser are built in ``Trainer.__init__`` from these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scalemix.data import ImageData, load_public_images, normalize
from scalemix.errors import ConfigError, PrivacyError
from scalemix.privacy import Ledger, sigma_for
from scalemix.train.config import TrainConfig

PUBLIC_SPLIT_SEED = 1234  # the public hold-out is a property of the data, not of the run


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU. Under torchrun (``LOCAL_RANK`` set) a
    CUDA device is this rank's own, ``cuda:LOCAL_RANK``, made the current device before
    anything allocates on it (otherwise every rank lands on cuda:0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: no CUDA device is available here; use --device auto or cpu"
        )
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", cuda_index())
        torch.cuda.set_device(device)
    return device


def cuda_index() -> int:
    """This rank's GPU: ``LOCAL_RANK`` among the GPUs it sees (all of the machine's, or,
    where the scheduler gives each task its own, the one it sees)."""
    return local_rank() % max(1, torch.cuda.device_count())


def local_rank() -> int:
    """This process's index among the ranks on its machine (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class TrainData:
    """The run's data: private training examples (canaries, if any, after them), the test
    set, the public examples (if any), all on the device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n: int  # private examples
    public_x: torch.Tensor | None
    public_source: str | None
    canaries: object | None  # scalemix.audit.Canaries for input canaries


def prepare_data(
    cfg: TrainConfig, data: ImageData, device: torch.device, input_canaries: Callable
) -> TrainData:
    """Split off public examples (``--public-size``) and input canaries (``input_canaries``
    makes the set from (x, y, classes, data-set indices)); move everything to the device."""
    train_x, train_y = data.train_x, data.train_y
    data_index = torch.arange(len(train_y))  # each private example's index in the data set
    public_x = public_source = None
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
            public_source = (
                f"{cfg.public_size} examples of the {data.name} training split "
                f"(fixed split, seed {PUBLIC_SPLIT_SEED}): NOT protected"
            )
        else:
            public_u8 = load_public_images(
                cfg.public_source, cfg.public_size, tuple(train_x.shape[1:])
            )
            public_source = f"{cfg.public_size} images from {cfg.public_source}"
        public_x = normalize(public_u8, data.mean, data.std).to(device)
    canaries = None
    n_real = len(train_y)
    if cfg.audit_canaries and cfg.canary_kind == "input":
        # Canary examples leave the training data; the included ones come back,
        # mislabelled, as examples like any other (appended after the real ones).
        canaries = input_canaries((train_x, train_y, data.num_classes, data_index))
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[canaries.source_index] = False
        train_x = torch.cat([train_x[keep], canaries.x])
        train_y = torch.cat([train_y[keep], canaries.y])
        n_real = int(keep.sum())
    return TrainData(
        train_x=train_x.to(device),
        train_y=train_y.to(device),
        test_x=data.test_x.to(device),
        test_y=data.test_y.to(device),
        n=n_real,
        public_x=public_x,
        public_source=public_source,
        canaries=canaries,
    )


@dataclass(frozen=True)
class PrivacyPlan:
    q: float  # Poisson sampling rate B / N
    steps_per_epoch: int
    total_steps: int
    sigma: float  # noise multiplier (0 when non-private)


def plan_privacy(cfg: TrainConfig, n: int, private: bool) -> tuple[PrivacyPlan, Ledger | None]:
    """The sampling rate, the step count and sigma (calibrated to the target epsilon
    unless --sigma is given), and an empty ledger."""
    q = cfg.batch_size / n
    if q > 1:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the {n} training examples; lower it"
        )
    steps_per_epoch = max(1, round(1 / q))
    total_steps = max(1, round(cfg.epochs / q))
    if not private:
        return PrivacyPlan(q, steps_per_epoch, total_steps, 0.0), None
    if cfg.delta >= 1 / n:
        raise PrivacyError(
            f"--delta {cfg.delta:g} is not below 1/N = {1 / n:.2e} for N = {n} "
            "training examples; such a delta allows releasing an example outright. "
            "Use a delta well below 1/N (e.g. 1e-5)"
        )
    if cfg.sigma is not None:
        sigma = float(cfg.sigma)
    else:
        sigma = sigma_for(
            epsilon=cfg.epsilon,
            sample_rate=q,
            steps=total_steps,
            delta=cfg.delta,
            accountant=cfg.accountant,
        )
    return PrivacyPlan(q, steps_per_epoch, total_steps, sigma), Ledger(cfg.accountant, cfg.sampler)
