"""Data-parallel DP-SGD on torch.distributed (gloo, two ranks on the CPU): the all-reduced
clipped sum equals one process on the union of the ranks' examples; the noise shares sum
to variance sigma^2 C^2 per coordinate; a two-rank training run killed with SIGKILL and
resumed counts what it released after its checkpoint (and ends bit-identical to an
uninterrupted one when it was killed at a checkpoint)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from scalemix.engine import make_engine
from scalemix.privacy import NoiseSource, SecretStream
from scalemix.privacy.mechanism import noisy_mean
from scalemix.train.distributed import World

SIGMA, CLIP = 1.3, 0.7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 1, 6, 6, generator=g, dtype=torch.float64)  # (B, K, C, H, W)
    y = torch.randint(0, 5, (12,), generator=g)
    return x, y


def _rank_main(rank: int, port: int, out: str, test: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank, 2)
    torch.set_num_threads(1)
    if test == "sum":
        x, y = _batch()
        shard = world.shard(len(y))  # rank 0: examples 0, 2, 4, ...; rank 1: 1, 3, 5, ...
        engine = make_engine("scalemix", _model(), CLIP)
        grads = [g.clone() for g in engine(x[shard], y[shard]).grads]
        world.all_reduce_(grads)
        result = [g.tolist() for g in grads]
    else:  # noise shares: zero sums, each rank its own stream, one all-reduce
        n = 200_000
        total = [torch.zeros(n)]
        noise = NoiseSource(SecretStream(os.urandom(32), f"noise/rank{rank}"))
        noisy_mean(total, sigma=SIGMA / 2**0.5, clip=CLIP, expected_batch_size=1.0, noise=noise)
        share = total[0].clone()
        world.all_reduce_(total)
        result = {"total": total[0].tolist(), "share": share.tolist()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _spawn(tmp_path, test: str):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), test), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_all_reduce_the_clipped_sum_of_one_process_on_the_union(tmp_path):
    r0, r1 = _spawn(tmp_path, "sum")
    x, y = _batch()
    reference = make_engine("scalemix", _model(), CLIP)(x, y).grads  # one process, all 12
    for a, b, ref in zip(r0, r1, reference):
        assert torch.tensor(a) == pytest.approx(torch.tensor(b))  # every rank holds the sum
        torch.testing.assert_close(
            torch.tensor(a, dtype=torch.float64), ref, rtol=1e-10, atol=1e-12
        )


def test_noise_shares_sum_to_sigma_squared_c_squared_per_coordinate(tmp_path):
    r0, r1 = _spawn(tmp_path, "noise")
    total = torch.tensor(r0["total"])
    assert torch.equal(total, torch.tensor(r1["total"]))
    var = float(total.var())
    # 200,000 coordinates: the variance estimate's relative SE is sqrt(2 / n) = 0.3 %
    assert var == pytest.approx((SIGMA * CLIP) ** 2, rel=0.02)  # not x2, not /2
    share0, share1 = torch.tensor(r0["share"]), torch.tensor(r1["share"])
    assert float(share0.var()) == pytest.approx((SIGMA * CLIP) ** 2 / 2, rel=0.02)
    assert abs(float(torch.corrcoef(torch.stack([share0, share1]))[0, 1])) < 0.01  # independent


def _train(out: Path, *extra: str, wait: bool = True, env=None):
    cmd = [
        sys.executable,
        "-m",
        "scalemix",
        "train",
        "--model",
        "resnet9_tiny",
        "--data",
        "digits",
        "--image-size",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--physical-batch",
        "128",
        "--noise",
        "seeded",
        "--checkpoint-every",
        "1",
        "--diag-every",
        "0",
        "--no-ema",
        "--quiet",
        "--nproc",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _pids_naming(path: Path) -> list[int]:
    """Live processes whose command line contains ``path`` (zombies excluded)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if str(path) in cmd and state != "Z":
            out.append(int(d.name))
    return out


def _final_model(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=False)["model"]


