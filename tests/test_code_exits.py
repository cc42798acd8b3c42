"""Code scoring cannot be fooled by leaving early: a program passes only when it reaches the end of
its tests (sandbox end marker), whatever exit status it returns."""

import pytest

from tidar_bench.harness import sandbox

# a HumanEval-style completion that leaves before `check(...)` runs, one per way of leaving
EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "exit()": "exit()",
    "quit()": "quit()",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit": "raise SystemExit",
}
TESTS = "\n\ndef check(candidate):\n    assert candidate(2) == 5\n\ncheck(add_three)\n"


@pytest.fixture
def allow_exec(monkeypatch):
    monkeypatch.setattr(sandbox, "_granted", True)


def _program(body: str) -> str:
    return "def add_three(x):\n    return x + 1\n" + body + TESTS  # a wrong solution: the assert would fail


@pytest.mark.parametrize("name", list(EXITS))
def test_early_exit_fails(allow_exec, name):
    r = sandbox.run_program(_program(EXITS[name]))
    assert not r.passed and r.reason == sandbox.EARLY_EXIT, r


def test_exit_inside_the_function_under_test_fails(allow_exec):
    prog = "def add_three(x):\n    import sys\n    sys.exit(0)\n" + TESTS
    assert sandbox.run_program(prog).reason == sandbox.EARLY_EXIT


def test_reaching_the_end_passes_and_failing_asserts_fail(allow_exec):
    good = "def add_three(x):\n    return x + 3\n" + TESTS
    assert sandbox.run_program(good) == sandbox.ExecResult(True, "passed")
    assert "AssertionError" in sandbox.run_program(_program("")).reason
    # chdir does not hide the end marker; exiting 0 after the tests is fine
    assert sandbox.run_program("import os\nos.chdir('/')\n" + good).passed
    assert sandbox.run_program(good + "import atexit, os\natexit.register(lambda: os._exit(0))\n").passed


def test_task_scoring_counts_an_early_exit_as_failure(allow_exec):
    """Through the shipped HumanEval and MBPP scorers (tasks/utils.py)."""
    import importlib.util

    from tidar_bench.harness import tasks as T

    spec = importlib.util.spec_from_file_location("tb_task_utils", T.tasks_dir() / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = T.load_splits("humaneval")["test"][0]
    cheat = "    import sys\n    sys.exit(0)\n"
    assert utils.humaneval_process_results(doc, [doc["prompt"] + cheat])["pass@1"] == 0.0
    assert utils.humaneval_process_results(doc, [doc["prompt"] + doc["canonical_solution"]])["pass@1"] == 1.0
    mb = T.load_splits("mbpp")["test"][0]
    assert utils.mbpp_process_results(mb, ["import os\nos._exit(0)\n"])["pass@1"] == 0.0
    assert utils.mbpp_process_results(mb, [mb["code"]])["pass@1"] == 1.0
