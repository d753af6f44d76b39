"""Ablation grids as data: a TOML file expands into cells, each a fully resolved config.

A grid file (``ablations/NAME.toml``)::

    name = "gn_groups"
    description = "..."
    seeds = [0, 1, 2]

    [base]                      # TrainConfig fields shared by every cell
    model = "resnet9"
    epsilon = 8.0

    [axes]                      # Cartesian product, in the order written
    groups = [1, 2, 4, 8]       # a list: values of the TrainConfig field of that name
    [axes.variant]              # a table: named variants, each a set of field values
    gn = { norm = "group" }
    ln = { norm = "layer" }

    [[include]]                 # extra cells (axis labels; optional extra fields)
    groups = 3
    [[exclude]]                 # drop every cell whose axes match all given labels
    groups = 8

    [report]                    # the analysis plan, fixed by the grid's first 'ablate'
    primary = "groups"          # the many-valued axis (omnibus test, x axis of plots)
    paired = "scalenorm"        # compared on shared seeds at each primary value
    questions = ["scalenorm", "groups x scalenorm"]  # grid-model terms that are primary
    metric = "raw"              # "raw": final weights' test accuracy; "ema": the EMA's
    alpha = 0.05
    correction = "holm"         # or "gatekeeping": the families in 'order', each gated
    sesoi = 1.0                 # smallest effect of interest (accuracy points): equivalence

    [presets.quick]             # overrides: base (merged), axes (replaced per axis), seeds,
    description = "..."         # report (merged), and what the preset runs
    seeds = [0, 1]
    [presets.quick.base]
    data = "digits"

Cells use ``noise = "seeded"`` unless the grid says otherwise: the cells of one seed then
share batches and augmentations (common random numbers that sharpen paired comparisons),
never noise, and the grid's joint epsilon accounts for the shared batches
(``privacy/grid.py``).

A cell is named by the SHA-256 of its fully resolved configuration (model axes filled
in from the architecture's defaults; the fields whose declaration in
``scalemix/train/config.py`` says ``cell="never"``, such as ``out`` and ``threads``, left
out), so the same experiment gets the same name in every grid. Every value of a grid file,
its presets and ``--set`` is checked by ``TrainConfig.validate``, the one validator that
``scalemix train`` uses too.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from scalemix.errors import ConfigError
from scalemix.train.config import SETTINGS, TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# from the fields' declarations (Setting.cell): fields that do not change the experiment,
# and fields added after grids had run (left out at their default, so old ids stay valid)
NOT_HASHED = tuple(k for k, s in SETTINGS.items() if s.cell == "never")
HASHED_UNLESS_DEFAULT = {
    k: TrainConfig.__dataclass_fields__[k].default
    for k, s in SETTINGS.items()
    if s.cell == "unless-default"
}


def grid_dirs() -> list[Path]:
    """Where grid names are looked up: $SCALEMIX_GRIDS, then the checkout's ablations/."""
    dirs = []
    if env := os.environ.get("SCALEMIX_GRIDS"):
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parents[2] / "ablations")
    return dirs


def available_grids() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in grid_dirs():
        for p in sorted(d.glob("*.toml")) if d.is_dir() else []:
            found.setdefault(p.stem, p)
    return found


