"""Entry point of the `tidar-bench` command. Command modules register on the shared Typer app;
every user mistake becomes one `error:` line on stderr and exit code 2, never a traceback: the
project's own `UserError`s and click's usage errors (unknown option, bad value, missing argument),
whichever copy of click the installed typer uses (typer >= 0.29 ships its own as `typer._click`)."""

from __future__ import annotations

import importlib
import os
import sys

from .app import app
from .. import setup_logging
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
PROG = "tidar-bench"


def _load_commands() -> None:
    for m in COMMAND_MODULES:
        importlib.import_module(m)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, NoArgsIsHelpError, Abort) classes of every click copy importable here:
    typer's own (`typer._click` with `typer.exceptions`, typer >= 0.29) and the `click` package."""
    found: dict[str, list[type]] = {"ClickException": [], "NoArgsIsHelpError": [], "Abort": []}
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for kind, classes in found.items():
            cls = getattr(mod, kind, None)
            if isinstance(cls, type) and cls not in classes:
                classes.append(cls)
    return tuple(found["ClickException"]), tuple(found["NoArgsIsHelpError"]), tuple(found["Abort"])


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def usage_error_line(e) -> str:
    """A click error as one line: its message, and for usage errors the command's --help to read."""
    line = one_line(e.format_message())
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(ctx, "command_path", None):
        line += f" (see `{ctx.command_path} --help`)"
    return line


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    _load_commands()
    click_errors, no_args, aborts = _click_exceptions()
    try:
        rc = app(args=argv, prog_name=PROG, standalone_mode=False)  # typer.Exit(n) comes back as n here
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # typer/click exit paths (--help)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except no_args as e:  # `tidar-bench CMD` with no arguments where some are needed: its help
        print(e.ctx.get_help() if getattr(e, "ctx", None) else usage_error_line(e))
        return 0
    except click_errors as e:  # usage errors: unknown option, bad value, missing argument
        print(f"error: {usage_error_line(e)}", file=sys.stderr)
        return 2
    except aborts:
        print("aborted", file=sys.stderr)
        return 1
    except OSError as e:
        if e.filename is None:
            raise
        # a file the user named cannot be read or written: their environment, not a bug
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
