"""The embedded model suite (tidar_bench/embedded/, built by scripts/build_embedded.py): every shipped
checkpoint loads through the ordinary loader and decodes with each of its decoders; the lossless
decoders equal their checkpoint's AR greedy tokens; the mini tasks' data is shipped and held out;
`tidar-bench run` with no --model runs the whole suite."""

import csv
import json

import pytest

from tidar_bench.cli import main
from tidar_bench.corpus import make_splits
from tidar_bench.decoding import GenerationConfig
from tidar_bench.harness import suite
from tidar_bench.harness.tasks import load_splits
from tidar_bench.registry import DecoderContext, build_decoder

ROOT = suite.EMBEDDED_DIR
PROMPTS = ["Question: Ava has 12 apples. Ava buys 3 boxes with 4 apples in each box. How many apples does Ava have now?\nAnswer:",
           'def sum_values(xs):\n    """Return the sum of the numbers in xs."""\n',
           "Problem:\nWhat is $7 \\times 6 + 5$?\n\nSolution:"]


def _decode(name, ckpt, draft=None, **options):
    ctx = DecoderContext(ROOT / ckpt, "cpu", "float32", ROOT / draft if draft else None)
    dec = build_decoder(name, ctx, {k: str(v) for k, v in options.items()})
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=(ctx.tokenizer.eos_token_id,))
    return [dec.generate(ctx.tokenizer.encode(p), cfg) for p in PROMPTS]


def test_suite_is_complete_and_small():
    assert suite.embedded_dir() == ROOT
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert size <= 25e6, f"embedded suite is {size / 1e6:.1f} MB, budget 25 MB"
    build = json.loads((ROOT / "BUILD.json").read_text())
    assert [s["name"] for s in build["steps"]] == ["ar", "tidar", "bd", "eagle", "dflash"]
    assert all(s["command"].startswith("tidar-bench train ") for s in build["steps"])


@pytest.mark.parametrize("ckpt,decoders", [("base", ["ar", "hf", "eagle", "dflash"]), ("tidar", ["ar", "tidar"]),
                                           ("bd", ["bd"])])
def test_every_checkpoint_decodes_with_its_decoders(ckpt, decoders):
    outs = {d: _decode(d, ckpt, d if d in ("eagle", "dflash") else None) for d in decoders}
    for d, gens in outs.items():
        for g in gens:
            assert g.stats.new_tokens >= 1 and g.stats.nfe >= 1, (ckpt, d)
    for d in decoders:
        if d in ("hf", "eagle", "dflash", "tidar"):  # lossless: greedy tokens equal the checkpoint's own AR
            assert [g.tokens for g in outs[d]] == [g.tokens for g in outs["ar"]], (ckpt, d)


def test_eagle_chain_equals_ar():
    assert [g.tokens for g in _decode("eagle", "base", "eagle", tree=False, chain_length=4)] == \
        [g.tokens for g in _decode("ar", "base")]


def test_mini_tasks_are_the_held_out_split():
    _, held = make_splits(30000, 300, seed=0)  # the build's defaults
    for fam in ("gsm", "code", "math"):
        shipped = load_splits(f"mini_{fam}")["test"]
        assert shipped == [it for it in held if it["family"] == fam]
        assert 50 <= len(shipped) <= 120