def find_grid(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or os.sep in name_or_path:
        if not p.is_file():
            raise ConfigError(f"grid file {p} does not exist")
        return p
    grids = available_grids()
    if name_or_path not in grids:
        known = ", ".join(grids) or "none found"
        raise ConfigError(
            f"unknown grid {name_or_path!r}; known grids: {known} (or give a path to a .toml file)"
        )
    return grids[name_or_path]


def parse_value(text: str, key: str = "value"):
    """A --set value: TOML syntax when it parses (1, 1.5, true, "x", [1, 2]), else a string.

    Text that opens a list, table or quoted string but does not parse is an error (a
    missing bracket is a typo, not a string); so is an empty value or an empty list."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if not text or text[0] in "[{\"'" or text[-1] in "]}\"'":
            raise ConfigError(
                f"--set {key}={text}: not a valid value (unbalanced brackets or quotes?); "
                'write numbers as 1 or 1.5, lists as [1, 8], strings as x or "x"'
            ) from None
        return text
    if value == [] or value == {}:
        raise ConfigError(f"--set {key}={text}: an empty list leaves nothing to run")
    return value


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set epochs=2")
        k, v = item.split("=", 1)
        key = k.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"--set {item!r}: the key before '=' is empty")
        out[key] = parse_value(v.strip(), key)
    return out


@dataclass
class Cell:
    id: str  # hash of the resolved configuration (12 hex digits)
    axes: dict  # axis name -> label (scalars for list axes, variant names for tables)
    seed: int
    config: TrainConfig  # without ``out``

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.axes.items()) + f" seed={self.seed}"


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    preset: str | None
    base: dict
    axes: dict  # axis -> list of labels or {variant: overrides}
    seeds: list[int]
    include: list[dict] = field(default_factory=list)
    exclude: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    presets: list[str] = field(default_factory=list)
    sets: dict = field(default_factory=dict)
    preset_description: str = ""  # what the preset runs (a preset may change the study)

    # ------------------------------------------------------------------ expansion

    def _overrides(self, axis: str, label) -> dict:
        spec = self.axes[axis]
        if isinstance(spec, dict):
            return dict(spec[label])
        return {axis: label}

    def cells(self) -> list[Cell]:
        names = list(self.axes)
        labels = [list(v) if isinstance(v, dict) else list(v) for v in self.axes.values()]
        combos = [dict(zip(names, c)) for c in itertools.product(*labels)]
        for inc in self.include:
            combo = {k: inc[k] for k in names if k in inc}
            missing = [k for k in names if k not in combo]
            if missing:
                raise ConfigError(
                    f"grid {self.name}: an [[include]] entry lacks the axes {', '.join(missing)}"
                )
            extra = {k: v for k, v in inc.items() if k not in names}
            combos.append({**combo, "__extra__": extra})
        combos = [
            c
            for c in combos
            if not any(all(c.get(k) == v for k, v in ex.items()) for ex in self.exclude)
        ]
        out, seen = [], set()
        for combo in combos:
            extra = combo.pop("__extra__", {})
            for seed in self.seeds:
                values = dict(self.base)
                for axis, label in combo.items():
                    if isinstance(self.axes[axis], dict) and label not in self.axes[axis]:
                        raise ConfigError(f"grid {self.name}: axis {axis} has no variant {label!r}")
                    values.update(self._overrides(axis, label))
                values.update(extra)
                values.update(self.sets)
                values["seed"] = seed
                cfg = _config(values, f"grid {self.name}, cell {combo}")
                cid = cell_hash(cfg)
                if cid in seen:
                    continue  # two axis labels that resolve to the same experiment
                seen.add(cid)
                out.append(Cell(cid, dict(combo), seed, cfg))
        if not out:
            raise ConfigError(f"grid {self.name}: the axes, includes and excludes leave no cell")
        return out

    def summary(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "description": self.description,
            "preset": self.preset,
            "preset_description": self.preset_description,
            "base": {**self.base, **self.sets},  # what every cell shares (preset, --set applied)
            "axes": {k: list(v) for k, v in self.axes.items()},
            "seeds": self.seeds,
            "report": self.report,
            "sets": self.sets,
        }


def _config(values: dict, where: str) -> TrainConfig:
    try:
        cfg = TrainConfig.from_dict(values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


REPORT_KEYS = ("primary", "paired", "questions", "metric", "alpha", "correction", "order", "sesoi")
METRICS = {
    "raw": "test_acc",
    "ema": "test_acc_ema",
    "test_acc": "test_acc",
    "test_acc_ema": "test_acc_ema",
}
FAMILIES = ("interaction", "main effects", "simple effects")
REPORT_DEFAULTS = {
    "metric": "raw",  # the final test accuracy of the raw weights; "ema": of the EMA weights
    "alpha": 0.05,
    "correction": "holm",  # one Holm over the primary tests; "gatekeeping": families in order
    "order": list(FAMILIES),
    "sesoi": None,  # the smallest effect of interest, in accuracy points (equivalence tests)
}


def normalise_report(rep: dict) -> dict:
    """The [report] table with every analysis-plan key present (defaults filled in, the
    metric named "raw" or "ema"): two tables that normalise equally are the same plan."""
    out = {**REPORT_DEFAULTS, **{k: v for k, v in rep.items() if v is not None}}
    out["metric"] = "ema" if METRICS.get(out["metric"], out["metric"]) == "test_acc_ema" else "raw"
    out["questions"] = [
        " x ".join(t.strip() for t in q.split(" x ")) for q in out.get("questions", [])
    ]
    out["order"] = list(out["order"])
    out["alpha"] = float(out["alpha"])
    if out["sesoi"] is not None:
        out["sesoi"] = float(out["sesoi"])
    return {k: out[k] for k in sorted(out)}


def check_report(rep: dict, axes: dict, path) -> dict:
    """Validate the grid's [report] table (its analysis plan): its axes exist, every
    primary question names a term of the grid model ("a" or "a x b"), the metric, alpha,
    correction, family order and smallest effect of interest are well-formed. Returns it
    normalised (``normalise_report``)."""
    where = f"grid file {path}, [report]"
    unknown = set(rep) - set(REPORT_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(REPORT_KEYS)})"
        )
    for key in ("primary", "paired"):
        if key in rep and rep[key] not in axes:
            raise ConfigError(
                f"{where}: {key} = {rep[key]!r} is not an axis (axes: {', '.join(axes)})"
            )
    questions = rep.get("questions", [])
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise ConfigError(f'{where}: questions is a list of terms, e.g. ["scalenorm", "a x b"]')
    for q in questions:
        parts = [t.strip() for t in q.split(" x ")]
        bad = [t for t in parts if t not in axes]
        if bad or len(set(parts)) != len(parts):
            raise ConfigError(
                f"{where}: question {q!r} is not a grid-model term; name an axis "
                f"({', '.join(axes)}) or an interaction written 'a x b'"
            )
    if "metric" in rep and rep["metric"] not in METRICS:
        raise ConfigError(
            f'{where}: metric = {rep["metric"]!r}; use "raw" (the final weights) or "ema" '
            "(the EMA of the weights)"
        )
    alpha = rep.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise ConfigError(f"{where}: alpha = {alpha!r}; a number between 0 and 0.5, e.g. 0.05")
    if rep.get("correction", "holm") not in ("holm", "gatekeeping"):
        raise ConfigError(
            f'{where}: correction = {rep["correction"]!r}; "holm" (one Holm over the primary '
            "tests) or \"gatekeeping\" (families tested in 'order')"
        )
    order = rep.get("order", list(FAMILIES))
    if (
        not isinstance(order, list)
        or not order
        or any(f not in FAMILIES for f in order)
        or len(set(order)) != len(order)
    ):
        raise ConfigError(
            f"{where}: order = {order!r}; a list of distinct families from "
            + ", ".join(repr(f) for f in FAMILIES)
        )
    sesoi = rep.get("sesoi")
    if sesoi is not None and (
        isinstance(sesoi, bool) or not isinstance(sesoi, (int, float)) or not 0 < sesoi < 100
    ):
        raise ConfigError(
            f"{where}: sesoi = {sesoi!r}; the smallest effect of interest in accuracy points, "
            "e.g. 1.0"
        )
    return normalise_report(rep)


def resolved_dict(cfg: TrainConfig) -> dict:
    d = cfg.as_dict()
    d.update(cfg.model_axes().as_dict())  # fill in the architecture's default axes
    for k in NOT_HASHED:
        d.pop(k, None)
    for k, default in HASHED_UNLESS_DEFAULT.items():  # fields added later: old ids stay valid
        if d.get(k) == default:
            d.pop(k)
    return d


def cell_hash(cfg: TrainConfig) -> str:
    blob = json.dumps(resolved_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_grid(name_or_path: str, preset: str | None = None, sets: dict | None = None) -> Grid:
    path = find_grid(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"grid file {path}: invalid TOML ({e})") from None
    known = {
        "name",
        "description",
        "seeds",
        "base",
        "axes",
        "include",
        "exclude",
        "report",
        "presets",
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"grid file {path}: unknown keys {', '.join(sorted(unknown))}")
    presets = raw.get("presets", {})
    # Seeded noise inside grids: the cells of one seed share batches (common random
    # numbers for paired comparisons); its epsilon assumes the seed key stays secret.
    base = {"noise": "seeded", **raw.get("base", {})}
    report = dict(raw.get("report", {}))
    preset_description = ""
    axes = copy.deepcopy(raw.get("axes", {}))
    seeds = list(raw.get("seeds", [0]))
    if preset is not None:
        if preset not in presets:
            raise ConfigError(
                f"grid {raw.get('name', path.stem)} has no preset {preset!r}; "
                f"presets: {', '.join(presets) or 'none'}"
            )
        p = presets[preset]
        unknown_p = set(p) - {"base", "axes", "seeds", "description", "report"}
        if unknown_p:
            raise ConfigError(
                f"grid file {path}, [presets.{preset}]: unknown keys "
                f"{', '.join(sorted(unknown_p))} (known: base, axes, seeds, description, report)"
            )
        base.update(p.get("base", {}))
        report = {**report, **p.get("report", {})}
        preset_description = p.get("description", "")
        axes.update(copy.deepcopy(p.get("axes", {})))
        seeds = list(p.get("seeds", seeds))
    for axis, spec in axes.items():
        if not isinstance(spec, (list, dict)) or not spec:
            raise ConfigError(f"grid file {path}: axis {axis} must be a non-empty list or table")
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"grid file {path}: seeds must be a non-empty list of integers")
    sets = dict(sets or {})
    for where, fields_ in (("--set", sets), (f"grid file {path} [base]", base)):
        if "seed" in fields_:
            raise ConfigError(
                f"{where}: seed is set per cell from the grid's seeds; use seeds = [0, 1, 2] "
                "(--set seeds=[0,1,2])"
            )
        if "out" in fields_:
            raise ConfigError(f"{where}: out is chosen per cell; use 'scalemix ablate --out DIR'")
    for k in list(sets):
        if k == "seeds":
            v = sets.pop(k)
            seeds = list(v) if isinstance(v, list) else [v]
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise ConfigError(
                    f"--set seeds={v!r}: seeds are integers, e.g. --set seeds=[0,1,2]"
                )
        elif k in axes:  # --set groups=[1,2] replaces an axis
            v = sets.pop(k)
            axes[k] = v if isinstance(v, list) else [v]
    return Grid(
        name=raw.get("name", path.stem),
        path=path,
        description=raw.get("description", ""),
        preset=preset,
        base=base,
        axes=axes,
        seeds=seeds,
        include=list(raw.get("include", [])),
        exclude=list(raw.get("exclude", [])),
        report=check_report(report, axes, path),
        preset_description=" ".join(str(preset_description).split()),
        presets=list(presets),
        sets=sets,
    )
