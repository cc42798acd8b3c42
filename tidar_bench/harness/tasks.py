"""The benchmark tasks tidar-bench ships: names, data, checksums, and the lm-eval TaskManager.

The task YAMLs live in `tasks/` (repository root) and mirror lm-eval 0.4.13's own `humaneval`, `mbpp`,
`gsm8k`, `gsm8k_cot` and `minerva_math` configs, and the instruct variants `humaneval_instruct`,
`mbpp_instruct`, `gsm8k_cot_zeroshot`, `gsm8k_cot_llama` and `gsm8k_llama` (llama3/instruct) (prompts, few-shot settings, stop sequences,
max_gen_toks, filters, metrics). They differ in three ways only:
- names carry a `tb_` prefix so they never collide with lm-eval's builtins (results are keyed by it);
- data come from `tasks/data/` (checked against `tasks/data/SHA256SUMS` on every load) through a
  `custom_dataset` loader, so nothing touches the HF Hub and nothing depends on the working directory;
- code tasks score pass@1 with tidar-bench's own sandbox (`sandbox.py`) instead of `evaluate`'s
  `code_eval` (a Hub download). Metric key: `pass@1,create_test` for both code tasks (lm-eval's mbpp
  names it `pass_at_1,none`).

`resolve_tasks(names, hub=True)` returns lm-eval's builtin task names instead (data from the Hub;
the code tasks then also need `evaluate.load("code_eval")` from the Hub and HF_ALLOW_CODE_EVAL=1,
which `code_exec_allowed(True)` sets).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from . import sandbox

TASKS_ENV = "TIDAR_BENCH_TASKS_DIR"

MINERVA_SUBJECTS = {  # lm-eval subject name -> MATH `type`
    "algebra": "Algebra",
    "counting_and_prob": "Counting & Probability",
    "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra",
    "num_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalc": "Precalculus",
}

# user name -> lm-eval builtin task name (hub) ; shipped task name = "tb_" + builtin name
_BUILTIN = {
    "humaneval": "humaneval",
    "mbpp": "mbpp",
    "gsm8k": "gsm8k",
    "gsm8k_cot": "gsm8k_cot",
    "minerva_math": "minerva_math",
    # instruct / chat variants (use with --apply-chat-template on instruct models)
    "humaneval_instruct": "humaneval_instruct",
    "mbpp_instruct": "mbpp_instruct",
    "gsm8k_cot_zeroshot": "gsm8k_cot_zeroshot",
    "gsm8k_cot_llama": "gsm8k_cot_llama",
    "gsm8k_llama": "gsm8k_llama",
    **{f"minerva_math_{s}": f"minerva_math_{s}" for s in MINERVA_SUBJECTS},
}
# the embedded default's mini tasks: held-out items of tidar_bench/corpus.py (shipped only, no Hub twin)
MINI_TASKS = ("mini_gsm", "mini_code", "mini_math")
TASK_ALIASES = {user: f"tb_{name}" for user, name in _BUILTIN.items()} | {m: f"tb_{m}" for m in MINI_TASKS}
HUB_TASK_ALIASES = dict(_BUILTIN)
CODE_TASKS = frozenset({"tb_humaneval", "tb_mbpp", "tb_mini_code", "humaneval", "mbpp", "tb_humaneval_instruct",
                        "tb_mbpp_instruct", "humaneval_instruct", "mbpp_instruct"})

# dataset name -> data files (relative to the data dir) it reads
DATA_FILES = {
    "humaneval": ("humaneval/HumanEval.jsonl.gz",),
    "mbpp": ("mbpp/mbpp.jsonl",),
    "gsm8k": ("gsm8k/train.jsonl", "gsm8k/test.jsonl"),
    "math": ("math/test.jsonl",),
    **{m: (f"mini/{m.removeprefix('mini_')}.jsonl",) for m in MINI_TASKS},
}
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


def tasks_dir() -> Path:
    """The shipped task folder: $TIDAR_BENCH_TASKS_DIR, else `tasks/` beside the package."""
    d = Path(os.environ.get(TASKS_ENV) or Path(__file__).resolve().parents[2] / "tasks")
    if not (d / "data" / "SHA256SUMS").is_file():
        raise UserError(f"tidar-bench task folder not found at {d} (install from a source checkout with "
                        f"`pip install -e .`, or set {TASKS_ENV})")
    return d


def data_dir() -> Path:
    return tasks_dir() / "data"


# ---------------------------------------------------------------------------------------------- data
def _expected_sha256(root: Path) -> dict[str, str]:
    sums = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


@functools.lru_cache(maxsize=32)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:  # size/mtime: re-hash when the file changes
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(rel: str, root: Path | None = None) -> Path:
    """Path of data file `rel` after checking its sha256; UserError when missing or altered."""
    root = Path(root) if root is not None else data_dir()
    path = root / rel
    expected = _expected_sha256(root).get(rel)
    if expected is None:
        raise UserError(f"{rel} is not listed in {root / 'SHA256SUMS'}")
    if not path.is_file():
        raise UserError(f"benchmark data file {path} is missing")
    st = path.stat()
    actual = _sha256(path, st.st_size, st.st_mtime_ns)
    if actual != expected:
        raise UserError(f"benchmark data file {path} is altered or corrupt: sha256 {actual}, expected {expected}")
    return path


def verify_data(root: Path | None = None) -> dict[str, str]:
    """Check every shipped data file; returns {relative path: sha256}."""
    root = Path(root) if root is not None else data_dir()
    sums = _expected_sha256(root)
    for rels in DATA_FILES.values():
        for rel in rels:
            verify_file(rel, root)
    return {rel: sums[rel] for rels in DATA_FILES.values() for rel in rels}


def read_jsonl(rel: str, root: Path | None = None) -> list[dict]:
    path = verify_file(rel, root)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_splits(dataset: str, subject: str | None = None, root: Path | None = None) -> dict[str, list[dict]]:
    """{split: records} of one shipped dataset, split the way lm-eval's task uses it."""
    if dataset == "humaneval":
        return {"test": read_jsonl("humaneval/HumanEval.jsonl.gz", root)}
    if dataset == "mbpp":
        rows = read_jsonl("mbpp/mbpp.jsonl", root)
        return {split: [r for r in rows if lo <= r["task_id"] <= hi] for split, (lo, hi) in MBPP_SPLITS.items()}
    if dataset == "gsm8k":
        return {"train": read_jsonl("gsm8k/train.jsonl", root), "test": read_jsonl("gsm8k/test.jsonl", root)}
    if dataset == "math":
        if subject not in MINERVA_SUBJECTS:
            raise UserError(f"unknown MATH subject {subject!r}; valid: {', '.join(MINERVA_SUBJECTS)}")
        kind = MINERVA_SUBJECTS[subject]
        return {"test": [r for r in read_jsonl("math/test.jsonl", root) if r["type"] == kind]}
    if dataset in MINI_TASKS:
        return {"test": read_jsonl(DATA_FILES[dataset][0], root)}
    raise UserError(f"unknown shipped dataset {dataset!r}; valid: {', '.join(DATA_FILES)}")