def test_default_run_without_model(tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["run", "--tasks", "mini_gsm", "--limit", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for name in ("hf", "eagle", "dflash", "lookup", "tidar", "bd"):
        assert name in table
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {(r["model"], r["decoder"]) for r in rows} == {("base", "ar"), ("base", "hf"), ("base", "eagle"),
                                                          ("base", "dflash"), ("base", "lookup"), ("tidar", "ar"), ("tidar", "tidar"), ("bd", "ar"),
                                                          ("bd", "bd")}
    assert all(r["n"] == "2" for r in rows)
    by = {(r["model"], r["decoder"]): r for r in rows}
    for model in ("base", "tidar", "bd"):
        assert float(by[(model, "ar")]["speedup_vs_ar"]) == pytest.approx(1.0)
    for key in (("base", "hf"), ("base", "eagle"), ("base", "dflash"), ("tidar", "tidar")):
        assert by[key]["mismatches_vs_ar"] == "0", key
    info = json.loads((out / "suite.json").read_text())
    assert info["command"].startswith("tidar-bench run --tasks mini_gsm")
    for sub in ("base", "tidar", "bd"):
        assert (out / sub / "run.json").is_file()
    # a different command into the same folder is refused; the same one resumes
    assert main(["run", "--tasks", "mini_math", "--limit", "2", "--out", str(out)]) == 2


def test_code_task_needs_opt_in(monkeypatch):
    from tidar_bench.harness import sandbox

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "0")  # recorded, so the grant below is undone after the test
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")

    monkeypatch.setattr(sandbox, "_granted", False, raising=False)
    assert "mini_code" not in suite.default_tasks(False)
    assert suite.default_tasks(True) == ["mini_gsm", "mini_code", "mini_math"]


def test_speed_on_real_prompts(tmp_path, capsys):
    out = tmp_path / "speed.json"
    args = ["speed", "--model", str(ROOT / "tidar"), "--decoders", "ar,tidar", "--prompts-file",
            str(suite.EMBEDDED_DIR.parents[1] / "tasks" / "data" / "mini" / "gsm.jsonl"), "--prompts", "3",
            "--max-new-tokens", "32", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    rec = json.loads(out.read_text())
    assert rec["prompts"].startswith("3 prompts of ")
    assert rec["decoders"]["tidar"]["lossless_mismatches"] == 0
    assert rec["decoders"]["tidar"]["tokens"] == rec["decoders"]["ar"]["tokens"]  # same outputs, EOS-stopped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt field"}\n')
    assert main(args[:6] + [str(bad)] + args[7:]) == 2
    assert "expected a JSON object with a `prompt` field" in capsys.readouterr().err


def test_default_run_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["run", "--tasks", "nope", "--limit", "1", "--out", str(out)]) == 2
    assert main(["run", "--tasks", "mini_gsm", "--decoder-arg", "no_such_option=1", "--out", str(out)]) == 2
    assert main(["run", "--tasks", "mini_gsm", "--decoder-arg", "tidar.no_such_option=1", "--out", str(out)]) == 2
    assert main(["run", "--tasks", "mini_gsm", "--decoder-arg", "nope.block_size=1", "--out", str(out)]) == 2
    assert main(["run", "--decoders", "ar,tidar", "--tasks", "mini_gsm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown task" in err and "several decoders" in err and "has no option 'no_such_option'" in err
    assert "names decoder 'nope'" in err and "need --model" in err
    assert not out.exists()


def test_a_decoder_option_with_a_path_stays_one_file_name(tmp_path):
    """`dflash(draft=/a/b)` as a decoder setting: its label shows the path in portable form (relative to the
    working folder, or `<name>-<hash>`), so its cache, results and samples are single files of the run
    folder (the label percent-encoded), not folders nested along the path, and hold no absolute path."""
    from tidar_bench.harness.runner import file_label
    from tidar_bench.provenance import label_value

    setting = f"dflash(draft={ROOT / 'dflash'})"
    label = f"dflash(draft={label_value(str(ROOT / 'dflash'))})"
    out = tmp_path / "run"
    assert main(["run", "--model", str(ROOT / "base"), "--decoders", f"ar,{setting}", "--tasks", "mini_gsm", "--limit", "1",
                 "--device", "cpu", "--compile", "off", "--out", str(out)]) == 0
    name = file_label(label)
    assert "/" not in name and not name.startswith("dflash(draft=%2F")
    assert (out / f"results_{name}.json").is_file() and (out / f"samples_{name}_tb_mini_gsm.jsonl").is_file()
    assert (out / "cache" / name / "tb_mini_gsm.jsonl").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["cache"]
    assert file_label("tidar(max_blocks=3)") == "tidar(max_blocks=3)"  # labels without a path keep their names
