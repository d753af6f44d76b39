"""The epsilon scalemix prints holds against an attacker who reads everything a run writes
(docs/sharp-edges.md, "The randomness model"): secret and independent sampling and noise
streams with >= 128 bits of key, data-independent preprocessing, atomic accounting,
explicit public data, resume after divergence, and every private quantity labelled."""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm

from scalemix.data.datasets import load_digits
from scalemix.errors import ConfigError
from scalemix.privacy import RunRandomness, SecretStream
from scalemix.privacy.disclosure import NOT_COVERED
from scalemix.privacy.randomness import key_id, load_seed_key
from scalemix.tracking import WandbSettings
from scalemix.tracking.wandb_file import find_run_files, read_offline_run
from scalemix.train import Trainer
from scalemix.train.loop import Interrupted


def _trainer(cfg, data, **kw):
    return Trainer(cfg, data=data, progress=False, log=lambda *_: None, **kw)


def _first_step_draws(tr):
    """The batch and the noise of the trainer's next step, drawn from copies of its streams."""
    import copy

    sampler, noise = copy.deepcopy(tr.rng.sampler), copy.deepcopy(tr.rng.noise)
    return sampler.uniform(tr.n) < tr.q, noise.normal(1000)


# ---------------------------------------------------------------- 1. secret sampling


def test_two_secure_runs_with_the_same_seed_draw_different_batches_and_noise(
    tiny_cfg, digits8, tmp_path
):
    cfg = tiny_cfg.replace(noise="secure")
    a = _trainer(cfg.replace(out=str(tmp_path / "a")), digits8)
    b = _trainer(cfg.replace(out=str(tmp_path / "b")), digits8)
    mask_a, z_a = _first_step_draws(a)
    mask_b, z_b = _first_step_draws(b)
    assert not torch.equal(mask_a, mask_b)
    assert not torch.equal(z_a, z_b)
    # the public seed still fixes what may be public: the initial model
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    # and what the checkpoint would hold of the streams is never a key
    state = a.rng_state()["rng"]
    assert set(state) == {"mode", "seed_key_id", "noise_nonce", "sampler", "noise", "canary"}
    assert state["sampler"] == {"draws": 0}


def test_seeded_batches_depend_on_the_secret_key_not_only_on_the_published_seed(
    tiny_cfg, digits8, tmp_path, monkeypatch
):
    a = _trainer(tiny_cfg.replace(out=str(tmp_path / "a")), digits8)
    again = _trainer(tiny_cfg.replace(out=str(tmp_path / "again")), digits8)
    assert torch.equal(_first_step_draws(a)[0], _first_step_draws(again)[0])  # reproducible
    monkeypatch.setenv("SCALEMIX_SEED_KEY", str(tmp_path / "another-key"))
    other = _trainer(tiny_cfg.replace(out=str(tmp_path / "b")), digits8)
    assert other.rng.seed_key_id != a.rng.seed_key_id
    assert not torch.equal(_first_step_draws(a)[0], _first_step_draws(other)[0])


# ---------------------------------------------------------------- 2. independent streams


def test_seeded_noise_does_not_predict_the_batch():
    """The old code drew the batch mask and the noise from one generator; here the step-1
    mask recovered from the step-1 noise (the attack of the review) is at chance level."""
    rng = RunRandomness("seeded", 0, identity="run")
    n, q = 20_000, 0.3
    u = rng.sampler.uniform(n)
    mask = u < q
    z = rng.noise.normal(n, dtype=torch.float64)
    guess = torch.from_numpy(norm.cdf(z.numpy())) < q  # the same transform, applied to noise
    agreement = float((guess == mask).double().mean())
    chance = q * q + (1 - q) * (1 - q)
    assert abs(agreement - chance) < 4 * (chance * (1 - chance) / n) ** 0.5
    r = np.corrcoef(u.numpy(), norm.cdf(z.numpy()))[0, 1]
    assert abs(r) < 4 / n**0.5


# ---------------------------------------------------------------- 3. key space


def test_key_bits_above_64_change_the_stream():
    """torch's CPU generator keeps 32 bits of a seed (the old 'secure' mode); the streams
    here are keyed by 256 bits: keys differing only in their highest bit differ."""
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5 + (1 << 40))
    assert torch.equal(torch.randn(8, generator=g1), torch.randn(8, generator=g2))  # the flaw
    key = bytearray(os.urandom(32))
    flipped = bytearray(key)
    flipped[31] ^= 0x80  # bit 255
    for lo_changed in (False, True):
        k2 = bytes(flipped)
        if lo_changed:  # and the low 64 bits identical by construction in both cases
            assert k2[:8] == bytes(key[:8])
        a = SecretStream(bytes(key), "noise").normal(64)
        b = SecretStream(k2, "noise").normal(64)
        assert not torch.equal(a, b)


