"""No machine paths in outputs (issue 36, item 4).

- Every committed file under results/ (its name and, for text files, its content) is free of absolute
  home and temp paths (`/root/`, `/home/<name>/`, `/Users/<name>/`, `/tmp/`, `/var/folders/`, and their
  percent-encoded forms, as decoder labels in file names had them); a remaining hit needs a reason in
  ALLOWED.
- `provenance.portable_path`: relative inside the working folder, `~/...` under the home folder,
  `<name>-<hash>` in the temp folder and elsewhere; decoder labels take the path option in that form
  (the options keep the real path: the decoder loads it); plain labels are unchanged.
- A run with a drafter outside the working folder writes no absolute path, resumes from its cache, and
  a folder written before labels were portable still resumes (its files take the new names); the
  committed SmolLM2 run folders resume on their machine layout (`~/.cache/tidar-bench`)."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tidar_bench.provenance import (checkpoint_sha256, label_value, portable_command, portable_path, portable_text,
                                    portable_value)

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "tidar_bench" / "embedded"

# absolute home and temp paths as text, and percent-encoded as `file_label` wrote them into file names
MACHINE_PATHS = {
    "/root/": re.compile(r"/root/"),
    "/home/<name>/": re.compile(r"/home/[^/\s\"'`]+/"),
    "/Users/<name>/": re.compile(r"/Users/[^/\s\"'`]+/"),
    "/tmp/": re.compile(r"/tmp/"),
    "/var/folders/": re.compile(r"/var/folders/"),
    "%2Froot%2F": re.compile(r"%2Froot%2F", re.I),
    "%2Fhome%2F<name>%2F": re.compile(r"%2Fhome%2F.+?%2F", re.I),
    "%2FUsers%2F<name>%2F": re.compile(r"%2FUsers%2F.+?%2F", re.I),
    "%2Ftmp%2F": re.compile(r"%2Ftmp%2F", re.I),
    "%2Fvar%2Ffolders%2F": re.compile(r"%2Fvar%2Ffolders%2F", re.I),
}
# (path under results/, pattern name) -> why the hit may stay. Empty: every hit was rewritten.
ALLOWED: dict[tuple[str, str], str] = {}


def _committed_results() -> list[str]:
    r = subprocess.run(["git", "ls-files", "-z", "results"], cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in r.stdout.decode().split("\0") if f]


def test_committed_results_hold_no_machine_paths():
    hits = []
    for f in _committed_results():
        texts = [("name", f)]
        path = REPO / f
        if path.is_file():
            try:
                texts.append(("text", path.read_bytes().decode("utf-8")))
            except UnicodeDecodeError:  # binary (png, ...)
                pass
        for where, text in texts:
            for name, rx in MACHINE_PATHS.items():
                m = rx.search(text)
                if m and (f, name) not in ALLOWED:
                    line = text.count("\n", 0, m.start()) + 1
                    hits.append(f"{f} ({where}, line {line}): {name}: ...{text[max(0, m.start() - 40):m.end() + 40]!r}...")
    assert not hits, "machine paths in committed results:\n" + "\n".join(hits)
    stale = [k for k in ALLOWED if not (REPO / k[0]).exists()]
    assert not stale, f"ALLOWED names files that are gone: {stale}"


# ----------------------------------------------------------------------------- portable_path


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A working folder, a home folder, a temp folder and another folder, all apart."""
    dirs = {n: tmp_path / n for n in ("work", "home", "tmp", "other")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.chdir(dirs["work"])
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setattr(tempfile, "tempdir", str(dirs["tmp"]))
    return dirs


def _hash(p: Path) -> str:
    return hashlib.sha256(os.path.realpath(p).encode()).hexdigest()[:8]


def test_portable_path(layout):
    work, home, tmp, other = layout["work"], layout["home"], layout["tmp"], layout["other"]
    assert portable_path(work / "ckpt" / "tidar") == "ckpt/tidar" and portable_path(work) == "."
    assert portable_path("ckpt/tidar") == "ckpt/tidar" and portable_path("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # as written
    assert portable_path(home / ".cache" / "m") == "~/.cache/m" and portable_path(home) == "~"
    assert portable_path("~/.cache/m") == "~/.cache/m"
    assert portable_path(tmp / "tmp.x1" / "run") == f"run-{_hash(tmp / 'tmp.x1' / 'run')}"  # temp: name + hash
    assert portable_path(other / "m") == f"m-{_hash(other / 'm')}"
    assert portable_path("../other/m") == portable_path(other / "m")  # climbing out: as its absolute form
    assert portable_path(other / "a" / "m") != portable_path(other / "b" / "m")  # different paths, different names
    assert portable_path(home / ".cache" / "m", home=False) == f"m-{_hash(home / '.cache' / 'm')}"  # labels
    (work / "link").symlink_to(other)  # a link inside the working folder: shown as written there
    assert portable_path(work / "link" / "m") == "link/m"
    project = home / "project"
    project.mkdir()
    os.chdir(project)  # the working folder inside home: inside it wins (monkeypatch restores the cwd)
    assert portable_path(project / "x") == "x" and portable_path(home / "y") == "~/y"
    for p in (work / "a", home / "b", tmp / "c", other / "d"):
        assert str(layout["work"].parent) not in portable_path(p)


def test_portable_text_and_command(layout):
    home, tmp = layout["home"], layout["tmp"]
    cmd = (f"tidar-bench run --model {home}/.cache/m --decoders ar,dflash(draft={home}/.cache/d) --out {tmp}/run. "
           "see https://x.org/a/b, 1/2, $HOME/.cache and </g> <g/>")
    assert portable_text(cmd) == (f"tidar-bench run --model ~/.cache/m --decoders ar,dflash(draft=~/.cache/d) --out "
                                  f"run-{_hash(tmp / 'run')}. see https://x.org/a/b, 1/2, $HOME/.cache and </g> <g/>")
    assert portable_command(["tidar-bench", "plot", tmp / "a b", f"--out={home}/x", "rel/dir"]) == \
        f"tidar-bench plot 'a b-{_hash(tmp / 'a b')}' '--out=~/x' rel/dir"
    value = {"draft": str(home / "d"), "n": 3, "flag": None, "list": [str(tmp / "t")], "text": "N/A", "url": "http://a/b"}
    assert portable_value(value) == {"draft": "~/d", "n": 3, "flag": None, "list": [f"t-{_hash(tmp / 't')}"],
                                     "text": "N/A", "url": "http://a/b"}


def test_checkpoint_sha256_is_the_pipelines_weights_sha(tmp_path):
    """sha256 of the *.safetensors concatenated in name order, as scripts/smollm2_pipeline.sh's weights_sha."""
    (tmp_path / "model-00002.safetensors").write_bytes(b"two")
    (tmp_path / "model-00001.safetensors").write_bytes(b"one")
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_sha256(tmp_path) == hashlib.sha256(b"onetwo").hexdigest()
    assert checkpoint_sha256(tmp_path / "config.json") is None and checkpoint_sha256(tmp_path / "nope") is None


# ----------------------------------------------------------------------------- labels


def test_labels_show_a_path_option_in_portable_form(layout):
    from tidar_bench.harness.runner import RunSpec, _decoder_options, file_label
    from tidar_bench.registry import parse_settings

    work, other = layout["work"], layout["other"]
    plain = ["ar", "ar(compile=false)", "tidar(block_size=4)", "tidar(block_size=4,max_blocks=3)",
             "tidar(rule=authors,seed=0)", "bd(threshold=0.9)", "hf(compile=true)"]
    assert [st.label for st in parse_settings(",".join(plain))] == plain  # byte-identical
    settings = [f"dflash(draft={work / 'ckpt' / 'dflash'})", f"dflash(draft={other / 'a' / 'dflash'})",
                f"dflash(draft={other / 'b' / 'dflash'})", "dflash(draft=org/drafter)"]
    parsed = parse_settings(",".join(settings))
    labels = [st.label for st in parsed]
    assert labels[0] == "dflash(draft=ckpt/dflash)"  # inside the working folder: relative
    assert labels[1] == f"dflash(draft=dflash-{_hash(other / 'a' / 'dflash')})"  # outside: name + hash
    assert labels[1] != labels[2] and labels[3] == "dflash(draft=org/drafter)"  # a hub id is unchanged
    assert not any(str(layout["work"].parent) in lab or str(layout["work"].parent) in file_label(lab) for lab in labels)
    assert [dict(st.options)["draft"] for st in parsed] == [str(work / "ckpt" / "dflash"), str(other / "a" / "dflash"),
                                                            str(other / "b" / "dflash"), "org/drafter"]
    spec = RunSpec(model=work / "m", decoders=["ar", settings[1]], tasks=["mini_gsm"], out=work / "o")
    full, given, names = _decoder_options(spec)  # what build_decoder gets: the real path
    assert full[labels[1]]["draft"] == given[labels[1]]["draft"] == str(other / "a" / "dflash")
    assert spec.labels() == ["ar", labels[1]] and spec.identity()["decoders"] == ["ar", labels[1]]
    assert str(other) not in json.dumps(spec.identity()) + spec.command_line()
    assert label_value("plain") == "plain" and label_value("0.9") == "0.9"


# ----------------------------------------------------------------------------- runs


def _run(argv) -> dict:
    from tidar_bench.cli import main

    assert main(argv) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "run.json").read_text())


