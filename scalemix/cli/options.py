"""Command-line options generated from the configuration's declarations, and the options
that several commands share.

Each ``TrainConfig`` field declares its default, help, panel and allowed values once
(``scalemix/train/config.py``). From there ``config_option`` makes one Typer option (the
model axes ``--model --norm --groups --scalenorm/--no-scalenorm --placement --ws --act``
that ``train`` and ``spp`` share; ``None`` keeps the architecture's default),
``config_options`` gives a command a flag for every field, and ``markdown`` writes
``docs/config.md``::

    python -m scalemix.cli.options > docs/config.md
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from scalemix.cli._compat import ParameterSource
from scalemix.train.config import MODEL, PANELS, SETTINGS, TrainConfig, field_type

MODEL_PANEL = MODEL
_FIELDS = TrainConfig.__dataclass_fields__
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_CELL = {"always": "yes", "never": "no", "unless-default": "unless default"}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _off_name(name: str) -> str:
    return "no_" + name  # the --no-NAME flag of a field that may be switched off (--no-ema)


def config_option(name: str) -> Any:
    """The annotation of the option for the configuration field ``name``: its type (a path
    where the field names one), flag spelling, help and panel, all from its declaration.
    A bool that may be None gets a --x/--no-x pair; a bool that defaults to False, a --x
    flag."""
    s, (base, optional) = SETTINGS[name], field_type(_FIELDS[name])
    typ = Path if s.path else _TYPES[base]
    option = typer.Option(*_decls(name), help=s.help, rich_help_panel=s.panel)
    return Annotated[Optional[typ] if optional else typ, option]


def _decls(name: str) -> tuple[str, ...]:
    s, (base, optional) = SETTINGS[name], field_type(_FIELDS[name])
    decl = flag_name(name)
    if base == "bool" and optional:
        decl += "/" + flag_name(_off_name(name))
    return (decl, s.short) if s.short else (decl,)


def config_options(command: Callable) -> Callable:
    """Give ``command(ctx, given, **run_flags)`` an option for every configuration field
    that has a flag, before its own options (its run flags). ``given`` receives the fields
    set on the command line, as ``TrainConfig`` values: paths as strings, ``--no-ema`` as
    ``ema=None``. Typer reads the generated ``__signature__``."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    kw = inspect.Parameter.KEYWORD_ONLY
    generated = []
    for name, s in SETTINGS.items():
        if not s.flag:
            continue
        generated.append(
            inspect.Parameter(
                name, kw, default=_FIELDS[name].default, annotation=config_option(name)
            )
        )
        if s.off is not None:
            off = Annotated[
                bool, typer.Option(flag_name(_off_name(name)), help=s.off, rich_help_panel=s.panel)
            ]
            generated.append(inspect.Parameter(_off_name(name), kw, default=False, annotation=off))

    def run(ctx: typer.Context, **values):
        return command(ctx, given_fields(ctx, values), **values)

    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(run, attr, getattr(command, attr))
    run.__signature__ = inspect.Signature(
        [own[0], *generated, *(p.replace(kind=kw) for p in own[2:])]
    )
    return run


def given_fields(ctx: typer.Context, values: dict) -> dict:
    """Take the configuration flags out of ``values``; return the fields given on the
    command line (not left at their default), as ``TrainConfig`` values."""
    given = {}
    for name, s in SETTINGS.items():
        if not s.flag:
            continue
        v = values.pop(name)
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            given[name] = str(v) if s.path and v is not None else v
        if s.off is not None and values.pop(_off_name(name)):
            given[name] = None  # --no-ema wins over --ema
    return given


ModelName = config_option("model")
Norm = config_option("norm")
Groups = config_option("groups")
ScaleNorm = config_option("scalenorm")
Placement = config_option("placement")
WS = config_option("ws")
Act = config_option("act")

TRACK_PANEL = "Weights & Biases"
WandbProject = Annotated[str, typer.Option(help="W&B project.", rich_help_panel=TRACK_PANEL)]
WandbEntity = Annotated[
    Optional[str], typer.Option(help="W&B entity (user or team).", rich_help_panel=TRACK_PANEL)
]


def markdown() -> str:
    """docs/config.md: every configuration field, from its declaration."""
    lines = [
        "# Configuration fields",
        "",
        "<!-- generated from scalemix/train/config.py by `python -m scalemix.cli.options > "
        "docs/config.md`; edit the declarations, not this file -->",
        "",
        "Every field of `TrainConfig` (`scalemix/train/config.py`), as a run's `config.json`",
        "records it. One field is set in any of these ways, lowest precedence first:",
        "its default < a `--config FILE` (a run's `config.json`, or a TOML of fields at the top",
        "level or in a grid's `[base]` table) < its flag given to `scalemix train` < `--set",
        "field=value` (TOML syntax; `-` or `_` in the name). Grid files set the same fields in",
        "`[base]`, `[axes]`, `[[include]]` and presets, and `scalemix ablate --set` overrides",
        "them; every value, from every source, is checked by the same `TrainConfig.validate`.",
        "",
        "*Identity*: the field is part of `TrainConfig.identity()`, the name of what a run",
        "computes (it keys a seeded run's noise); *cell*: it is part of a grid cell's id",
        '("unless default": only when it differs from its default, so ids made before the',
        "field existed stay valid).",
    ]
    for panel in PANELS:
        lines += ["", f"## {panel}", ""]
        lines += ["| field | flag | type | default | values | identity / cell | what |"]
        lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
        for name in (n for n, s in SETTINGS.items() if s.panel == panel):
            s, f = SETTINGS[name], _FIELDS[name]
            base, optional = field_type(f)
            flags = ", ".join(f"`{d}`" for d in _decls(name)) if s.flag else "none: a file or --set"
            if s.off is not None:
                flags += f", `{flag_name(_off_name(name))}` ({s.off[0].lower()}{s.off[1:-1]})"
            values = " ".join(f"`{c}`" for c in s.choices) or ("> 0" if s.positive else "")
            kind = ("path" if s.path else base) + (" or none" if optional else "")
            default = "none" if f.default is None else f"`{json.dumps(f.default)}`"
            hashed = f"{'yes' if s.identity else 'no'} / {_CELL[s.cell]}"
            what = s.help + "".join(f" Given as a flag, it sets `{c}` to none." for c in s.clears)
            what = what.replace("|", "\\|")
            lines.append(
                f"| `{name}` | {flags} | {kind} | {default} | {values} | {hashed} | {what} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - writes docs/config.md
    print(markdown(), end="")
