"""The documentation (issue 36): README.md stays a short front page, every command and option of
`tidar-bench` is documented in its section of docs/, and docs/ builds as a site with
`mkdocs build --strict` (a broken link or anchor fails)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Every command of `tidar-bench --help` (and every `train` recipe) -> the docs page documenting it.
# The page has a heading "`tidar-bench <command>`"; its options are documented in the level-2 section of
# the top-level command (`tidar-bench train` holds the options every recipe shares).
PAGES = {
    "decoders": "commands.md",
    "generate": "commands.md",
    "speed": "commands.md",
    "run": "commands.md",
    "profile-latency": "commands.md",
    "plot": "commands.md",
    "check": "commands.md",
    "distill": "commands.md",
    "tokenize": "commands.md",
    "export": "commands.md",
    "train": "training.md",
    "train ar": "training.md",
    "train tidar": "training.md",
    "train block-diffusion": "training.md",
    "train eagle": "training.md",
    "train dflash": "training.md",
}

_COMMANDS: dict | None = None


def _commands() -> dict:
    """'name' or 'group name' -> the click command typer builds, for every command of the app."""
    global _COMMANDS
    if _COMMANDS is None:
        from tidar_bench.cli import _load_commands, app

        _load_commands()
        out = {}

        def walk(cmd, path):
            out[path] = cmd
            for name, sub in (getattr(cmd, "commands", None) or {}).items():
                walk(sub, f"{path} {name}")

        for name, cmd in typer.main.get_command(app).commands.items():
            walk(cmd, name)
        _COMMANDS = out
    return _COMMANDS


def _long_options(cmd) -> list[str]:
    names = []
    for p in cmd.params:
        if getattr(p, "param_type_name", None) != "option":
            continue
        names += [o for o in (*p.opts, *p.secondary_opts) if o.startswith("--") and o != "--help"]
    return names


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of the Markdown headings outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#{1,6}) (.+?)\s*$", line)):
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def _section(text: str, title: str) -> str | None:
    """The text from the heading `title` to the next heading of the same or a higher level."""
    lines, heads = text.splitlines(), _headings(text)
    for k, (i, level, t) in enumerate(heads):
        if t == title:
            end = next((j for j, lv, _ in heads[k + 1:] if lv <= level), len(lines))
            return "\n".join(lines[i:end])
    return None


def test_readme_is_a_short_front_page():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines (at most 250): move details to a page under docs/"


def test_every_command_is_mapped_to_a_page():
    cmds = set(_commands())
    assert not cmds - set(PAGES), f"commands without a docs page in PAGES: {sorted(cmds - set(PAGES))}"
    assert not set(PAGES) - cmds, f"PAGES names commands `tidar-bench` no longer has: {sorted(set(PAGES) - cmds)}"


@pytest.mark.parametrize("name", sorted(PAGES))
def test_command_and_its_options_are_documented(name):
    cmd = _commands().get(name)
    assert cmd is not None, f"`tidar-bench {name}` does not exist any more: drop it from PAGES and its page"
    page = DOCS / PAGES[name]
    text = page.read_text()
    assert _section(text, f"`tidar-bench {name}`") is not None, \
        f"docs/{PAGES[name]} has no heading \"`tidar-bench {name}`\""
    top = name.split()[0]
    section = _section(text, f"`tidar-bench {top}`")
    assert section is not None, f"docs/{PAGES[name]} has no heading \"`tidar-bench {top}`\""
    missing = [o for o in _long_options(cmd) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", section)]
    assert not missing, f"options of `tidar-bench {name}` missing from docs/{PAGES[name]}, section " \
                        f"`tidar-bench {top}`: {missing}"


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs / mkdocs-material not installed: pip install -e '.[dev]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
