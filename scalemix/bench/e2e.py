"""``scalemix bench train``: end-to-end images/s of ``scalemix train`` against the founding
paper's recipe on Opacus, on the same data, model and batch sizes, in one process.

Opacus recipe (Klause et al. 2022): ``PrivacyEngine.make_private_with_epsilon`` (Poisson
sampling, per-sample hooks), NAdam, and ``BatchMemoryManager`` splitting each logical
batch into physical batches. scalemix: ``Trainer.train_step`` with its default engine.
Both calibrate sigma to the same (epsilon, delta, epochs) before the clock starts; the
clock covers the training steps only (sampling, data movement, clipping, noise, update).
The two pipelines alternate in rounds so that machine drift hits both alike.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn

from scalemix.data import load_data, normalize
from scalemix.train import TrainConfig, Trainer


def _opacus_pipeline(cfg: TrainConfig, data, device):
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader, TensorDataset

    from scalemix.models import create_model

    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        **cfg.model_axes().as_dict(),
    ).to(device)
    x = normalize(data.train_x, data.mean, data.std)
    loader = DataLoader(TensorDataset(x, data.train_y), batch_size=cfg.batch_size, shuffle=True)
    opt = torch.optim.NAdam(model.parameters(), lr=cfg.lr)
    pe = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = pe.make_private_with_epsilon(
            module=model,
            optimizer=opt,
            data_loader=loader,
            target_epsilon=cfg.epsilon,
            target_delta=cfg.delta,
            epochs=max(1, round(cfg.epochs)),
            max_grad_norm=cfg.clip,
        )
    criterion = nn.CrossEntropyLoss()
    state = {"it": None, "bmm": None}

    def next_physical():
        """One physical batch through the Opacus recipe; returns its size."""
        while True:
            if state["it"] is None:
                state["bmm"] = BatchMemoryManager(
                    data_loader=loader, max_physical_batch_size=cfg.physical_batch, optimizer=opt
                )
                state["it"] = iter(state["bmm"].__enter__())
            try:
                xb, yb = next(state["it"])
                break
            except StopIteration:
                state["bmm"].__exit__(None, None, None)
                state["it"] = None
        xb, yb = xb.to(device), yb.to(device)
        opt.zero_grad(set_to_none=True)
        criterion(model(xb), yb).backward()
        opt.step()  # a real step only at the end of each logical batch
        return len(yb)

    def logical_step():
        n = 0
        target = cfg.batch_size
        while n < target:
            n += next_physical()
        return n

    return logical_step


def run_e2e(
    cfg: TrainConfig,
    steps: int = 5,
    rounds: int = 2,
    log=print,
    non_private: bool = False,
    opacus: bool = True,
) -> dict:
    """images/s of each pipeline over ``rounds`` alternating rounds of ``steps`` logical
    steps. ``non_private``: also the same scalemix loop with ``--non-private`` (the
    baseline of the DP pipeline's share); ``opacus``: the founding paper's recipe."""
    data = load_data(cfg.data, cfg.data_dir, size=cfg.image_size)
    pipes = {}
    trainer = Trainer(cfg, data=data, progress=False, log=lambda *_: None)
    pipes["scalemix"] = lambda: trainer.train_step()["batch"]
    if non_private:
        plain = Trainer(
            cfg.replace(non_private=True, out=cfg.out + "-np"),
            data=data,
            progress=False,
            log=lambda *_: None,
        )
        pipes["non-private"] = lambda: plain.train_step()["batch"]
    if opacus:
        pipes["opacus"] = _opacus_pipeline(cfg, data, trainer.device)
    for step in pipes.values():
        step()  # warm-up
    totals = {k: [0, 0.0] for k in pipes}
    for r in range(rounds):
        for name, step in pipes.items():
            t0 = time.perf_counter()
            n = sum(step() for _ in range(steps))
            totals[name][0] += n
            totals[name][1] += time.perf_counter() - t0
            log(f"round {r + 1}/{rounds} {name}: {n} images in {time.perf_counter() - t0:.1f}s")
    ips = {k: n / t for k, (n, t) in totals.items()}
    out = {
        "images_per_second": ips,
        "batch_size": cfg.batch_size,
        "physical_batch": cfg.physical_batch,
        "model": cfg.model,
        "engine": cfg.engine,
        "steps_per_round": steps,
        "rounds": rounds,
    }
    if "opacus" in ips:
        out["speedup"] = ips["scalemix"] / ips["opacus"]
    if "non-private" in ips:
        out["share_of_non_private"] = ips["scalemix"] / ips["non-private"]
    return out
