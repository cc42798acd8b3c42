"""Usage mistakes on every command: one `error:` line on stderr, exit 2, no traceback, whatever
typer/click versions pip resolved (typer >= 0.29 raises its own copy of click's exceptions)."""

import inspect
import subprocess
import sys
import typing

import pytest
import typer.main

from tidar_bench.cli import _load_commands, app, main

_load_commands()
NUMERIC = (int, float, typing.Optional[int], typing.Optional[float])


def leaf_commands(cmd=None, path=()):
    """(argv prefix, click command) of every command `tidar-bench --help` lists, subcommands included."""
    cmd = cmd or typer.main.get_command(app)
    if hasattr(cmd, "commands"):
        for name, sub in sorted(cmd.commands.items()):
            yield from leaf_commands(sub, (*path, name))
    else:
        yield list(path), cmd


def numeric_option(cmd) -> str | None:
    hints = typing.get_type_hints(inspect.unwrap(cmd.callback))
    return next((p.opts[0] for p in cmd.params
                 if p.opts and p.opts[0].startswith("--") and hints.get(p.name) in NUMERIC), None)


# commands with no numeric option: a value that is bad for them in another way
BAD_VALUE_ELSEWHERE = {
    "decoders": (["surplus-argument"], "surplus-argument"),
    "export": (["--checkpoint", "/no/such/checkpoint", "--out", "x"], "/no/such/checkpoint"),
    "plot": (["/no/such/run-folder", "--out", "figs"], "/no/such/run-folder"),
}
COMMANDS = list(leaf_commands())


def assert_one_error_line(argv, capsys, mentions: str | None = None):
    assert main(argv) == 2, argv
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), (argv, cap.err)
    assert "Traceback" not in cap.err + cap.out
    if mentions:
        assert mentions in err[0], (argv, err[0])


def test_every_command_is_covered():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"run", "speed", "profile-latency", "plot", "check", "generate", "train tidar"} <= names
    for path, cmd in COMMANDS:
        assert numeric_option(cmd) or " ".join(path) in BAD_VALUE_ELSEWHERE, path


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p))
def test_unknown_option(path, capsys):
    assert_one_error_line([*path, "--no-such-option-xyz", "1"], capsys, "--no-such-option-xyz")


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_bad_value(path, cmd, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the repository
    opt = numeric_option(cmd)
    if opt:
        assert_one_error_line([*path, opt, "not-a-number"], capsys, opt)
    else:
        extra, mentions = BAD_VALUE_ELSEWHERE[" ".join(path)]
        assert_one_error_line([*path, *extra], capsys, mentions)


def test_missing_argument_option_value_and_exclusive_options(tiny_llama, capsys, tmp_path):
    assert_one_error_line(["plot"], capsys, "folders")  # missing argument
    assert_one_error_line(["run", "--model", str(tiny_llama), "--tasks"], capsys, "--tasks")  # option without value
    assert_one_error_line(["check", str(tmp_path / "missing")], capsys)  # missing argument --baseline / folder
    assert_one_error_line(["speed", "--model", str(tiny_llama), "--config", "tiny"], capsys, "--config")
    assert_one_error_line(["generate", "--model", str(tiny_llama), "--prompt", "a", "--prompt-ids", "1"], capsys)
    assert_one_error_line(["speed", "--config", "tiny", "--prompts-file", str(tmp_path / "nope.jsonl")], capsys,
                          "nope.jsonl")


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    assert "Usage" in capsys.readouterr().out


@pytest.mark.parametrize("argv,mentions", [
    (["tokenize", "--model", "x"], "--model"),  # unknown option
    (["speed", "--prompts", "abc"], "--prompts"),  # bad value
    (["plot"], "folders"),  # missing argument
])
def test_console_script_usage_errors(argv, mentions):
    """The installed entry point, as a user runs it (the three cases of issue 36)."""
    p = subprocess.run([sys.executable, "-m", "tidar_bench.cli", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0], p.stderr
    assert "Traceback" not in p.stderr
