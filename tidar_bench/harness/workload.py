"""The TiDAR authors' benchmark workload (docs/speed.md, "The authors' workload"), built
offline from the shipped task data: `speed --workload authors`.

Their client sends, per task, lm-eval's few-shot context of each test document as raw text (no chat
template): HumanEval 0-shot, MBPP 3-shot, GSM8K-CoT 8-shot, Minerva math 4-shot (its seven subjects in
one file), dumped with the harness few-shot seed 42, the whole file shuffled with Python's
`random.seed(227)` and the first 128 taken; every request generates exactly 512 tokens (EOS ignored,
no stop strings), batch 1. Deviations: their HumanEval and MBPP files also hold the EvalPlus variants
(humaneval_plus, mbpp_plus), which are not shipped here; the shots, prompts and documents are lm-eval
0.4.13's (our tb_* task YAMLs)."""

from __future__ import annotations

import random

AUTHORS_TASKS = ("tb_humaneval", "tb_mbpp", "tb_gsm8k_cot", "tb_minerva_math")
AUTHORS_SHUFFLE_SEED = 227
AUTHORS_FEWSHOT_SEED = 42
AUTHORS_PROMPTS_PER_TASK = 128
AUTHORS_NEW_TOKENS = 512


def authors_prompts(per_task: int = AUTHORS_PROMPTS_PER_TASK, tasks: tuple[str, ...] = AUTHORS_TASKS,
                    seed: int = AUTHORS_SHUFFLE_SEED) -> dict[str, list[str]]:
    """task -> its first `per_task` few-shot contexts after the authors' shuffle."""
    from .tasks import task_manager

    tm = task_manager()
    out = {}
    for name in tasks:
        texts: list[str] = []
        for task in tm.load([name])["tasks"].values():  # a group: its subjects in order, one file
            task.set_fewshot_seed(seed=AUTHORS_FEWSHOT_SEED)
            task.build_all_requests()
            texts += [inst.args[0] for inst in task.instances]
        random.Random(seed).shuffle(texts)  # = random.seed(seed); random.shuffle(texts)
        out[name] = texts[:per_task]
    return out