def lm_eval_dataset(dataset: str, subject: str | None = None):
    """`custom_dataset` for the task YAMLs: an in-memory datasets.DatasetDict (no Hub, no disk cache)."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)
                                 for split, rows in load_splits(dataset, subject).items()})


# --------------------------------------------------------------------------------------------- names
def resolve_tasks(names: list[str], hub: bool = False) -> list[str]:
    """User task names (humaneval, mbpp, gsm8k, gsm8k_cot, minerva_math, minerva_math_<subject>;
    shipped `tb_*` names are accepted too) -> lm-eval task names, order kept, duplicates dropped.
    hub=True: lm-eval's builtin tasks (Hub datasets) instead of the shipped ones."""
    table = HUB_TASK_ALIASES if hub else TASK_ALIASES
    accepted = dict(table)
    if not hub:
        accepted.update({v: v for v in table.values()})
    out, unknown = [], []
    for raw in names:
        name = raw.strip()
        if name in accepted:
            if accepted[name] not in out:
                out.append(accepted[name])
        else:
            unknown.append(raw)
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(map(repr, unknown))}; valid: {', '.join(table)}")
    if not out:
        raise UserError("no tasks given")
    return out


def needs_code_exec(task_names: list[str]) -> bool:
    """Whether any of these lm-eval task names executes model-generated code."""
    return any(t in CODE_TASKS for t in task_names)


def code_exec_allowed(flag: bool = False) -> bool:
    """True when the user opted in (`--allow-code-exec` passed as `flag`, or HF_ALLOW_CODE_EVAL=1);
    the opt-in is then recorded for this process (see sandbox.grant)."""
    if flag or sandbox.env_allows():
        sandbox.grant()
        return True
    return False


def check_code_exec(task_names: list[str], flag: bool = False) -> None:
    """UserError, saying how to opt in, when these tasks run code and the user has not allowed it."""
    if needs_code_exec(task_names) and not code_exec_allowed(flag):
        code = [t for t in task_names if t in CODE_TASKS]
        raise UserError(f"task(s) {', '.join(code)}: {sandbox.OPT_IN_HELP}")


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns on every task that uses `custom_dataset` about --metadata; ours take none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@functools.lru_cache(maxsize=2)
def task_manager(builtins: bool = True):
    """One lm-eval TaskManager over the shipped tasks plus, with `builtins`, lm-eval's own (indexing
    its ~14k YAML files takes ~9 s idle, so runs of shipped tasks only skip it)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetNotice())
    return TaskManager(include_path=str(tasks_dir()), include_defaults=builtins)
