"""The embedded default: `tidar-bench run` with no --model runs every decoder on the mini tasks with
the model suite shipped in `tidar_bench/embedded/` (built by `scripts/build_embedded.py`).

The suite is three checkpoints of one architecture, so it is three ordinary runs (each a normal run
folder, resumable like any other) plus one combined table:

    base/   the AR base:           ar, hf, eagle (the shipped EAGLE-3 head as --draft), dflash (the shipped
                                   DFlash drafter, as dflash.draft)
    tidar/  TiDAR from the base:   ar (the checkpoint's own AR mode: TiDAR's lossless reference), tidar
    bd/     block diffusion:       ar (speed reference only: a BD model is not trained for AR use), bd

`summary.csv` at the top has one row per (task, model, decoder). `speedup_vs_ar` and
`mismatches_vs_ar` are those of the sub-run: against the `ar` of the same checkpoint, decoded in the
same process minutes apart (paired: on a shared CPU, tokens/s of identical models drifts by 10-15%
between separate runs). All checkpoints have one architecture, so every `ar` costs the same per token."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UserError
from ..provenance import environment
from .results import SUMMARY_COLUMNS, write_csv, write_json
from .runner import RunSpec, check_out_folder, run
from .tasks import MINI_TASKS

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "embedded"
GROUPS = (  # sub-folder, checkpoint, draft head, decoders
    ("base", "base", "eagle", ("ar", "hf", "eagle", "dflash", "lookup")),
    ("tidar", "tidar", None, ("ar", "tidar")),
    ("bd", "bd", None, ("ar", "bd")),
)
SUITE_FILE = "suite.json"
# On a CPU no token slot is free: feeding all k pre-draft blocks (k + k*k = 72 tokens at k = 8) costs
# more than the drafts save, so the suite caps them at 3 (the all-accepted outcome and the two likeliest
# others; still lossless). `--decoder-arg tidar.max_blocks=8` restores the paper's full layout.
SUITE_DECODER_ARGS = ("tidar.max_blocks=3",)
# decoder -> shipped drafter folder, passed as `<decoder>.draft=DIR` (the group's --draft is eagle's head)
DRAFTERS = {"dflash": "dflash"}
NUMERIC = {"score": float, "stderr": float, "tokens_per_s": float, "tokens_per_nfe": float,
           "mean_accepted_length": float, "accept_length": float, "speedup_vs_ar": float, "n": int,
           "mismatches_vs_ar": int, "lossy_mismatches_vs_ar": int}


def embedded_dir() -> Path:
    missing = [c for c in ("base", "eagle", "tidar", "bd", *DRAFTERS.values())
               if not (EMBEDDED_DIR / c / "config.json").is_file()]
    if missing:
        raise UserError(f"the embedded model suite is incomplete in {EMBEDDED_DIR} (missing: {', '.join(missing)}); "
                        "rebuild it with `python scripts/build_embedded.py` or pass --model")
    return EMBEDDED_DIR


def default_tasks(allow_code_exec: bool) -> list[str]:
    """mini_gsm and mini_math always; mini_code only with the code-execution opt-in."""
    from .tasks import code_exec_allowed

    return [t for t in MINI_TASKS if t != "mini_code" or code_exec_allowed(allow_code_exec)]


def run_embedded(out: Path, tasks: list[str] | None = None, limit: int | None = None, device: str = "cpu",
                 seed: int = 0, allow_code_exec: bool = False, decoder_args: list[str] | None = None,
                 compile: str = "auto") -> dict:
    root = embedded_dir()
    tasks = list(tasks) if tasks else default_tasks(allow_code_exec)
    identity = {"suite": "embedded", "tasks": tasks, "limit": limit, "device": device, "seed": seed,
                "decoder_args": list(decoder_args or []), "compile": compile}
    check_out_folder(out, identity)
    out = Path(out)
    t0 = time.perf_counter()
    from ..registry import decoders as registered, split_decoder_arg

    options = {d: registered()[d].option_types() for *_, names in GROUPS for d in names}

    def takes(arg: str, names: tuple[str, ...]) -> bool:
        return split_decoder_arg(arg, list(options))[0] in names

    for a in decoder_args or []:
        if split_decoder_arg(a, list(options))[0] is None:
            raise UserError(f"--decoder-arg {a!r}: the embedded suite runs several decoders ({', '.join(options)}); "
                            "write DECODER.key=value")
        if not any(takes(a, names) for *_, names in GROUPS):
            raise UserError(f"--decoder-arg {a!r}: no decoder of the embedded suite takes it "
                            f"(decoders: {', '.join(options)})")
    specs = []
    for sub, ckpt, draft, decoders in GROUPS:
        suite_args = [*SUITE_DECODER_ARGS, *(f"{d}.draft={root / f}" for d, f in DRAFTERS.items())]
        args = [a for a in [*suite_args, *(decoder_args or [])] if takes(a, decoders)]
        specs.append((sub, RunSpec(model=root / ckpt, decoders=list(decoders), tasks=tasks, out=out / sub,
                                   draft=root / draft if draft else None, limit=limit, device=device, dtype="float32",
                                   seed=seed, decoder_args=args, allow_code_exec=allow_code_exec, compile=compile)))
    from .runner import SPEC_FILE, prepare

    for _, spec in specs:  # validate every sub-run before anything is written
        prepare(spec)
    write_json(out / SPEC_FILE, {"identity": identity, "command": command_line(identity)})
    infos = {}
    for sub, spec in specs:
        infos[sub] = run(spec)["info"]
    rows = combine(out, [sub for sub, _ in specs])
    info = {"command": command_line(identity), "identity": identity, "environment": environment(), "seed": seed,
            "models": {sub: str(spec.model.relative_to(root.parent)) for sub, spec in specs},
            "runs": {sub: {"command": infos[sub]["command"], "overhead_fraction": infos[sub]["overhead_fraction"],
                           "mismatches_vs_ar": infos[sub]["mismatches_vs_ar"]} for sub in infos},
            "wall_s_this_invocation": time.perf_counter() - t0}
    write_csv(out / "summary.csv", rows, columns=("model",) + tuple(SUMMARY_COLUMNS))
    write_json(out / SUITE_FILE, info)
    return {"info": info, "rows": rows}


def command_line(identity: dict) -> str:
    parts = ["tidar-bench", "run", "--tasks", ",".join(identity["tasks"]), "--device", identity["device"],
             "--seed", str(identity["seed"])]
    if identity["limit"] is not None:
        parts += ["--limit", str(identity["limit"])]
    for a in identity["decoder_args"]:
        parts += ["--decoder-arg", a]
    if identity.get("compile", "auto") != "auto":
        parts += ["--compile", identity["compile"]]
    if "mini_code" in identity["tasks"]:
        parts.append("--allow-code-exec")
    return " ".join(parts)


def combine(out: Path, subs: list[str]) -> list[dict]:
    """One table from the sub-runs' summary.csv, with a model column."""
    import csv

    rows = []
    for sub in subs:
        with (Path(out) / sub / "summary.csv").open() as f:
            for r in csv.DictReader(f):
                row = {"model": sub, **r}
                for k in NUMERIC:
                    row[k] = NUMERIC[k](row[k]) if row.get(k) not in (None, "") else None
                rows.append(row)
    return rows
