"""Command-line options shared by several commands, declared once.

The model axes (``--model --norm --groups --scalenorm/--no-scalenorm --placement --ws
--act``) mean the same in ``train``, ``spp`` and every later command that builds a model.
``None`` keeps the architecture's default (``scalemix models`` lists them).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

MODEL_PANEL = "Model (default: the architecture's; see 'scalemix models')"

ModelName = Annotated[
    str,
    typer.Option(
        help="Architecture: resnet9, resnet9_tiny, resnet18, resnet50, wrn16_4, wrn40_4, nf_resnet (see `scalemix models`).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Norm = Annotated[
    Optional[str],
    typer.Option(
        help="group | layer | instance | none | public_batch | batch (batch: --non-private only).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Groups = Annotated[
    Optional[int],
    typer.Option(
        help="GroupNorm groups (1-64, min(groups, C) per layer; must divide the channels).",
        rich_help_panel=MODEL_PANEL,
    ),
]
ScaleNorm = Annotated[
    Optional[bool],
    typer.Option(
        "--scalenorm/--no-scalenorm",
        help="Extra norm right after every residual addition (Klause et al.).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Placement = Annotated[
    Optional[str],
    typer.Option(
        help="standard (conv->norm->act) | preact (norm->act->conv).", rich_help_panel=MODEL_PANEL
    ),
]
WS = Annotated[
    Optional[str],
    typer.Option(
        help="Weight standardisation: none | plain | scaled.", rich_help_panel=MODEL_PANEL
    ),
]
Act = Annotated[
    Optional[str], typer.Option(help="Activation: relu | mish | silu.", rich_help_panel=MODEL_PANEL)
]

TRACK_PANEL = "Weights & Biases"
WandbProject = Annotated[str, typer.Option(help="W&B project.", rich_help_panel=TRACK_PANEL)]
WandbEntity = Annotated[
    Optional[str], typer.Option(help="W&B entity (user or team).", rich_help_panel=TRACK_PANEL)
]
