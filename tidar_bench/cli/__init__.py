"""Entry point of the `tidar-bench` command. Command modules register on the shared Typer app;
known user mistakes (UserError) become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import importlib
import os
import sys

from .app import app
from ..errors import UserError

COMMAND_MODULES = (
    "tidar_bench.cli.core",
    "tidar_bench.cli.train",
    "tidar_bench.cli.train_eagle",
    "tidar_bench.cli.distill",
    "tidar_bench.cli.train_dflash",
    "tidar_bench.cli.tokens",
    "tidar_bench.cli.run",
    "tidar_bench.cli.profile",
    "tidar_bench.cli.report",
)


def _load_commands() -> None:
    for m in COMMAND_MODULES:
        importlib.import_module(m)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _load_commands()
    try:
        rc = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as n here
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # typer/click exit paths (--help, usage errors)
        return int(e.code or 0)
    except Exception as e:  # click usage errors come as ClickException in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            return 1
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
