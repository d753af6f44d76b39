"""The interface every gradient engine implements, and the floating-point rules they share.

An engine takes one physical chunk of a logical batch, ``x`` of shape (B, K, C, H, W)
(K augmented views per example) and labels ``y`` (B,), and returns the **sum over
examples** of each example's clipped gradient, where an example's gradient is the
gradient of its loss averaged over its K views (so one example's sensitivity stays C,
docs/sharp-edges.md row 3). Noise and the division by the expected batch size happen
once per logical batch, in the trainer, never in an engine.

Engines: ``vmap`` (torch.func per-example gradients; the reference), ``scalemix`` (ghost
norms, ghost.py) and ``nonprivate`` (one ordinary backward pass, no clipping).

The bound C must hold in floating point, for any input, on any device
(docs/sharp-edges.md row 17). Every DP engine therefore

* clips with ``clip_factors``: min(1, C (1 - m) / norm), where the margin m
  (``clip_margin``) covers the stated relative rounding error of the norm against what is
  summed, so that ||c_i g_i|| <= C still holds after rounding;
* takes its per-example norms and clipped sums inside ``full_fp32_products``: TF32
  (cuBLAS and cuDNN) and oneDNN's reduced fp32 precision are off there, whatever the run
  allows in its forward and backward passes, so the norms and the sums are products of
  the same precision (a TF32 sum with an fp32 norm releases up to a few per cent more
  than C).

``precision_policy()`` describes this for a run's records.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ChunkResult:
    grads: list[torch.Tensor]  # per trainable parameter: sum over examples of clipped grads
    loss_sum: torch.Tensor  # scalar: sum over examples of the per-example (view-averaged) loss
    correct: torch.Tensor  # scalar: views classified correctly / K, summed over examples
    n: int  # examples in the chunk
    norms: torch.Tensor | None = None  # (B,) per-example gradient norms before clipping
    layer_norms_sq: torch.Tensor | None = None  # (P, B) squared per-example norm per parameter


class Engine:
    """Base class: holds the model and the list of trainable parameters."""

    name = "base"
    private = True
    hooks_see_batch = True  # module forward hooks see the whole chunk as one plain tensor

    def __init__(self, model: nn.Module, clip: float | None):
        self.model = model
        self.clip = clip
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pending_guard: list[torch.Tensor] = []

    # The fast engine's floating-point guard (ghost.py) asks the host, per chunk, whether
    # any example needs its explicit gradient. With ``defer_guard`` set (the trainer sets
    # it) it asks nothing: each chunk leaves a device flag in ``pending_guard``, the
    # trainer reads ``guard_flag()`` with the step's one host read, and a step whose flag
    # is set is computed again with the guard synchronous, before anything is released.
    defer_guard = False

    def begin_step(self) -> None:
        self.pending_guard: list[torch.Tensor] = []

    def guard_flag(self) -> torch.Tensor | None:
        """True (on the device) where a deferred guard found a suspect this step."""
        return torch.stack(self.pending_guard).any() if self.pending_guard else None

    def zero_result(self, device: torch.device) -> ChunkResult:
        z = torch.zeros((), device=device)
        return ChunkResult(
            [torch.zeros_like(p) for p in self.params],
            z,
            z.clone(),
            0,
            torch.zeros(0, device=device),
            torch.zeros(len(self.params), 0, device=device),
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> ChunkResult:
        raise NotImplementedError


# ---------------------------------------------------------------------- clipping margin

# The clip margin in units of the norms' machine epsilon: m = 2^13 eps, 2^-10 in fp32
# (2^-39 in fp64). With u = eps / 2 the unit roundoff, m is a few ulps times a bound on
# the accumulation length, and it is spent as follows (relative error of the norm against
# the norm of what is summed for the example):
#   m / 2  a Gram (ghost) norm: its squared norm's rounding error is at most m (ghost.py
#          recomputes every example whose error estimate exceeds that explicitly);
#   m / 4  a clipped sum recomputed by a second weight-gradient product instead of summed
#          from the tensor the norm was taken of (ghost.py guards it the same way);
#   m / 4  the rest: sums of squares of stored per-example gradients (< 2^12 u: blocked
#          or pairwise reductions of a few thousand serial terms at most), the sum over
#          layers, the square root, the division and the scaling (a few u).
MARGIN_EPS = 2**13


def clip_margin(dtype: torch.dtype) -> float:
    """The relative margin m of ``clip_factors`` for norms of this dtype (2^-10 in fp32)."""
    eps = torch.finfo(dtype).eps
    if eps > 2.0**-20:
        raise ValueError(f"per-example norms must be fp32 or fp64 to clip within C (got {dtype})")
    return MARGIN_EPS * eps


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C (1 - m) / ||g||): each per-example gradient scaled to norm <= C, after rounding.

    m = ``clip_margin(norms.dtype)`` (2^-10 in fp32) covers the relative rounding error of
    the norm against the norm of what the engine sums, and of the scaling itself, so that
    the released contribution of one example stays within C (docs/sharp-edges.md row 17).
    A zero norm gives 1 (C / 0 = inf, clamped); a non-finite norm gives a non-finite or
    zero factor and the trainer stops the run (docs/sharp-edges.md row 6).
    """
    return (clip * (1.0 - clip_margin(norms.dtype)) / norms).clamp(max=1.0)


