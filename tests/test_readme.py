"""The README's first screen agrees with what a run produces: every file its run-directory
table lists is written by a run (and nothing it writes at the top level is missing from
the table), and the embedded data set's split is the one it states."""

from __future__ import annotations

import json
import re
from pathlib import Path

from scalemix.data import load_data
from scalemix.train import Trainer

README = Path(__file__).resolve().parent.parent / "README.md"


def _listed_files() -> set[str]:
    text = README.read_text()
    start = text.index("leaves in `runs/demo/`:")
    table = text[start : text.index("\n\n", text.index("| file | what |", start))]
    names = set()
    for line in table.splitlines()[2:]:
        first = line.split("|")[1]
        names |= set(re.findall(r"`([^`]+)`", first))
    return names


def test_every_file_the_readme_lists_is_written_by_a_run(tiny_cfg, digits8):
    listed = _listed_files()
    assert {"config.json", "result.json", "released.json"} <= listed
    cfg = tiny_cfg.replace(diag_every=2)
    Trainer(cfg, data=digits8, progress=False, log=lambda *_: None).run()
    written = {p.name for p in Path(cfg.out).iterdir() if p.is_file()}
    assert listed <= written, sorted(listed - written)
    assert written <= listed, sorted(written - listed)  # nothing undocumented
    # config.json shows the values the run used first (the model's defaults resolved)
    saved = json.loads((Path(cfg.out) / "config.json").read_text())
    assert next(iter(saved)) == "run"
    run = saved["run"]
    assert run["norm"] == "group" and run["groups"] == 8 and run["scalenorm"] is not None
    assert run["private_examples"] == len(digits8.train_y) and run["sigma"] == 1.0


def test_the_readme_states_the_digits_split_as_it_is():
    d = load_data("digits")
    n_train, n_test = len(d.train_y), len(d.test_y)
    assert f"{n_train:,} train / {n_test:,} test" in README.read_text()
