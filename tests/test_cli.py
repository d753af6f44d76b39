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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------- one declaration per field

# computed with the code as it was before the fields carried their declarations (commit
# 9026718): run identities key seeded noise and cell ids name grid cells on disk, so a
# refactoring of the configuration must never move them
PINNED = {
    "default": ({}, "ba4cce1d3047", "0d7991c58dbae86d693269e88ab91f9e"),
    "sigma": (
        {"sigma": 1.0, "epsilon": None, "noise": "seeded"},
        "439cdc0fa7ad",
        "f1e94a6a4c41f60de822755132dea478",
    ),
    "non-private BatchNorm": (
        {
            "non_private": True,
            "norm": "batch",
            "scalenorm": False,
            "epsilon": None,
            "sampler": "shuffle",
        },
        "8a418f860f3d",
        "76e4925bb2040a32cfc961515d13d5b8",
    ),
    "bf16, input canaries, run-only fields": (
        {
            "precision": "bf16",
            "audit_canaries": 64,
            "canary_kind": "input",
            "device": "cuda",
            "threads": 4,
            "out": "x",
        },
        "9b3f19555eba",
        "23387180b648bc14d127d75c8f318b92",
    ),
    "tiny": (
        {
            "model": "resnet9_tiny",
            "image_size": 8,
            "epochs": 0.3,
            "ema": None,
            "aug": "crop-flip",
            "aug_mult": 4,
            "data_dir": "/d",
            "groups": 8,
            "lr": 2e-3,
            "checkpoint_every": 7,
        },
        "4b8b134ce9be",
        "496ce1a16079e9f56e6256a22327174e",
    ),
    "gradient canaries": (
        {"audit_canaries": 10},
        "799e78aa098d",
        "0d7991c58dbae86d693269e88ab91f9e",
    ),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_cell_ids_and_run_identities_are_pinned(name):
    from scalemix.ablate.grid import cell_hash
    from scalemix.train import TrainConfig

    fields, cell, identity = PINNED[name]
    cfg = TrainConfig(**fields).validate()
    assert cell_hash(cfg) == cell
    assert cfg.identity() == identity


def test_docs_config_md_is_generated_from_the_declarations():
    from pathlib import Path

    from scalemix.cli.options import markdown

    committed = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert committed == markdown(), "run: python -m scalemix.cli.options > docs/config.md"


def test_train_options_are_the_declared_fields():
    """Every field with a flag is one option of 'train', with its declared help, panel and
    default; the bool pairs and --no-ema are there; nothing else is a config option."""
    import typer

    from scalemix.cli.app import app
    from scalemix.train.config import SETTINGS, TrainConfig

    cmd = typer.main.get_command(app).commands["train"]
    params = {p.name: p for p in cmd.params}
    defaults = TrainConfig()
    for name, s in SETTINGS.items():
        if not s.flag:
            assert name not in params
            continue
        p = params[name]
        assert p.help == s.help and p.rich_help_panel == s.panel, name
        assert p.opts[0] == "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        assert p.default == default or (s.path and str(p.default) == default), name
    assert params["scalenorm"].secondary_opts == ["--no-scalenorm"]
    assert params["no_ema"].opts == ["--no-ema"] and params["out"].opts == ["--out", "-o"]
    run_flags = {"no_ema", "wandb", "wandb_project", "wandb_entity", "wandb_group"}
    run_flags |= {"resume", "resume_diverged", "config", "set_", "quiet", "noise_nonce", "nproc"}
    assert set(params) == {n for n, s in SETTINGS.items() if s.flag} | run_flags


def test_every_allowed_value_is_named_in_its_help():
    """The help of a field with choices names each of them (the help and the choices
    once drifted apart: aug's 'crop', noise's 'seeded-shared')."""
    import re

    from scalemix.train.config import SETTINGS

    for name, s in SETTINGS.items():
        words = set(re.findall(r"[\w-]+", s.help))
        assert set(s.choices) <= words, (name, set(s.choices) - words)


def test_model_help_names_every_architecture():
    from scalemix.models import list_models
    from scalemix.train.config import SETTINGS

    named = SETTINGS["model"].help.split(":", 1)[1].split("(")[0]
    assert sorted(n.strip() for n in named.split(",")) == list_models()


@pytest.fixture
def fake_training(monkeypatch):
    """'scalemix train' up to the loop: the configuration it would train."""
    import scalemix.train.loop as loop

    seen = {}

    def train(cfg, **kw):
        seen.update(cfg=cfg, **kw)
        return {"status": "done"}

    monkeypatch.setattr(loop, "train", train)
    return seen


def _train(argv, capsys):
    from scalemix.cli import main

    code = main(["train", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # the sigma/epsilon rule: a given --sigma or --non-private leaves no target epsilon
        (["--sigma", "1", "--epsilon", "4"], {"sigma": 1.0, "epsilon": None}),
        (["--non-private"], {"non_private": True, "epsilon": None}),
        # ... on the command line only: a --set sigma (or a grid's) keeps the default
        # epsilon, as it always has (changing it would move grid cell ids)
        (["--set", "sigma=1"], {"sigma": 1, "epsilon": 8.0}),
        (["--no-ema"], {"ema": None}),
        (["--ema", "0.5", "--no-ema"], {"ema": None}),
        (["--ema", "0.5"], {"ema": 0.5}),
        (["--no-scalenorm"], {"scalenorm": False}),
        (["--scalenorm"], {"scalenorm": True}),
        (["--data-dir", "/tmp/d/"], {"data_dir": "/tmp/d"}),
        (["-o", "/tmp/o"], {"out": "/tmp/o"}),
        (["--set", "momentum=0.95"], {"momentum": 0.95}),
        ([], {"epsilon": 8.0, "ema": 0.999, "scalenorm": None, "out": "runs/train"}),
    ],
)
def test_flags_set_their_fields(argv, expected, fake_training, capsys):
    code, err = _train(["--quiet", *argv], capsys)
    assert code == 0, err
    cfg = fake_training["cfg"]
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_layers_defaults_file_flags_set(tmp_path, fake_training, capsys):
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.002\nepsilon = 4.0\nbatch_size = 128\n")
    argv = ["--config", str(f), "--sigma", "1", "--batch-size", "64", "--set", "lr=3e-3"]
    code, err = _train(argv, capsys)
    assert code == 0, err
    cfg = fake_training["cfg"]
    assert (cfg.lr, cfg.epsilon, cfg.sigma, cfg.batch_size) == (3e-3, None, 1.0, 64)
    assert f"configuration: defaults < {f} (3 fields) < flags batch_size, epsilon, sigma" in err
    assert err.splitlines()[0].endswith("< --set lr")


def test_resume_refuses_flags_that_differ_from_the_run(tmp_path, fake_training, capsys):
    from scalemix.train import TrainConfig

    out = tmp_path / "run"
    out.mkdir()
    stored = TrainConfig(out=str(out), lr=0.002, ema=None)
    (out / "config.json").write_text(json.dumps({"config": stored.as_dict()}))
    code, err = _train(["--out", str(out), "--resume", "--lr", "0.5", "--quiet"], capsys)
    assert code == 2 and "--lr differ from the run" in err
    code, err = _train(["--out", str(out), "--resume", "--ema", "0.9", "--quiet"], capsys)
    assert code == 2 and "--ema differ from the run" in err
    # the same values (--no-ema is ema = None), or none at all, resume the stored run
    argv = ["--out", str(out), "--resume", "--lr", "0.002", "--no-ema", "--threads", "3", "-q"]
    code, err = _train(argv, capsys)
    assert code == 2 and "--threads differ" in err  # threads are compared too, as before
    code, err = _train(["--out", str(out), "--resume", "--lr", "0.002", "--no-ema", "-q"], capsys)
    assert code == 0, err
    assert fake_training["cfg"] == stored and fake_training["resume"] is True