# ---------------------------------------------------------------------- fp32 products


@functools.cache
def _fp32_precision_leaves() -> tuple[tuple[str, object], ...]:
    """The backends' per-operation fp32 precision settings (torch >= 2.9), by name: cuBLAS
    matmul, cuDNN (all, conv, rnn), oneDNN (all, matmul, conv); none on older torch."""
    b = torch.backends
    leaves = []
    for name, get in (
        ("cuda.matmul", lambda: b.cuda.matmul),
        ("cudnn", lambda: b.cudnn),
        ("cudnn.conv", lambda: b.cudnn.conv),
        ("cudnn.rnn", lambda: b.cudnn.rnn),
        ("mkldnn", lambda: b.mkldnn),
        ("mkldnn.matmul", lambda: b.mkldnn.matmul),
        ("mkldnn.conv", lambda: b.mkldnn.conv),
    ):
        try:
            obj = get()
            obj.fp32_precision  # noqa: B018 - probing for the newer interface
        except (AttributeError, RuntimeError):
            continue
        leaves.append((name, obj))
    return tuple(leaves)


def _read(getter):
    """A legacy TF32 getter's value, or None where torch refuses to read it (it raises when
    the legacy and the newer per-operation settings were mixed)."""
    try:
        return getter()
    except RuntimeError:
        return None


@contextlib.contextmanager
def full_fp32_products() -> Iterator[None]:
    """fp32 products at full IEEE precision inside: TF32 off for cuBLAS matmuls and cuDNN
    convolutions (torch allows it for cuDNN by default), oneDNN's bf16 / TF32 fp32 modes off
    on the CPU; every setting restored on exit, exactly as it was.

    Both of torch's interfaces are set, consistently: the legacy flags
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``, the
    float32 matmul precision) where they can be read, and the per-operation
    ``fp32_precision`` settings (torch >= 2.9) at their most specific level, because torch
    refuses a matmul whose legacy and new settings disagree. The settings are process-wide;
    the engines enter this around their norms and clipped sums only (inside the backward
    hooks, which run one at a time), so the forward and backward passes keep whatever the
    run chose.
    """
    leaves = [(obj, obj.fp32_precision) for _, obj in _fp32_precision_leaves()]
    matmul = _read(torch.get_float32_matmul_precision)
    cudnn = _read(lambda: torch.backends.cudnn.allow_tf32)
    try:
        if matmul is not None:
            torch.set_float32_matmul_precision("highest")  # cuBLAS TF32 off (legacy and new)
        if cudnn is not None:
            torch.backends.cudnn.allow_tf32 = False
        for obj, _ in leaves:
            obj.fp32_precision = "ieee"
        yield
    finally:
        if cudnn is not None:
            torch.backends.cudnn.allow_tf32 = cudnn
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        for obj, value in leaves:  # last: the legacy setters above also write these
            obj.fp32_precision = value


def tf32_settings() -> dict:
    """The current TF32 settings, as torch reports them (None where it refuses to read a
    legacy flag because legacy and per-operation settings were mixed)."""
    out = {
        "cuda_matmul_allow_tf32": _read(lambda: torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": _read(lambda: torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
    }
    for name, obj in _fp32_precision_leaves():
        out[f"{name}.fp32_precision"] = obj.fp32_precision
    return out


def precision_policy() -> dict:
    """What a run's DP arithmetic guarantees, for its records (config.json): JSON values."""
    return {
        "dp_products": "fp32 IEEE: per-example norms, clip factors and clipped sums run with "
        "TF32 (cuBLAS, cuDNN) and oneDNN reduced fp32 precision off (engine.base."
        "full_fp32_products); the forward and backward passes keep the run's settings",
        "clip_rule": "min(1, C * (1 - m) / norm)",
        "clip_margin_fp32": clip_margin(torch.float32),
        "clip_margin_fp64": clip_margin(torch.float64),
        "ghost_norm_guard": "engine scalemix: an example whose Gram norm or recomputed clipped "
        "sum may be off by more than the margin allows (estimate from its per-position "
        "scale), or is negative or non-finite, takes its norm and its clipped-sum term from "
        "its explicit per-example gradient",
        "tf32_outside_dp_products": tf32_settings(),
        "torch": torch.__version__,
    }


def view_averaged_loss(
    logits: torch.Tensor, y: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss averaged over its K views, and correct views / K, from (B*K, classes)."""
    b = y.shape[0]
    yk = y.repeat_interleave(k)
    loss = nn.functional.cross_entropy(logits, yk, reduction="none").view(b, k).mean(1)
    correct = (logits.argmax(1) == yk).float().view(b, k).mean(1)
    return loss, correct
