"""Diagnostics while a model trains: what the trainer records every ``every`` steps.

Two sides, both reduced on the device and fetched with one host transfer per logging step:

* **Residual blocks** (``BlockProbe``): every block's scale-mixing statistics (hooks.py).
  ``source="train"`` reads the first physical chunk of the step's own training batch as
  it passes through the forward pass (no extra pass; for an engine whose forward runs
  under ``vmap`` one extra no-grad forward of that chunk). ``source="probe"`` reads a
  fixed batch of held-out data in one extra no-grad forward pass per logging step.
* **Gradients** (DP runs): per layer (a module owning parameters) the 10/50/90 %
  quantiles of the per-example gradient norms over the whole logical batch, and the
  signal-to-noise ratio of the noisy update ``||sum_i clip(g_i)||_layer / (sigma C
  sqrt(d_layer))``; for the whole model the same plus the fraction of examples clipped.
  These always come from the training examples.

Rows are long-format ``(step, block, metric, value, source)``; ``source`` is
``train`` (statistics of private training data: **not covered by the DP guarantee**) or
``heldout`` (the probe batch). Every output that shows ``train`` rows carries ``CAVEAT``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from scalemix.choices import DIAG_SOURCES
from scalemix.diagnostics.hooks import METRICS, BlockProbe

COLUMNS = ["step", "block", "metric", "value", "source"]
QUANTILES = (0.1, 0.5, 0.9)
GRAD_LAYER_METRICS = ("grad_norm_p10", "grad_norm_p50", "grad_norm_p90", "grad_snr")
GRAD_MODEL_METRICS = (*GRAD_LAYER_METRICS, "clip_fraction")
MODEL_ROW = "model"  # the ``block`` value of whole-model gradient rows
CAVEAT = (
    "Diagnostics marked source=train are computed from private training examples without "
    "noise: they are NOT covered by the run's DP guarantee. Do not publish them as private; "
    "use --diag-source probe (held-out data) for residual-block statistics you can share."
)


def layer_groups(param_names: list[str]) -> list[tuple[str, list[int]]]:
    """Group parameter indices by the module that owns them ('a.b.weight' -> 'a.b')."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(param_names):
        groups.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(i)
    return list(groups.items())


