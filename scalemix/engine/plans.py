"""How the fast engine takes each layer's per-example norms: chosen by measured cost, cached.

For a convolution or linear layer the per-example squared gradient norm comes either from
ghost norms (two Gram matrices; for a convolution the input's by shifts of its padded
positions' Gram, ~ (Hp Wp)^2 C + T^2 (kh kw + p) per example, or from the unfold,
~ T^2 (d + p)) or from the explicit per-example gradient (~ T d p), made either by the
unfold and a batched product or, for a convolution, by one weight-gradient convolution
with the examples as groups; see ``rules.LinearRule.costs`` (and ``ConvRule.costs``) and
``GhostEngine._plan``. Each choice is a ``ways.Way``; the cache stores its text. The
FLOP formula decides ghost or explicit when it is clear (one side at least ``CLEAR``
times cheaper); in between, and between the two explicit ways (equal FLOPs), where the
speed of the batched products, the convolution kernels and the memory traffic on this
device decide, the ways are timed once on random tensors of the layer's shapes (never on
training data) and the fastest is kept. Ghost norms are not among the ways for a layer
whose ordinary examples would mostly fail the fast engine's rounding guard
(``ghost.typical_ratio`` above ``ghost.ghost_ratio_limit``, docs/sharp-edges.md row 17).

A choice is cached per layer shape (the per-example shapes of its input and output
gradient, K, dtype, device) and per machine (torch version, device name, threads), in
memory and in ``$SCALEMIX_CACHE_DIR/engine-plans.json`` (default
``~/.cache/scalemix``), so that a resumed run takes the same ways as the run it resumes
(the ways agree to rounding; a resumed run takes the same ways, though privacy never
relies on a redo being bit-identical), and every
later run on the machine skips the timing. ``SCALEMIX_ENGINE_PLAN=flops`` uses the FLOP
formula alone (no timing, no cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

CLEAR = 4.0  # outside [1/CLEAR, CLEAR] the FLOP ratio decides without timing
_MEMORY: dict[str, str] = {}


def machine_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return f"torch {torch.__version__} | {device.type} {name} | {torch.get_num_threads()} threads"


def cache_file() -> Path | None:
    """Where choices are kept across processes; None when there is no home to keep them."""
    try:
        root = os.environ.get("SCALEMIX_CACHE_DIR") or Path.home() / ".cache" / "scalemix"
    except RuntimeError:  # no $HOME and no passwd entry
        return None
    return Path(root) / "engine-plans.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside the cache (ranks on one machine share it)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def choose(
    key: str,
    device: torch.device,
    names: tuple[str, ...],
    candidates: Callable[[], dict[str, Callable[[], object]]],
) -> str:
    """The cached choice for ``key`` on this machine, or the fastest candidate, timed now
    (``candidates()`` makes them, with their inputs, only when there is something to time).

    The first choice stored for a key wins: a process that timed a key at the same moment
    as another adopts the stored choice, so that processes on one machine agree.
    """
    full = f"{machine_key(device)} | {key}"
    if full in _MEMORY:
        return _MEMORY[full]
    path = cache_file()
    stored = _read(path).get(full) if path is not None else None
    if stored in names:
        _MEMORY[full] = stored
        return stored
    best = _fastest(candidates(), device)
    if path is None:
        _MEMORY[full] = best
        return best
    try:
        with _locked(path):
            data = _read(path)
            if data.get(full) in names:
                best = data[full]  # another process stored one first: take it
            data[full] = best
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
    except (OSError, ImportError):  # a read-only home, no fcntl: this process only
        pass
    _MEMORY[full] = best
    return best


def _fastest(candidates: dict[str, Callable[[], object]], device: torch.device) -> str:
    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    times = {}
    for name, fn in candidates.items():
        once(fn)  # warm-up (allocator, kernels)
        times[name] = min(once(fn) for _ in range(2))
    return min(times, key=times.get)
