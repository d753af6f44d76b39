"""Shared fixtures: tiny real data (the embedded digits at 8 px) and tiny configurations."""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass

import pytest
import torch

from scalemix.data.datasets import load_digits
from scalemix.train import TrainConfig

torch.set_num_threads(2)

# The signal tests send SIGINT. A shell without job control starts background commands
# (e.g. `.ci/run &`) with SIGINT ignored, and every child would inherit that: restore
# Python's handler, so that children exec'd from here start with the default again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Seeded runs key their sampler and noise with a secret seed key kept outside every run
# directory; the tests use one of their own (subprocesses inherit it), never the user's.
os.environ["SCALEMIX_SEED_KEY"] = os.path.join(
    tempfile.mkdtemp(prefix="scalemix-test-key-"), "seed-key"
)
# The fast engine's per-shape plans (engine/plans.py) are cached per session, not in ~.
os.environ["SCALEMIX_CACHE_DIR"] = tempfile.mkdtemp(prefix="scalemix-test-cache-")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """``cli("train", "--out", d)`` runs ``scalemix train --out d`` in this process (the
    command line's own ``main(argv)``: its exit codes and one-line errors, no traceback)
    and returns the exit code, stdout and stderr. A subprocess is for what one proves:
    signals, kills, torchrun, a fresh interpreter's imports."""
    from scalemix.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()  # what came before is not this command's
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def digits8():
    return load_digits(size=8)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A seconds-long DP run on the embedded digits at 8 px."""
    return TrainConfig(
        model="resnet9",
        groups=8,
        image_size=8,
        epochs=0.25,
        batch_size=64,
        physical_batch=32,
        checkpoint_every=2,
        out=str(tmp_path / "run"),
        ema=0.9,
        epsilon=None,
        sigma=1.0,
        noise="seeded",  # reproducible: resume and replay tests compare runs bit for bit
    )


def pytest_runtest_setup(item):
    """Name a slow test before it runs, so that a quiet run (-q) that sits on one dot for a
    minute says what it is doing."""
    if item.get_closest_marker("slow"):
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and reporter.verbosity <= 0:
            reporter.write_line(f"  (slow) {item.nodeid}")
