"""Malformed values for every configuration field, through every entry point (train
flags via --set, train --config, ablate --set, a grid file): one error line, exit 2, no
traceback, and no run directory that looks finished."""

from __future__ import annotations

import dataclasses

import pytest

from scalemix.cli import main
from scalemix.train import TrainConfig

FIELDS = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _bad_values(name: str, typ: str) -> list[str]:
    """TOML-syntax values that must be refused for this field."""
    base = typ.replace(" | None", "")
    wrong_type = '"abc"' if base in ("int", "float", "bool") else "5"
    values = [wrong_type, "[1,", "[]"]
    if base in ("int", "float"):
        values.append("-5")
    return values


CASES = [(n, v) for n, t in FIELDS.items() for v in _bad_values(n, t)] + [("no_such_field", "1")]


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _check(code, err, where):
    assert code == 2, (where, code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), (where, err)
    assert "Traceback" not in err, where
    assert len([ln for ln in lines if ln.startswith("error: ")]) == 1, (where, err)


GRID = """name = "fuzz"
seeds = [0]
[base]
model = "resnet9_tiny"
image_size = 8
{line}
[axes]
{axis}
"""


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value"), CASES, ids=[f"{f}={v}" for f, v in CASES])
def test_malformed_value_is_refused_everywhere(field, value, tmp_path, capsys):
    out = tmp_path / "run"
    # were a bad value ever accepted, the run would be tiny (these flags never mask one:
    # --set is the last layer, and a --config file is checked on its own)
    flags = {"model": "resnet9_tiny", "image_size": "8", "epochs": "0.02"}
    tiny = [x for k, v in flags.items() if k != field for x in (f"--{k.replace('_', '-')}", v)]
    # 1. scalemix train --set
    code, err = _run(
        ["train", "--out", str(out), "--quiet", *tiny, "--set", f"{field}={value}"], capsys
    )
    _check(code, err, "train --set")
    assert not (out / "result.json").exists()
    # 2. scalemix train --config FILE.toml
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"{field} = {value}\n")
    code, err = _run(["train", "--out", str(out), "--quiet", *tiny, "--config", str(cfg)], capsys)
    _check(code, err, "train --config")
    assert not (out / "result.json").exists()
    # 3. scalemix ablate --set (dry run: nothing may start)
    grid = tmp_path / "g.toml"
    axis = "lr = [0.001, 0.002]" if field == "groups" else "groups = [1, 2]"  # not the field
    grid.write_text(GRID.format(line="", axis=axis))
    argv = ["ablate", "--grid", str(grid), "--out", str(tmp_path / "grid"), "--dry-run"]
    code, err = _run([*argv, "--set", f"{field}={value}"], capsys)
    _check(code, err, "ablate --set")
    # 4. a grid file's [base]
    grid.write_text(GRID.format(line=f"{field} = {value}", axis=axis))
    code, err = _run(argv, capsys)
    _check(code, err, "grid file")
    assert not (tmp_path / "grid" / "cells").exists()
