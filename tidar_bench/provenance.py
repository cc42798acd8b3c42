"""Where a number came from: the machine and versions (`environment`) stored beside every
result, atomic writes (`write_atomic`) so no result file is ever half-written, and the form a path
takes in anything written (`portable_path`: no output holds this machine's absolute paths), with a
checkpoint's weights hash (`checkpoint_sha256`). Importable without lm-eval (GPU machines may lack it)."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def environment() -> dict:
    import importlib.metadata as md

    import torch

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "git_commit": commit, "hostname": platform.node(), "platform": platform.platform(),
        "python": sys.version.split()[0], "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": version("transformers"), "lm_eval": version("lm_eval") or version("lm-eval"),
    }


# ----------------------------------------------------------------------------- paths in outputs


def _inside(path: str, root: str) -> str | None:
    """`path` relative to `root` (POSIX separators, "." for root itself) when it is root or inside it,
    else None. Both absolute and normalised; a filesystem root is never a root here (everything would
    be inside it)."""
    if not root or os.path.dirname(root) == root:
        return None
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        return None
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    return Path(rel).as_posix()


def path_hash(path: str | os.PathLike) -> str:
    """8 hex digits of the sha256 of the resolved absolute path: tells two paths apart, names neither."""
    resolved = os.path.realpath(os.path.expanduser(os.fspath(path)))
    return hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def short_name(path: str | os.PathLike) -> str:
    """`<basename>-<path_hash>`: a path outside the working folder and the home folder, or in the temp
    folder, as outputs show it (e.g. `dflash-1a2b3c4d`)."""
    absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
    return f"{os.path.basename(absolute) or 'root'}-{path_hash(path)}"


def portable_path(path: str | os.PathLike, *, home: bool = True) -> str:
    """What an output (run.json, run_spec.json, summary.csv, latency.json, report.md, commands, ...) may
    hold for a path, never this machine's absolute path:

    - relative to the current working folder when the path is inside it (a relative path that stays
      inside it is kept as written, so `tidar_bench/embedded/tidar` or a hub id `org/name` is unchanged);
    - else `short_name`, `<basename>-<8 hex of the sha256 of the resolved path>`, when it is in the temp
      folder (tempfile.gettempdir());
    - else `~/...` when it is under the user's home (not with `home=False`: decoder labels, which
      become file names, take the short name);
    - else `short_name`.

    Two different paths never give the same short name. The path as written (normalised) and its
    resolved form (symlinks followed) are both tried against each folder."""
    raw = os.fspath(path)
    text = os.path.expanduser(raw)
    if not os.path.isabs(text) and text == raw:  # relative as written: kept unless it climbs out (`../x`)
        norm = os.path.normpath(text)
        if norm != os.pardir and not norm.startswith(os.pardir + os.sep):
            return Path(raw).as_posix() if os.sep != "/" else raw
    forms = (os.path.abspath(text), os.path.realpath(text))

    def under(root: str) -> str | None:
        for form, base in zip(forms, (os.path.abspath(root), os.path.realpath(root))):
            rel = _inside(form, base)
            if rel is not None:
                return rel
        return None

    rel = under(os.getcwd())
    if rel is not None:
        return rel
    if under(tempfile.gettempdir()) is not None:
        return short_name(text)
    if home:
        rel = under(os.path.expanduser("~"))
        if rel is not None:
            return "~" if rel == "." else f"~/{rel}"
    return short_name(text)


def is_path_value(value) -> bool:
    """A value that is a path: a Path, or a one-line string that is absolute, starts with `~/` or holds
    a path separator (a Hugging Face Hub id `org/name` counts, and stays unchanged as a relative path
    inside the working folder); URLs (`scheme://...`) do not."""
    if isinstance(value, os.PathLike):
        return True
    if not isinstance(value, str) or not value or "\n" in value or "://" in value:
        return False
    return os.path.isabs(value) or "/" in value or os.sep in value


def label_value(value: str) -> str:
    """A decoder option's value as its setting's label shows it (registry.parse_settings): a path
    (is_path_value) relative to the working folder when inside it, else `short_name`; anything else
    unchanged, so labels of plain options (`tidar(block_size=4)`) stay byte-identical. Only the label:
    the options keep the real value, so the decoder still loads it."""
    return portable_path(value, home=False) if is_path_value(value) else value


def portable_value(value):
    """`value` with every path in it (is_path_value; through dict values, lists and tuples) as
    `portable_path`; everything else unchanged. For the options, identities, lm-eval results and
    records written into outputs."""
    if isinstance(value, dict):
        return {k: portable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(portable_value(v) for v in value)
    return portable_path(value) if is_path_value(value) else value


# an absolute path inside free text (a command line, a log line): starts a word or follows `=`, `(`,
# `,`, a quote or a backtick; ends at white space, a quote, a comma, a semicolon or a parenthesis
_ABS_IN_TEXT = re.compile(r"(?<![\w.~/:$}<>\\-])(/(?=[^\s/>])[^\s'\"`,;()<>|]*)")


def portable_text(text: str) -> str:
    """`text` (a command line as an older version recorded it, a log line) with every absolute path in
    it as `portable_path`; a trailing full stop or colon stays outside the path."""
    def sub(m: re.Match) -> str:
        p = m.group(1)
        core = p.rstrip(".:")
        return portable_path(core) + p[len(core):] if core not in ("", "/") else p

    return _ABS_IN_TEXT.sub(sub, text)


def portable_command(argv) -> str:
    """A command line (its arguments) as outputs record it, shell-quoted like shlex.join (a leading `~/`
    left unquoted, so the shell still expands it): an argument that is a path as `portable_path`,
    absolute paths inside the others (`--out=/x`, `dflash(draft=/x)`) as `portable_text`."""
    import shlex

    def one(a) -> str:
        a = os.fspath(a) if isinstance(a, os.PathLike) else str(a)
        a = portable_path(a) if os.path.isabs(os.path.expanduser(a)) else portable_text(a)
        return "~/" + shlex.quote(a[2:]) if a.startswith("~/") and a != "~/" else shlex.quote(a)

    return " ".join(one(a) for a in argv)


def checkpoint_sha256(folder: str | os.PathLike) -> str | None:
    """sha256 of a checkpoint folder's weights: its `*.safetensors` files concatenated in name order
    (the `weights_sha` of scripts/smollm2_pipeline.sh, which records it as runs/<name>/checkpoints.sha256
    and training/<stage>/model.sha256); None for a folder with no safetensors (or no folder)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_record(folder: str | os.PathLike) -> dict:
    """A checkpoint as run.json records it: its resolved path in portable form and its weights' sha256."""
    return {"path": portable_path(Path(folder).expanduser().resolve()), "sha256": checkpoint_sha256(folder)}
