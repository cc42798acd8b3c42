"""Shipped tasks: data checksums, names, sandbox, and scoring (oracle scores 1.0, wrong answers 0.0), offline."""

import ast
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tidar_bench.errors import UserError
from tidar_bench.harness import sandbox
from tidar_bench.harness import tasks as T

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


# ---------------------------------------------------------------------------------- data and names
def test_verify_data_matches_sha256sums():
    sums = T.verify_data()
    assert sums["mbpp/mbpp.jsonl"] == "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a"
    assert set(sums) == {rel for rels in T.DATA_FILES.values() for rel in rels}
    for d in ("humaneval", "mbpp", "gsm8k", "math"):
        assert (T.data_dir() / d / "LICENSE").is_file()


def test_checksum_mismatch_raises(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(T.data_dir(), root)
    T.verify_data(root)  # the copy is fine
    path = root / "gsm8k" / "test.jsonl"
    path.write_bytes(path.read_bytes().replace(b"#### 18", b"#### 19", 1))
    with pytest.raises(UserError, match="altered or corrupt"):
        T.verify_data(root)
    with pytest.raises(UserError, match="altered or corrupt"):
        T.load_splits("gsm8k", root=root)
    (root / "mbpp" / "mbpp.jsonl").unlink()
    with pytest.raises(UserError, match="missing"):
        T.read_jsonl("mbpp/mbpp.jsonl", root)


def test_split_sizes():
    mbpp = T.load_splits("mbpp")
    assert {k: len(v) for k, v in mbpp.items()} == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    assert mbpp["test"][0]["task_id"] == 11 and mbpp["test"][-1]["task_id"] == 510
    assert len(T.load_splits("humaneval")["test"]) == 164
    g = T.load_splits("gsm8k")
    assert (len(g["train"]), len(g["test"])) == (7473, 1319)
    sizes = {s: len(T.load_splits("math", s)["test"]) for s in T.MINERVA_SUBJECTS}
    assert sizes == {"algebra": 1187, "counting_and_prob": 474, "geometry": 479, "intermediate_algebra": 903,
                     "num_theory": 540, "prealgebra": 871, "precalc": 546}


def test_resolve_tasks_and_code_exec_gate(monkeypatch):
    assert T.resolve_tasks(["gsm8k", "mbpp", "gsm8k", "tb_mbpp"]) == ["tb_gsm8k", "tb_mbpp"]
    assert T.resolve_tasks(["minerva_math_precalc"]) == ["tb_minerva_math_precalc"]
    assert T.resolve_tasks(["humaneval", "minerva_math"], hub=True) == ["humaneval", "minerva_math"]
    with pytest.raises(UserError, match="valid: humaneval, mbpp, gsm8k, gsm8k_cot, minerva_math"):
        T.resolve_tasks(["gsm9k"])
    assert T.needs_code_exec(["tb_gsm8k", "tb_humaneval"]) and T.needs_code_exec(["mbpp"])
    assert not T.needs_code_exec(["tb_gsm8k", "tb_minerva_math"])

    monkeypatch.delenv(sandbox.ENV_VAR, raising=False)
    monkeypatch.setattr(sandbox, "_granted", False)
    assert not T.code_exec_allowed(False)
    with pytest.raises(UserError, match="--allow-code-exec"):
        T.check_code_exec(["tb_humaneval"], False)
    with pytest.raises(UserError, match="HF_ALLOW_CODE_EVAL=1"):
        sandbox.run_program("pass")
    T.check_code_exec(["tb_gsm8k"], False)  # no code, no opt-in needed
    monkeypatch.setenv(sandbox.ENV_VAR, "1")
    assert T.code_exec_allowed(False)
    monkeypatch.delenv(sandbox.ENV_VAR)
    monkeypatch.setattr(sandbox, "_granted", False)
    assert T.code_exec_allowed(True) and sandbox.is_allowed()


def test_mbpp_fewshot_items_equal_lm_evals():
    """Our 3 shots come from the data file; they must equal lm-eval's hard-coded ones (read, not imported:
    lm-eval's mbpp utils fetch code_eval from the Hub at import)."""
    tree = ast.parse((LM_EVAL_TASKS / "mbpp" / "utils.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples")
    theirs = ast.literal_eval(fn.body[-1].value)
    ours = _load_utils().mbpp_fewshot_samples()
    assert ours == theirs


@pytest.mark.parametrize("ours,theirs", [("tb_gsm8k", "gsm8k/gsm8k.yaml"), ("tb_gsm8k_cot", "gsm8k/gsm8k-cot.yaml"),
                                         ("tb_humaneval", "humaneval/humaneval.yaml"), ("tb_mbpp", "mbpp/mbpp.yaml"),
                                         ("tb_minerva_math_algebra", "minerva_math/minerva_math_algebra.yaml"),
                                         ("tb_humaneval_instruct", "humaneval/humaneval_instruct.yaml"),
                                         ("tb_mbpp_instruct", "mbpp/mbpp_instruct.yaml"),
                                         ("tb_gsm8k_cot_zeroshot", "gsm8k/gsm8k-cot-zeroshot.yaml"),
                                         ("tb_gsm8k_cot_llama", "gsm8k/gsm8k-cot-llama.yaml"),
                                         ("tb_gsm8k_llama", "llama3/instruct/gsm8k/gsm8k.yaml")])
def test_task_yamls_mirror_lm_eval(ours, theirs):
    a = _raw_yaml(T.tasks_dir() / f"{ours}.yaml")
    b = _raw_yaml(LM_EVAL_TASKS / theirs)
    # Intentional differences: code tasks score with our sandbox (filter + process_results instead of
    # evaluate's code_eval); function-valued fields point at our tasks/utils.py wrappers.
    differ = {"tb_humaneval": {"filter_list", "metric_list"}, "tb_mbpp": {"filter_list", "metric_list", "fewshot_config"},
              "tb_humaneval_instruct": {"filter_list", "metric_list"},
              "tb_mbpp_instruct": {"filter_list", "metric_list", "fewshot_config"},
              "tb_minerva_math_algebra": {"doc_to_text", "fewshot_config"}}.get(ours, set())
    for key in ("doc_to_text", "doc_to_target", "target_delimiter", "generation_kwargs", "num_fewshot", "repeats",
                "output_type", "test_split", "fewshot_split", "filter_list", "fewshot_config", "metric_list",
                "unsafe_code", "gen_prefix"):
        if key not in differ:
            assert a.get(key) == b.get(key), key
    for key in differ & {"fewshot_config"}:
        assert a[key]["sampler"] == b[key]["sampler"] == "first_n"
    if ours == "tb_humaneval":
        assert a["filter_list"][0]["name"] == b["filter_list"][0]["name"] == "create_test"


# ------------------------------------------------------------------------------------------- sandbox
@pytest.fixture
def allow_exec(monkeypatch):
    monkeypatch.setattr(sandbox, "_granted", True)


def test_sandbox_pass_fail_and_isolation(allow_exec, tmp_path):
    ok, bad, exc = sandbox.run_many(["import os\nassert sorted(os.listdir('.')) == ['program.py', 'stderr.txt']",
                                     "assert 1 == 2", "raise SystemExit(3)"])
    assert ok == sandbox.ExecResult(True, "passed")
    assert not bad.passed and "AssertionError" in bad.reason
    assert not exc.passed and "exit status 3" in exc.reason
    # no stdin, cwd is a fresh temp dir removed afterwards
    r = sandbox.run_program(f"import sys, os\nassert sys.stdin.read() == ''\nopen('{tmp_path}/cwd', 'w').write(os.getcwd())")
    assert r.passed, r.reason
    assert not Path((tmp_path / "cwd").read_text()).exists()


def test_sandbox_timeout_kills_infinite_loop(allow_exec):
    t = time.monotonic()
    r = sandbox.run_program("while True:\n    pass", cpu_s=1)
    assert not r.passed and r.reason.startswith("timed out")
    r2 = sandbox.run_program("import time\ntime.sleep(60)", cpu_s=0.5)  # wall clock deadline: 3 * cpu_s
    assert not r2.passed and "wall clock" in r2.reason
    assert time.monotonic() - t < 15


def test_sandbox_memory_limit(allow_exec):
    r = sandbox.run_program("x = bytearray(8 * 2**30)", memory_mb=512)
    assert not r.passed and r.reason == "memory limit"
    assert sandbox.run_program("x = bytearray(64 * 2**20)", memory_mb=512).passed


# -------------------------------------------------------------------------------- scoring via lm-eval
class OracleLM:
    """An lm-eval LM answering every request with the answer stored for the prompt's ending."""

    def __new__(cls, answers: dict[str, str]):
        from lm_eval.api.model import LM

        class _Oracle(LM):
            def generate_until(self, requests, disable_tqdm=False):
                out = []
                for r in requests:
                    context = r.args[0]
                    hits = [a for suffix, a in answers.items() if context.endswith(suffix)]
                    assert len(hits) == 1, context[-200:]
                    out.append(hits[0])
                return out

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Oracle()


class WrongLM(OracleLM):
    def __new__(cls, reply: str):
        return OracleLM.__new__(cls, {"": reply})


def _evaluate(lm, task, limit=None):
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=T.task_manager(), limit=limit,
                                  bootstrap_iters=0, log_samples=True, confirm_run_unsafe_code=True)
    return res["results"], res["samples"]


def test_humaneval_oracle_all_164_and_wrong(allow_exec):
    docs = T.load_splits("humaneval")["test"]
    results, samples = _evaluate(OracleLM({d["prompt"]: d["canonical_solution"] for d in docs}), "tb_humaneval")
    assert results["tb_humaneval"]["sample_len"] == 164
    assert results["tb_humaneval"]["pass@1,create_test"] == 1.0
    s = samples["tb_humaneval"][0]
    assert s["filtered_resps"][0] == docs[0]["prompt"] + docs[0]["canonical_solution"]
    results, _ = _evaluate(WrongLM("    return None\n"), "tb_humaneval", limit=20)
    assert results["tb_humaneval"]["pass@1,create_test"] == 0.0


def test_code_task_refuses_to_run_without_opt_in(monkeypatch):
    """Even past the runner's gate, the scoring itself will not execute code without the opt-in."""
    monkeypatch.delenv(sandbox.ENV_VAR, raising=False)
    monkeypatch.setattr(sandbox, "_granted", False)
    with pytest.raises(UserError, match="--allow-code-exec"):
        _evaluate(WrongLM("    return None\n"), "tb_humaneval", limit=2)


def test_mbpp_oracle_test_split_499_of_500_and_wrong(allow_exec):
    docs = T.load_splits("mbpp")["test"]
    answers = {f"{d['text']} Your code should pass these tests:\n\n" + "\n".join(d["test_list"][:3]) + "\n[BEGIN]\n":
               d["code"] for d in docs}
    results, samples = _evaluate(OracleLM(answers), "tb_mbpp")
    assert results["tb_mbpp"]["sample_len"] == 500
    failed = sorted(s["doc"]["task_id"] for s in samples["tb_mbpp"] if s["pass@1"] != 1.0)
    assert failed == [341]  # fails with its own reference solution (set order)
    assert results["tb_mbpp"]["pass@1,create_test"] == pytest.approx(499 / 500)
    results, _ = _evaluate(WrongLM("def nothing():\n    pass\n"), "tb_mbpp", limit=20)
    assert results["tb_mbpp"]["pass@1,create_test"] == 0.0


def test_gsm8k_oracle_both_filters_and_wrong():
    docs = T.load_splits("gsm8k")["test"][:150]
    results, _ = _evaluate(OracleLM({f"Question: {d['question']}\nAnswer:": " " + d["answer"] for d in docs}),
                           "tb_gsm8k", limit=150)
    r = results["tb_gsm8k"]
    assert r["sample_len"] == 150 and r["exact_match,strict-match"] == 1.0 and r["exact_match,flexible-extract"] == 1.0
    results, _ = _evaluate(WrongLM(" 2 + 2 = 5.\n#### -987654321"), "tb_gsm8k", limit=30)
    r = results["tb_gsm8k"]
    assert r["exact_match,strict-match"] == 0.0 and r["exact_match,flexible-extract"] == 0.0


def test_gsm8k_cot_oracle_both_filters_and_wrong():
    docs = T.load_splits("gsm8k")["test"][:120]

    def cot(answer):
        reasoning, final = answer.split("####")
        return " " + " ".join(reasoning.split()) + f" The answer is {final.strip()}."

    results, samples = _evaluate(OracleLM({f"Q: {d['question']}\nA:": cot(d["answer"]) for d in docs}),
                                 "tb_gsm8k_cot", limit=120)
    r = results["tb_gsm8k_cot"]
    assert r["sample_len"] == 120 and r["exact_match,strict-match"] == 1.0 and r["exact_match,flexible-extract"] == 1.0
    assert _context(samples["tb_gsm8k_cot"][0]).count("The answer is") == 8  # 8 shots
    results, _ = _evaluate(WrongLM(" 3 + 4 = 7. The answer is -987654321."), "tb_gsm8k_cot", limit=30)
    r = results["tb_gsm8k_cot"]
    assert r["exact_match,strict-match"] == 0.0 and r["exact_match,flexible-extract"] == 0.0


def test_minerva_subject_oracle_and_wrong():
    mu = pytest.importorskip("lm_eval.tasks.minerva_math.utils")
    docs = T.load_splits("math", "counting_and_prob")["test"][:100]

    def solution(d):  # the reference solution in the few-shot format the task expects
        final = mu.remove_boxed(mu.last_boxed_only_string(d["solution"]))
        return " " + d["solution"] + f"\nFinal Answer: The final answer is ${final}$. I hope it is correct."

    results, samples = _evaluate(OracleLM({f"Problem:\n{d['problem']}\n\nSolution:": solution(d) for d in docs}),
                                 "tb_minerva_math_counting_and_prob", limit=100)
    r = results["tb_minerva_math_counting_and_prob"]
    assert r["sample_len"] == 100 and r["exact_match,none"] == 1.0 and r["math_verify,none"] == 1.0
    prompt = _context(samples["tb_minerva_math_counting_and_prob"][0])
    assert prompt.count("Problem:\n") == 5 and prompt.endswith("\n\nSolution:")  # 4 shots + the question
    wrong = " So it is $\\boxed{-987654321}$.\nFinal Answer: The final answer is $-987654321$. I hope it is correct."
    results, _ = _evaluate(WrongLM(wrong), "tb_minerva_math_counting_and_prob", limit=20)
    r = results["tb_minerva_math_counting_and_prob"]
    assert r["exact_match,none"] == 0.0 and r["math_verify,none"] == 0.0


def test_minerva_group_has_seven_subjects():
    tm = T.task_manager()
    assert set(T.resolve_tasks(["minerva_math"])) <= set(tm.all_tasks)
    cfg = _raw_yaml(T.tasks_dir() / "tb_minerva_math.yaml")
    assert cfg["task"] == [f"tb_minerva_math_{s}" for s in T.MINERVA_SUBJECTS]
    assert all(f"tb_minerva_math_{s}" in tm.all_tasks for s in T.MINERVA_SUBJECTS)


# --------------------------------------------------------------------------------------------- helpers
def _raw_yaml(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    cfg = yaml.load(path.read_text(), Loader=Loader)
    if "include" in cfg:  # lm-eval's include: the included file's keys, overridden by this file's
        cfg = {**_raw_yaml(path.parent / cfg["include"]), **{k: v for k, v in cfg.items() if k != "include"}}
    return cfg


def _context(sample: dict) -> str:
    """The prompt lm-eval sent for a logged sample (arguments = [[context, gen_kwargs]])."""
    context = sample["arguments"][0][0]
    assert isinstance(context, str)
    return context


def _load_utils():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tb_task_utils", T.tasks_dir() / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mbpp_instruct_code_extraction_equals_lm_evals():
    """Our `first_code_block` vs lm-eval's `extract_code_blocks` (its source, executed alone: the
    module itself fetches code_eval from the Hub at import)."""
    import re

    tree = ast.parse((LM_EVAL_TASKS / "mbpp" / "utils.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extract_code_blocks")
    scope = {"re": re}
    exec(compile(ast.Module([fn], []), "lm_eval_mbpp_utils", "exec"), scope)
    theirs = scope["extract_code_blocks"]
    ours = _load_utils().first_code_block
    for text in ["def f():\n    return 1\n```\nmore", "```python\ndef g(): pass\n```", "no code", "x = 1\n```",
                 "text\n```python\ny = 2\n```\n```\nz\n```", "```\n```", "a\n```py\nb\n```"]:
        assert ours(text) == theirs(text), text
