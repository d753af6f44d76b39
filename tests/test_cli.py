"""The command line as a user meets it: bad input gives one line and exit code 2, no
traceback, and no result.json that claims success; a good run leaves a complete run dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest


def scalemix(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "scalemix", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


BAD = [
    (["train", "--data", "cifar10", "--data-dir", "/definitely/missing"], "does not exist"),
    (["train", "--data", "cifar10"], "--data-dir"),
    (["train", "--model", "resnet7"], "unknown model"),
    (["train", "--groups", "3"], "does not divide"),
    (["train", "--groups", "abc"], "--groups"),
    (["train", "--epsilon", "-1"], "--epsilon"),
    (["train", "--epsilon", "eight"], "--epsilon"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--norm", "batch"], "BatchNorm"),
    (["train", "--sampler", "shuffle"], "Poisson"),
    (["train", "--aug-mult", "4"], "--aug crop-flip"),
    (["train", "--delta", "0.01"], "1/N"),
    (["train", "--batch-size", "100000"], "larger than"),
    (["train", "--no-such-flag"], "No such option"),
    (["train", "--resume"], "no run"),
    (
        [
            "privacy",
            "epsilon",
            "--sigma",
            "1",
            "--sample-rate",
            "2",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ],
        "sample rate",
    ),
    (
        [
            "privacy",
            "sigma",
            "--epsilon",
            "-3",
            "--sample-rate",
            "0.01",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ],
        "epsilon",
    ),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2(args, needle, tmp_path):
    out = tmp_path / "run"
    extra = ["--out", str(out)] if args[0] == "train" else []
    r = scalemix(*args, *extra)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, r.stderr
    assert needle in err_lines[0]
    assert not (out / "result.json").exists()


def test_help_explains():
    r = scalemix("train", "--help")
    assert r.returncode == 0
    for flag in (
        "--epsilon",
        "--scalenorm",
        "--aug-mult",
        "--resume",
        "--non-private",
        "--physical-batch",
    ):
        assert flag in r.stdout


def test_models_lists_every_architecture():
    r = scalemix("models", "--json")
    rows = json.loads(r.stdout)
    names = {row["name"] for row in rows}
    assert {"resnet9", "resnet18", "resnet50", "wrn16_4", "wrn40_4", "nf_resnet"} <= names
    r9 = next(row for row in rows if row["name"] == "resnet9")
    assert 2.40e6 < r9["num_params"] < 2.50e6


def test_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = scalemix(
        "train",
        "--out",
        str(out),
        "--image-size",
        "8",
        "--groups",
        "8",
        "--epochs",
        "0.3",
        "--batch-size",
        "64",
        "--physical-batch",
        "64",
        "--epsilon",
        "4",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    for key in (
        "status",
        "test_acc",
        "test_acc_ema",
        "epsilon",
        "delta",
        "sigma",
        "steps",
        "sample_rate",
        "accountant",
        "train_seconds",
        "images_per_second",
        "seed",
        "version",
    ):
        assert key in result, key
    assert result["status"] == "done" and result["accountant"] == "prv"
    assert 0 < result["epsilon"] <= 4.0
    assert "secure" in result["noise"] and "never written" in result["epsilon_assumes"]
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["sigma"] == result["sigma"]
    assert config["resolved"]["sample_rate"] == pytest.approx(64 / config["resolved"]["train_size"])
    metrics = pd.read_csv(out / "metrics.csv")
    epochs = pd.read_csv(out / "epochs.csv")
    assert list(metrics["step"]) == list(range(1, result["steps"] + 1))
    # the reported accuracy is the final evaluation's, not the best one
    assert result["test_acc"] == pytest.approx(epochs["test_acc"].iloc[-1], rel=1e-5)
    assert result["evaluated_at_step"] == result["steps"]
    assert not (out / "checkpoint.pt").exists() and (out / "model.pt").exists()
    # the stdout line is JSON too
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "done"


def test_non_private_run_reports_no_epsilon(tmp_path):
    out = tmp_path / "np"
    r = scalemix(
        "train",
        "--out",
        str(out),
        "--image-size",
        "8",
        "--groups",
        "8",
        "--epochs",
        "0.1",
        "--batch-size",
        "64",
        "--non-private",
        "--norm",
        "batch",
        "--no-scalenorm",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["private"] is False and result["epsilon"] is None and result["sigma"] == 0.0


def test_config_round_trip_reproduces_a_finished_seeded_run_bit_for_bit(tmp_path):
    import torch

    a = tmp_path / "a"
    common = ["--model", "resnet9_tiny", "--image-size", "8", "--epochs", "0.3", "--quiet"]
    r = scalemix("train", *common, "--noise", "seeded", "--out", str(a))
    assert r.returncode == 0, r.stderr
    b = tmp_path / "b"
    r = scalemix("train", "--config", str(a / "config.json"), "--out", str(b))
    assert r.returncode == 0, r.stderr
    assert "configuration: defaults < " in r.stderr and "flags out" in r.stderr
    nonce = json.loads((a / "config.json").read_text())["resolved"]["randomness"]["noise_nonce"]
    assert f"--noise-nonce {nonce}" in r.stderr  # its own noise, and how to reproduce
    ma = torch.load(a / "model.pt", weights_only=False)["model"]
    mb = torch.load(b / "model.pt", weights_only=False)["model"]
    assert not all(torch.equal(ma[k], mb[k]) for k in ma)
    b = tmp_path / "b2"
    r = scalemix(
        "train", "--config", str(a / "config.json"), "--out", str(b), "--noise-nonce", nonce
    )
    assert r.returncode == 0, r.stderr
    assert "publish only one of them" in r.stderr
    ma = torch.load(a / "model.pt", weights_only=False)["model"]
    mb = torch.load(b / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    # --set beats the file and the flags; the precedence is printed
    c = tmp_path / "c"
    r = scalemix("train", "--config", str(a / "config.json"), "--out", str(c), "--set", "lr=2e-3")
    assert r.returncode == 0 and "< --set lr" in r.stderr
    assert json.loads((c / "config.json").read_text())["config"]["lr"] == 2e-3


def test_privacy_accepts_batch_dataset_epochs_and_echoes_its_inputs():
    from scalemix.privacy import epsilon_for

    r = scalemix(
        "privacy",
        "epsilon",
        "--sigma",
        "1.0",
        "--batch-size",
        "512",
        "--dataset-size",
        "50000",
        "--epochs",
        "2",
        "--delta",
        "1e-5",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    q, steps = 512 / 50000, round(2 / (512 / 50000))
    assert out["sample_rate"] == pytest.approx(q) and out["steps"] == steps
    assert out["accountant"] == "prv" and out["batch_size"] == 512 and out["epochs"] == 2
    assert out["epsilon"] == pytest.approx(
        epsilon_for(sigma=1.0, sample_rate=q, steps=steps, delta=1e-5)
    )
    r = scalemix("privacy", "epsilon", "--sigma", "1", "--delta", "1e-5")
    assert r.returncode == 2 and "sampling rate" in r.stderr
