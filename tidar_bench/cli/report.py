"""`tidar-bench plot` (figures + report.md from run / profile folders) and `tidar-bench check`
(the CI regression gate against a committed baseline). The work is in report.py and check.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app


@app.command("plot")
def plot_cmd(
    folders: list[Path] = typer.Argument(..., help="run folders (tidar-bench run), embedded-suite folders, "
                                                   "profile-latency folders and/or batched speed JSON files "
                                                   "(speed --batch-size ... --out FILE.json)"),
    out: Path = typer.Option(..., "--out", help="output folder: pareto_<task>.png/.svg, latency_*.png/.svg, "
                                                "speed_batch_*.png/.svg, report.md"),
    together: bool = typer.Option(False, "--together", help="all run folders in one figure per task (e.g. a "
                                                            "sweep stored as one run per setting); default: one "
                                                            "figure per run, pareto_<task>_<run> when several"),
) -> None:
    """Pareto figures per task (quality vs tokens/s and vs T/NFE; one colour per decoder family, a marker per
    setting, labels on the points, AR's score as the line lossless decoders sit on, speedups annotated),
    latency curves (and latency vs batch size), speedup vs batch size per decoder, and a report.md with
    the figures and the summary tables."""
    from ..provenance import portable_command
    from ..report import make_report

    command = portable_command(["tidar-bench", "plot", *folders, "--out", out] + ["--together"] * together)
    written = make_report(folders, out, together, command=command)
    print(f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written))


@app.command("check")
def check_cmd(
    run_dir: Path = typer.Argument(..., help="a run folder or embedded-suite folder"),
    baseline: Path = typer.Option(..., "--baseline", help="baseline JSON (written by --update-baseline)"),
    tolerance_se: float = typer.Option(2.0, "--tolerance-se", min=0.0,
                                       help="a score may drop by this many baseline standard errors"),
    score_tolerance: Optional[float] = typer.Option(None, "--score-tolerance", min=0.0,
                                                    help="absolute score tolerance instead of --tolerance-se"),
    rel_tolerance: float = typer.Option(0.10, "--rel-tolerance", min=0.0, max=1.0,
                                        help="T/NFE and mean accepted length may drop by this fraction"),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="write RUN_DIR's results as the new baseline"),
) -> None:
    """Regression gate: exit 1 with one line per failure (lossless mismatch, score drop, T/NFE or
    acceptance drop, missing result or file); exit 0 when the run holds up against the baseline."""
    from ..check import Tolerance, check, load_baseline
    from ..check import update_baseline as write_baseline
    from ..errors import UserError

    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a folder")
    if update_baseline:
        data = write_baseline(run_dir, baseline)
        print(f"wrote baseline {baseline} ({len(data['rows'])} rows from {run_dir})")
        return
    failures = check(run_dir, load_baseline(baseline), Tolerance(tolerance_se, score_tolerance, rel_tolerance))
    for f in failures:
        print(f"FAIL {f}")
    if failures:
        print(f"check: {len(failures)} failure(s) against {baseline}")
        raise typer.Exit(1)
    print(f"check passed: {run_dir} holds up against {baseline}")