@pytest.mark.slow
def test_two_rank_training_run_survives_sigkill_and_resumes_bit_identical(tmp_path):
    full = _train(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    result = json.loads((tmp_path / "full" / "result.json").read_text())
    assert result["status"] == "done" and result["epsilon"] > 0
    rank1 = tmp_path / "full" / "ranks" / "1"  # rank 1 keeps its logs apart, and only them
    assert sorted(p.name for p in rank1.iterdir()) == [
        "epochs.csv",
        "metrics.csv",
        "released.json",
    ]
    assert result["world_size"] == 2
    steps = result["steps"]

    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2
    nonce = cfg["resolved"]["randomness"]["noise_nonce"]  # the same run, its noise reproduced
    proc = _train(tmp_path / "cut", "--noise-nonce", nonce, wait=False)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    # torchrun and both ranks, at once (torchrun's workers may sit in their own process
    # groups: every process whose command line names this run is killed)
    victims = [proc.pid, *_pids_naming(tmp_path / "cut")]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _pids_naming(tmp_path / "cut") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pids_naming(tmp_path / "cut"), "a rank survived the kill"
    assert not (tmp_path / "cut" / "result.json").exists()  # really stopped mid-run
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 2 <= step < steps
    released = max(  # what any rank committed (and so released) before the kill
        json.loads((d / "released.json").read_text())["steps_released"]
        for d in (tmp_path / "cut", tmp_path / "cut" / "ranks" / "1")
    )
    resumed = _train(tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert again["steps"] == steps and again["abandoned_steps"] == released - step
    if released == step:  # killed at a checkpoint: the same run, bit for bit
        a, b = _final_model(tmp_path / "full"), _final_model(tmp_path / "cut")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert again["epsilon"] == result["epsilon"]
    else:  # steps released after the checkpoint are counted, their draws never reused
        assert again["epsilon"] > result["epsilon"]


@pytest.mark.slow
def test_ranks_refuse_what_needs_one_process(tmp_path):
    r = _train(tmp_path / "audit", "--audit-canaries", "100")
    assert r.returncode != 0 and "needs one process" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "scalemix", "train", "--nproc", "0", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "give 2 or more ranks" in r.stderr


@pytest.mark.slow
def test_submitit_runs_a_cell_as_a_two_task_data_parallel_job(tmp_path, monkeypatch):
    """--gpus-per-cell 2 through submitit's local executor: two tasks, one gloo group,
    rank 0 writes the cell; rank 1 keeps its logs under ranks/1."""
    pytest.importorskip("submitit")
    from scalemix.ablate import GridDir, ablate, load_grid

    monkeypatch.setenv("SCALEMIX_SUBMITIT_CLUSTER", "local")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p = tmp_path / "g.toml"
    p.write_text(
        'name = "dp2"\nseeds = [0]\n[base]\nmodel = "resnet9_tiny"\ndata = "digits"\n'
        "image_size = 8\nepochs = 0.2\nbatch_size = 64\nphysical_batch = 64\nsigma = 1.0\n"
        'ema = 0.9\ndiag_every = 0\nnoise = "seeded"\n[axes]\nlr = [0.001]\n'
    )
    out = tmp_path / "grid"
    counts = ablate(
        load_grid(str(p)), out, executor="slurm", slurm={"tasks_per_cell": 2}, log=lambda *_: None
    )
    assert counts["done"] == 1
    gd = GridDir(out)
    cid = gd.table()[0]["id"]
    assert (gd.cell_dir(cid) / "ranks" / "1" / "metrics.csv").exists()
    assert json.loads((gd.cell_dir(cid) / "result.json").read_text())["status"] == "done"


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Under torchrun, --device cuda/auto means cuda:LOCAL_RANK, made current before
    anything allocates (else every rank lands on cuda:0); a task that sees one GPU (the
    scheduler gave it its own) takes that one. No GPU needed: CUDA's queries are faked."""
    from scalemix.train.setup import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(d))
    for visible, local, expect in ((4, "3", 3), (4, "0", 0), (1, "3", 0)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda v=visible: v)
        monkeypatch.setenv("LOCAL_RANK", local)
        for name in ("cuda", "auto"):
            dev = resolve_device(name)
            assert dev == torch.device("cuda", expect) and current[-1] == dev
    assert resolve_device("cuda:2") == torch.device("cuda", 2)  # an explicit index is kept
