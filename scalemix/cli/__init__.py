"""The ``scalemix`` command line.

``main()`` runs the Typer app without Click's standalone mode so that every error a
user can fix becomes one line on stderr and exit code 2 (usage), never a traceback:

    error: --groups 3 does not divide the 64 channels of conv1; use one of [1, 2, 4, ...]
"""

from __future__ import annotations

import sys

from scalemix.cli._compat import Abort, Exit, NoArgsIsHelp, UsageError
from scalemix.errors import ConfigError


def _command_path(argv: list[str]) -> str:
    """'scalemix train' for a usage error inside 'train' (the first word, if a command)."""
    from scalemix.cli.app import app

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    first = argv[0] if argv and argv[0] in names else None
    return "scalemix" + (f" {first}" if first else "")


def main(argv: list[str] | None = None) -> int:
    from scalemix.cli.app import app

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = app(args=argv, prog_name="scalemix", standalone_mode=False)
    except NoArgsIsHelp:  # help was printed
        return 2
    except UsageError as e:
        msg = " ".join(e.format_message().split())
        print(f"error: {msg} (see '{_command_path(argv)} --help')", file=sys.stderr)
        return 2
    except Exit as e:
        return e.exit_code
    except (Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0