def test_a_run_writes_no_absolute_path_and_resumes(tmp_path):
    """A drafter in the temp folder (outside the working folder): the label is `dflash(draft=dflash-<hash>)`,
    the decoder loads the real folder, no output holds tmp_path, re-running decodes nothing, and a folder
    written before labels were portable (old names, old identity) resumes too, its files renamed."""
    from tidar_bench.harness.runner import RunSpec, file_label, setting_text
    from tidar_bench.registry import parse_settings

    draft = tmp_path / "drafter" / "dflash"
    shutil.copytree(EMBEDDED / "dflash", draft)
    out = tmp_path / "run"
    setting = f"dflash(draft={draft})"
    argv = ["run", "--model", str(EMBEDDED / "base"), "--decoders", f"ar,{setting}", "--tasks", "mini_gsm",
            "--limit", "1", "--device", "cpu", "--compile", "off", "--out", str(out)]
    info = _run(argv)
    label = f"dflash(draft={label_value(str(draft))})"
    assert re.fullmatch(r"dflash\(draft=dflash-[0-9a-f]{8}\)", label) and label in info["decoders"]
    assert info["decoders"][label]["decoded_this_invocation"] == 1  # loaded from the real path, decoded
    assert info["checkpoints"][f"{label}.draft"] == {"path": portable_path(draft), "sha256": checkpoint_sha256(draft)}
    assert info["checkpoints"]["model"]["sha256"] == checkpoint_sha256(EMBEDDED / "base")
    names = sorted(p.name for p in out.rglob("*"))
    assert f"results_{label}.json" in names and label in names
    for f in out.rglob("*"):
        assert str(tmp_path) not in f.name
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            assert str(tmp_path) not in text and str(REPO) not in text, f
    assert sum(d["decoded_this_invocation"] for d in _run(argv)["decoders"].values()) == 0  # resumed

    # the same folder as an older version wrote it: labels as typed (percent-encoded paths), absolute identity
    spec = RunSpec(model=EMBEDDED / "base", decoders=["ar", setting], tasks=["mini_gsm"], out=out, limit=1,
                   device="cpu", compile="off")
    old = file_label(setting_text(parse_settings(setting)[0]))
    assert old.startswith("dflash(draft=%2F")
    os.replace(out / "cache" / label, out / "cache" / old)
    os.replace(out / f"results_{label}.json", out / f"results_{old}.json")
    os.replace(out / f"samples_{label}_tb_mini_gsm.jsonl", out / f"samples_{old}_tb_mini_gsm.jsonl")
    (out / "run_spec.json").write_text(json.dumps({"identity": spec.legacy_identity(), "command": "old"}))
    assert sum(d["decoded_this_invocation"] for d in _run(argv)["decoders"].values()) == 0  # cache keys unchanged
    assert not list(out.rglob("*%2F*")) and (out / "cache" / label).is_dir()
    assert json.loads((out / "run_spec.json").read_text())["identity"] == spec.identity()