def test_seed_key_is_256_bits_private_and_outside_the_run(tiny_cfg, digits8, tmp_path):
    key = load_seed_key()
    assert len(key) == 32
    path = os.environ["SCALEMIX_SEED_KEY"]
    assert os.stat(path).st_mode & 0o077 == 0  # readable by its owner only
    tr = _trainer(tiny_cfg, digits8)
    result = tr.run()
    assert result["noise"].startswith("seeded") and key_id(key) in result["noise"]
    assert "SEEDED RUN" in result["epsilon_assumes"]
    needles = [key.hex().encode(), key]
    for f in tr.run_dir.root.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert not any(n in blob for n in needles), f


def test_stream_statistics_and_state():
    s = SecretStream(bytes(32), "noise")
    z = s.normal(200_001, dtype=torch.float64)
    assert len(z) == 200_001 and s.draws == 1
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.1  # Gaussian kurtosis
    u = s.uniform(100_000)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    t = SecretStream(bytes(32), "noise")
    t.load_state_dict({"draws": 1})
    assert torch.equal(t.uniform(100_000), u)  # the draw counter is the whole state


def test_noise_is_box_muller_of_the_keystream_as_documented():
    """An independent reading of a draw's bytes, pair by pair in pure Python: 8 bytes
    little-endian and 4 more for the radius's 96-bit uniform in (0, 1], then a signed
    32-bit angle; across a piece boundary and for an odd count."""
    import math
    import struct

    from scalemix.privacy.randomness import NORMAL_BLOCK

    n = 2 * NORMAL_BLOCK + 3
    got = SecretStream(bytes(range(32)), "noise").normal(n, dtype=torch.float64)
    raw = SecretStream(bytes(range(32)), "noise").random_bytes(16 * ((n + 1) // 2))
    want = []
    for r, e, a in struct.iter_unpack("<QIi", raw):
        u = min(1.0, (r * 2**32 + e + 1) / 2**96)  # exact rational, rounded once
        radius, angle = math.sqrt(-2.0 * math.log(u)), a * 2.0 * math.pi / 2.0**32
        want += [radius * math.cos(angle), radius * math.sin(angle)]
    assert torch.allclose(got, torch.tensor(want[:n], dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_noise_read_in_pieces_is_the_one_draw(monkeypatch):
    """add_ reads a draw piece by piece (bounded memory): every tensor gets exactly its
    slice of normal() of the same draw, across piece boundaries, empty and strided
    tensors included, and the first normals do not depend on how many follow."""
    from scalemix.privacy import NoiseSource, randomness

    monkeypatch.setattr(randomness, "NORMAL_BLOCK", 3)  # pieces of 6 normals
    shapes = [(5,), (0,), (4, 3), (1,), (2, 7)]
    tensors = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    tensors[2] = tensors[2].T  # not contiguous
    NoiseSource(SecretStream(bytes(32), "noise")).add_(tensors, 2.0)
    total = sum(t.numel() for t in tensors)
    z = SecretStream(bytes(32), "noise").normal(total, dtype=torch.float64)
    got = torch.cat([t.reshape(-1) for t in tensors])
    assert torch.equal(got, 2.0 * z)
    whole = SecretStream(bytes(32), "noise").normal(total + 9, dtype=torch.float64)
    assert torch.equal(whole[:total], z)
    monkeypatch.setattr(randomness, "NORMAL_BLOCK", 2**15)  # the piece size changes nothing
    assert torch.equal(SecretStream(bytes(32), "noise").normal(total, dtype=torch.float64), z)


# ---------------------------------------------------------------- 4. preprocessing


def test_changing_one_private_image_changes_nothing_before_the_first_dp_step(
    tiny_cfg, tmp_path, monkeypatch
):
    import sklearn.datasets

    real = sklearn.datasets.load_digits

    def altered():
        d = real()
        d.images = d.images.copy()
        d.images[0] = 16.0  # a white square instead of the first training digit
        return d

    base = load_digits(size=8)
    monkeypatch.setattr(sklearn.datasets, "load_digits", altered)
    changed = load_digits(size=8)
    assert not torch.equal(base.train_x, changed.train_x)  # it is a training image
    assert (base.mean, base.std) == (changed.mean, changed.std)
    for norm_kind in ("group", "public_batch"):
        cfg = tiny_cfg.replace(norm=norm_kind, public_size=64 if norm_kind != "group" else 0)
        ta = _trainer(cfg.replace(out=str(tmp_path / f"a-{norm_kind}")), base)
        tb = _trainer(cfg.replace(out=str(tmp_path / f"b-{norm_kind}")), changed)
        assert not torch.equal(ta.train_x, tb.train_x)
        assert (ta.mean, ta.std, ta.sigma, ta.q, ta.total_steps) == (
            tb.mean,
            tb.std,
            tb.sigma,
            tb.q,
            tb.total_steps,
        )
        for (name, a), (_, b) in zip(ta.model.state_dict().items(), tb.model.state_dict().items()):
            assert torch.equal(a, b), name
        if ta.public_x is not None:
            assert torch.equal(ta.public_x, tb.public_x)
        ra, rb = ta.resolved_config(), tb.resolved_config()
        ra["resolved"]["randomness"], rb["resolved"]["randomness"] = None, None
        ra["config"]["out"] = rb["config"]["out"] = None
        assert ra == rb


# ---------------------------------------------------------------- 5. atomic accounting


def _consistent(ckpt: dict) -> None:
    steps = sum(n for _, _, n in ckpt["ledger"]["history"])
    assert steps == ckpt["step"] == ckpt["schedule"]["last_epoch"] == ckpt["ema"]["updates"]
    opt_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert opt_steps <= {ckpt["step"]}


@pytest.mark.slow
def test_a_signal_at_any_line_of_a_step_leaves_a_consistent_checkpoint(tiny_cfg, digits8, tmp_path):
    """SIGINT delivered at every line of ``train_step`` during step 2: the checkpoint agrees
    with itself (model, optimiser, schedule, EMA, ledger), and resuming it ends bit for bit
    where the uninterrupted run ends."""
    cfg = tiny_cfg.replace(epochs=3 * 16 / digits8.train_y.shape[0], batch_size=16, diag_every=0)
    full = _trainer(cfg.replace(out=str(tmp_path / "full")), digits8)
    full.run()
    assert full.step == 3
    import inspect

    code = Trainer.train_step.__code__
    lines = sorted({ln for _, _, ln in code.co_lines() if ln and ln > code.co_firstlineno})
    src, first = inspect.getsourcelines(Trainer.train_step)
    commit = first + next(i for i, t in enumerate(src) if "with deferred_signals()" in t)
    fired_at = []
    for line in lines:
        out = tmp_path / f"cut-{line}"
        # the same run as `full`, its noise reproduced
        tr = _trainer(cfg.replace(out=str(out)), digits8, noise_nonce=full.rng.noise_nonce)
        state = {"entry": None, "fired": False}

        def local(frame, event, arg, line=line, tr=tr, state=state):
            if event == "line" and frame.f_lineno == line and state["entry"] == 1:
                if not state["fired"]:
                    state["fired"] = True
                    os.kill(os.getpid(), signal.SIGINT)
            return local

        def tracer(frame, event, arg, tr=tr, state=state):
            if frame.f_code is code:
                state["entry"] = tr.step
                return local
            return None

        sys.settrace(tracer)
        try:
            tr.run()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if not state["fired"]:
            continue  # a line this step does not reach (a branch not taken)
        fired_at.append(line)
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert ckpt["step"] in (1, 2), line
        _consistent(ckpt)
        if line < commit - 3 and len(fired_at) > 1:
            continue  # before the commit nothing changed; replay a sample of lines only
        resumed = _trainer(cfg.replace(out=str(out)), digits8, resume=True)
        resumed.run()
        assert resumed.ledger.steps == 3
        for (n, a), (_, b) in zip(
            full.model.state_dict().items(), resumed.model.state_dict().items()
        ):
            assert torch.equal(a, b), (line, n)
        rows = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
        assert rows == [1, 2, 3], line
    assert len(fired_at) >= 20  # the signal really was delivered all over the step


# ---------------------------------------------------------------- 6. labelled private outputs


def test_everything_private_is_labelled_and_wandb_always_carries_the_caveat(
    tiny_cfg, digits8, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg.replace(diag_every=0, epochs=0.05)
    tr = _trainer(cfg, digits8, wandb=WandbSettings(project="t", group="g", job_type="train"))
    result = tr.run()
    stmt = json.loads((tr.run_dir.root / "privacy.json").read_text())
    columns = (tr.run_dir.root / "metrics.csv").read_text().splitlines()[0].split(",")
    private_cols = set(columns) - {"step", "epoch", "lr"}
    assert private_cols <= set(stmt["not_covered"]["metrics.csv"])
    assert "batch" in stmt["not_covered"]["metrics.csv"]
    assert {"train_seconds", "images_per_second", "status"} <= set(result["not_covered_by_epsilon"])
    assert stmt["epsilon"] == pytest.approx(result["epsilon"])
    assert stmt["epsilon_assumes"] == result["epsilon_assumes"]
    run = read_offline_run(find_run_files(tr.run_dir.root)[0])
    assert "Not covered by the DP guarantee" in run["run"]["notes"]
    assert "SEEDED RUN" in run["run"]["notes"]
    assert NOT_COVERED["metrics.csv"]["batch"].startswith("the realised batch size")


# ---------------------------------------------------------------- 7. public data


def test_public_examples_are_counted_as_unprotected(tiny_cfg, digits8, tmp_path):
    n = digits8.train_y.shape[0]
    cfg = tiny_cfg.replace(norm="public_batch", public_size=64, epochs=0.05)
    res = _trainer(cfg.replace(out=str(tmp_path / "split")), digits8).run()
    assert (res["private_examples"], res["public_examples"]) == (n - 64, 64)
    assert "NOT protected" in res["public_source"]
    # a genuinely public set: images from elsewhere; then every training example is private
    public = torch.randint(0, 256, (80, 1, 8, 8), dtype=torch.uint8)
    np.save(tmp_path / "public.npy", public.numpy())
    cfg = cfg.replace(public_source=str(tmp_path / "public.npy"), out=str(tmp_path / "file"))
    tr = _trainer(cfg, digits8)
    assert torch.equal(tr.public_x, (public[:64].float() / 255 - 0.5) / 0.5)
    res = tr.run()
    assert (res["private_examples"], res["public_examples"]) == (n, 64)
    stmt = json.loads((tmp_path / "file" / "privacy.json").read_text())
    assert stmt["protected_examples"] == n and stmt["unprotected_public_examples"] == 64
    with pytest.raises(Exception, match="N x C x H x W|shape|are"):
        np.save(tmp_path / "bad.npy", np.zeros((70, 3, 8, 8), dtype=np.uint8))
        _trainer(cfg.replace(public_source=str(tmp_path / "bad.npy")), digits8)


# ---------------------------------------------------------------- 9. resume after divergence


def test_resuming_a_diverged_run_is_refused_then_counts_what_was_released(
    tiny_cfg, digits8, tmp_path
):
    cfg = tiny_cfg.replace(checkpoint_every=50, diag_every=0)  # no checkpoint after step 3
    tr = _trainer(cfg, digits8)
    with pytest.raises(Interrupted):
        tr.run(stop_after=3)
    tr = _trainer(cfg, digits8, resume=True)  # resumes from the stop_after checkpoint at 3
    # poison the weights after the checkpoint: step 4 commits, step 5 diverges
    orig = tr.train_step

    def poisoned():
        row = orig()
        if tr.step == 4:
            with torch.no_grad():
                next(tr.model.parameters()).fill_(float("nan"))
        return row

    tr.train_step = poisoned
    cfg_ckpt = torch.load(tr.run_dir.checkpoint, weights_only=False)["step"]
    res = tr.run()
    assert res["status"] == "diverged" and cfg_ckpt == 3
    div = json.loads((tr.run_dir.root / "divergence.json").read_text())
    assert div["steps_released"] == 4 and div["diverged_at_step"] == 5
    with pytest.raises(ConfigError, match="--resume-diverged"):
        _trainer(cfg, digits8, resume=True)
    again = _trainer(cfg, digits8, resume=True, resume_diverged=True)
    assert again.step == 3  # back to the checkpoint
    assert again.ledger.steps == 4  # the released step 4 is counted however far back we go
    assert again.rng.sampler.draws >= div["stream_draws"]["sampler"]  # no replayed batches
    assert again.rng.noise.draws >= div["stream_draws"]["noise"]  # and no replayed noise
    res2 = again.run()
    assert res2["status"] == "done"
    assert res2["abandoned_steps"] == 1
    assert again.ledger.steps == res2["steps"] + res2["abandoned_steps"]
