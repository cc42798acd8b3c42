"""The Typer app object, shared by the command modules (cli_*.py) so each command lives with the
code it drives; `tidar_bench.cli` imports them all and handles user errors."""

import typer

app = typer.Typer(
    name="tidar-bench",
    help="Measure TiDAR against AR, EAGLE-style speculative and block-diffusion decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
