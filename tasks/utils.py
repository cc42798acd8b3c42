"""Functions the tidar-bench task YAMLs (`!function utils.*`) call: data loading, code-task scoring,
and lm-eval's own minerva_math helpers.

Code tasks: the `create_test` filter turns each response into the program under test (HumanEval:
prompt + completion, like lm-eval's `build_predictions`; MBPP: the completion) and runs every
program of the task with its tests in the sandbox, in parallel; `process_results` then reads the
outcome (or runs the program itself if the filter did not).
"""

from __future__ import annotations

import re

from tidar_bench.harness import sandbox
from tidar_bench.harness.tasks import lm_eval_dataset

_outcomes: dict[str, sandbox.ExecResult] = {}  # full test program -> outcome, filled by the filters


def load_dataset(dataset: str, subject: str | None = None, **_metadata):
    """custom_dataset: lm-eval passes the task's metadata and dataset_kwargs as keywords."""
    return lm_eval_dataset(dataset, subject)


# ------------------------------------------------------------------------------------------ HumanEval
def humaneval_test_program(doc: dict, candidate: str) -> str:
    return candidate + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})"


def humaneval_programs(resps: list[list[str]], docs: list[dict]) -> list[str]:
    candidates = [doc["prompt"] + resp[0] for resp, doc in zip(resps, docs)]
    _run_all([humaneval_test_program(d, c) for d, c in zip(docs, candidates)])
    return candidates


def humaneval_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"pass@1": _passed(humaneval_test_program(doc, results[0]))}


def humaneval_instruct_programs(resps: list[list[str]], docs: list[dict]) -> list[str]:
    """humaneval_instruct: the answer continues `gen_prefix` (an open ```python block holding the
    prompt), so the program is the prompt plus the answer up to the closing ``` (lm-eval's rule)."""
    candidates = [doc["prompt"] + resp[0].split("```", 1)[0] for resp, doc in zip(resps, docs)]
    _run_all([humaneval_test_program(d, c) for d, c in zip(docs, candidates)])
    return candidates


# ----------------------------------------------------------------------------------------------- MBPP
def mbpp_test_program(doc: dict, candidate: str) -> str:
    # The solution goes before test_setup_code: the setup of tasks 367/927 builds objects the code defines.
    return candidate + "\n" + doc["test_setup_code"] + "\n" + "\n".join(doc["test_list"])


def mbpp_programs(resps: list[list[str]], docs: list[dict]) -> list[str]:
    candidates = [resp[0] for resp in resps]
    _run_all([mbpp_test_program(d, c) for d, c in zip(docs, candidates)])
    return candidates


def mbpp_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"pass@1": _passed(mbpp_test_program(doc, results[0]))}


def first_code_block(text: str) -> str:
    """mbpp_instruct: the answer continues `gen_prefix` (an open ```python block), so the code is the
    body of the first ``` block of "```" + answer (a language tag after the fence dropped); "" when
    there is none. Same rule as lm-eval's mbpp `extract_code_blocks` (a test compares them)."""
    fence = re.compile(r"```(?:\w+)?\n?(.*?)\n?```", re.DOTALL)
    found = fence.search("```" + text) or fence.search(text.replace("```python", "```"))
    return found.group(1) if found else ""


def mbpp_instruct_programs(resps: list[list[str]], docs: list[dict]) -> list[str]:
    candidates = [first_code_block(resp[0]) for resp in resps]
    _run_all([mbpp_test_program(d, c) for d, c in zip(docs, candidates)])
    return candidates


def mbpp_fewshot_samples() -> list[dict]:
    """lm-eval's fixed 3 shots: MBPP tasks 2, 3, 4 (prompt split), marked `is_fewshot`."""
    rows = {r["task_id"]: r for r in lm_eval_dataset("mbpp")["prompt"]}
    return [{"task_id": i, "text": rows[i]["text"], "code": rows[i]["code"], "test_list": rows[i]["test_list"],
             "is_fewshot": True} for i in (2, 3, 4)]


# ------------------------------------------------------------------------------------------ mini code
def mini_code_test_program(doc: dict, candidate: str) -> str:
    return candidate + "\n" + doc["answer"]


def mini_code_programs(resps: list[list[str]], docs: list[dict]) -> list[str]:
    candidates = [doc["prompt"] + resp[0] for resp, doc in zip(resps, docs)]
    _run_all([mini_code_test_program(d, c) for d, c in zip(docs, candidates)])
    return candidates


def mini_code_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"pass@1": _passed(mini_code_test_program(doc, results[0]))}


def _run_all(programs: list[str]) -> None:
    todo = list(dict.fromkeys(p for p in programs if p not in _outcomes))
    _outcomes.update(zip(todo, sandbox.run_many(todo)))


def _passed(program: str) -> float:
    outcome = _outcomes.pop(program, None) or sandbox.run_program(program)
    return float(outcome.passed)


# --------------------------------------------------------------------------------------- minerva_math
def _minerva():
    from lm_eval.tasks.minerva_math import utils  # needs lm-eval[math]; imported only by the MATH tasks

    return utils


def minerva_process_docs(dataset):
    from datasets.utils import logging as ds_logging

    shown = ds_logging.is_progress_bar_enabled()  # lm-eval maps the docs on every access: no bar each time
    ds_logging.disable_progress_bar()
    try:
        return _minerva().process_docs(dataset)
    finally:
        if shown:
            ds_logging.enable_progress_bar()


def minerva_doc_to_text(doc: dict) -> str:
    return _minerva().doc_to_text(doc)


def minerva_fewshot_samples() -> list[dict]:
    return _minerva().list_fewshot_samples()


def minerva_process_results(doc: dict, results: list[str]) -> dict[str, int]:
    return _minerva().process_results(doc, results)
