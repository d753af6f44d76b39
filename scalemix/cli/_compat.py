"""Click's exception and parameter-source classes, wherever this Typer keeps them.

Typer >= 0.20 vendors Click as ``typer._click``; older releases use the ``click`` package.
"""

try:  # pragma: no cover - depends on the installed Typer
    from typer._click import exceptions as click_exceptions
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions
    from click.core import ParameterSource

import typer

UsageError = click_exceptions.UsageError
Exit = typer.Exit
Abort = typer.Abort
NoArgsIsHelp = getattr(click_exceptions, "NoArgsIsHelpError", None) or getattr(
    click_exceptions, "NoArgsIsHelp", UsageError
)

__all__ = ["Abort", "Exit", "NoArgsIsHelp", "ParameterSource", "UsageError"]