def _spec_from_command(command: str):
    """RunSpec of a recorded `tidar-bench run ...` command (paths as recorded: `~/...`)."""
    from tidar_bench.harness.runner import RunSpec, setting_text
    from tidar_bench.registry import parse_settings

    argv, opts, flags, decoder_args = shlex.split(command)[2:], {}, set(), []
    i = 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            if argv[i] == "--decoder-arg":
                decoder_args.append(argv[i + 1])
            opts[argv[i]] = argv[i + 1]
            i += 2
        else:
            flags.add(argv[i])
            i += 1
    path = lambda k: Path(os.path.expanduser(opts[k])) if k in opts else None  # noqa: E731
    return RunSpec(model=path("--model"), decoders=[setting_text(st) for st in parse_settings(opts["--decoders"])],
                   tasks=opts["--tasks"].split(","), out=path("--out"), draft=path("--draft"),
                   limit=int(opts["--limit"]) if "--limit" in opts else None, device=opts["--device"],
                   dtype=opts["--dtype"], seed=int(opts["--seed"]), decoder_args=decoder_args,
                   allow_code_exec="--allow-code-exec" in flags, include_path=path("--include-path"),
                   apply_chat_template="--apply-chat-template" in flags, gen_kwargs=opts.get("--gen-kwargs"),
                   compile=opts["--compile"], batch_size=int(opts.get("--batch-size", 1)))


def test_committed_smollm2_runs_resume_on_their_machine_layout(monkeypatch):
    """scripts/smollm2_pipeline.sh re-run on the machine layout of the committed runs (home /root, run from
    the repository) computes the identity their run_spec.json holds: `run` accepts the folders (and the
    renamed dflash files carry the label it writes), so the pipeline reuses their caches."""
    from tidar_bench.harness.runner import file_label

    cache = "/root/.cache/tidar-bench/smollm2-pipeline"
    if os.path.realpath(cache) != cache:
        pytest.skip(f"{cache} resolves elsewhere on this machine: its hash differs")
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.chdir(REPO)
    folders = sorted((REPO / "results" / "smollm2" / "runs").glob("*/run_spec.json"))
    assert len(folders) == 6
    for f in folders:
        rec = json.loads(f.read_text())
        spec = _spec_from_command(rec["command"])
        assert spec.identity() == rec["identity"], f
        assert spec.command_line() == rec["command"], f  # and the command as `run` records it now
        for label in spec.labels():
            assert any((f.parent / "cache" / file_label(label)).glob("*.jsonl")), (f, label)