class TrainingDiagnostics:
    """The trainer's recorder: ``begin_step`` / ``after_chunk`` / ``before_noise`` / ``end_step``."""

    def __init__(
        self,
        model: nn.Module,
        engine,
        *,
        every: int,
        source: str = "train",
        probe_x: torch.Tensor | None = None,
        sigma: float = 0.0,
        clip: float | None = None,
        last_step: int | None = None,
    ):
        if source not in DIAG_SOURCES:
            raise ValueError(f"diagnostics source {source!r} is not one of {DIAG_SOURCES}")
        if source == "probe" and probe_x is None:
            raise ValueError("source 'probe' needs a held-out batch")
        self.model, self.engine = model, engine
        self.every, self.source, self.probe_x = every, source, probe_x
        self.sigma, self.clip = sigma, clip
        self.last_step = last_step
        self.probe = BlockProbe(model)
        self.probe.enabled = False
        self.layers = layer_groups(engine.names)
        dev = engine.params[0].device if engine.params else torch.device("cpu")
        owner = torch.empty(len(engine.params), dtype=torch.long)
        for j, (_, idx) in enumerate(self.layers):
            owner[idx] = j
        self._owner = owner.to(dev)
        self._dims = torch.tensor(
            [sum(engine.params[i].numel() for i in idx) for _, idx in self.layers],
            dtype=torch.float32,
            device=dev,
        )
        self.grad_side = engine.private and clip is not None
        self.active = False
        self._sq: list[torch.Tensor] = []
        self._sum_sq: torch.Tensor | None = None

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> TrainingDiagnostics:
        self.probe.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.probe.__exit__(*exc)

    @property
    def block_source_label(self) -> str:
        return "heldout" if self.source == "probe" else "train"

    def due(self, step: int) -> bool:
        """Log at step 1 (near initialisation), every ``every`` steps, and the last step."""
        return self.every > 0 and (step in (1, self.last_step) or step % self.every == 0)

    def begin_step(self, step: int) -> None:
        self.active = self.due(step)
        self._sq, self._sum_sq = [], None
        self.probe.enabled = False
        if self.active and self.source == "probe":
            self._forward(self.probe_x)

    def chunk_context(self, i: int):
        """Around the engine call on chunk ``i``: read the first chunk's forward pass."""
        if (
            self.active
            and i == 0
            and self.source == "train"
            and getattr(self.engine, "hooks_see_batch", True)
        ):
            return _Enabled(self.probe)
        return nullcontext()

    def after_chunk(self, i: int, x: torch.Tensor, result) -> None:
        if not self.active:
            return
        if i == 0 and self.source == "train" and not getattr(self.engine, "hooks_see_batch", True):
            self._forward(x.reshape(-1, *x.shape[2:]))  # the engine's forward runs under vmap
        if self.grad_side and result.layer_norms_sq is not None and result.n:
            self._sq.append(result.layer_norms_sq.detach())

    def before_noise(self, grad_sums: list[torch.Tensor]) -> None:
        """Squared norm of each parameter's clipped sum, before noise is added."""
        if self.active and self.grad_side and grad_sums:
            self._sum_sq = torch.stack(torch._foreach_norm(grad_sums)).pow(2)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> None:
        with _Enabled(self.probe):
            self.model(x)

    # ---------------------------------------------------------------- the rows

    def end_step(self, step: int) -> list[dict]:
        """This step's rows (empty when not a logging step); one device->host transfer."""
        if not self.active:
            return []
        self.active = False
        names, block_t = self.probe.take()
        parts, layout = [], []
        if block_t is not None:
            parts.append(block_t.flatten())
            layout.append(("blocks", block_t.shape))
        grad_t = self._grad_stats()
        if grad_t is not None:
            parts.append(grad_t.flatten())
            layout.append(("grads", grad_t.shape))
        if not parts:
            return []
        flat = torch.cat([p.float() for p in parts]).cpu().tolist()  # the one sync
        rows: list[dict] = []
        pos = 0
        for kind, shape in layout:
            n_rows, n_cols = shape
            values = flat[pos : pos + n_rows * n_cols]
            pos += n_rows * n_cols
            if kind == "blocks":
                for bi, name in enumerate(names):
                    for mi, metric in enumerate(METRICS):
                        rows.append(self._row(step, name, metric, values[bi * n_cols + mi]))
            else:
                labels = [MODEL_ROW] + [n for n, _ in self.layers]
                for li, label in enumerate(labels):
                    metrics = GRAD_MODEL_METRICS if li == 0 else GRAD_LAYER_METRICS
                    for mi, metric in enumerate(metrics):
                        rows.append(
                            self._row(step, label, metric, values[li * n_cols + mi], "train")
                        )
        return rows

    def _row(self, step, block, metric, value, source=None) -> dict:
        return {
            "step": step,
            "block": block,
            "metric": metric,
            "value": value,
            "source": source or self.block_source_label,
        }

    def _grad_stats(self) -> torch.Tensor | None:
        """(1 + layers, 5): [p10, p50, p90, snr, clip_fraction] for the model, then each layer."""
        if not self._sq or self._sum_sq is None:
            return None
        sq = torch.cat(self._sq, dim=1)  # (P, B) squared per-example norm per parameter
        dev = sq.device
        n_layers = len(self.layers)
        layer_sq = torch.zeros(n_layers, sq.shape[1], device=dev).index_add_(
            0, self._owner.to(dev), sq.float()
        )
        norms = torch.cat([layer_sq.sum(0, keepdim=True), layer_sq]).sqrt()  # (1+L, B)
        q = torch.quantile(norms, torch.tensor(QUANTILES, device=dev), dim=1).T  # (1+L, 3)
        sum_sq = torch.zeros(n_layers, device=dev).index_add_(
            0, self._owner.to(dev), self._sum_sq.float()
        )
        dims = self._dims.to(dev)
        noise = self.sigma * self.clip
        signal = torch.cat([sum_sq.sum().view(1), sum_sq]).sqrt()
        d = torch.cat([dims.sum().view(1), dims])
        snr = signal / (noise * d.sqrt()) if noise > 0 else torch.full_like(signal, float("inf"))
        # scaled down by the clip rule: above C (1 - m) (engine.base.clip_factors)
        from scalemix.engine.base import clip_margin

        clipped = (norms[0] > self.clip * (1 - clip_margin(norms.dtype))).float().mean()
        frac = torch.full((1 + n_layers,), float("nan"), device=dev)
        frac[0] = clipped
        return torch.cat([q, snr[:, None], frac[:, None]], dim=1)


class _Enabled:
    """Turn a probe's hooks on for the duration of a ``with`` block."""

    def __init__(self, probe: BlockProbe):
        self.probe = probe

    def __enter__(self):
        self.probe.enabled = True

    def __exit__(self, *exc):
        self.probe.enabled = False
