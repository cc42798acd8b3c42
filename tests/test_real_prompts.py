"""What real prompts do, on every path (generate, speed, speed --batch-size, run): a prompt whose first
token is EOS (0 new tokens: its ratio is reported as missing, never divided), prompts files with
blank lines, prompts longer than the context (left-truncated, said so)."""

import json
import shutil

import pytest

from tidar_bench.cli import main

EMBEDDED = "tidar_bench/embedded/base"


def first_token(model, prompt: str, capsys) -> int:
    assert main(["generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"][0]


@pytest.fixture
def eos_first(tmp_path, capsys):
    """The embedded base with its EOS set to the greedy first token of the prompt "Question: Eli":
    that prompt ends at once, "Question: Tom" does not."""
    d = tmp_path / "base"
    shutil.copytree(EMBEDDED, d)
    eos = first_token(d, "Question: Eli", capsys)
    assert first_token(d, "Question: Tom", capsys) != eos
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n" + json.dumps({"prompt": "Question: Eli"}) + "\n\n   \n"
                       + json.dumps({"prompt": "Question: Tom"}) + "\n\n")
    return d, prompts


def test_generate_eos_first(eos_first, capsys):
    model, _ = eos_first
    assert main(["generate", "--model", str(model), "--prompt", "Question: Eli", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == [] and out["finish_reason"] == "stop_token" and out["stats"]["new_tokens"] == 0


def test_speed_eos_first_is_reported_not_divided(eos_first, tmp_path, capsys):
    model, prompts = eos_first
    rec_path = tmp_path / "speed.json"
    assert main(["speed", "--model", str(model), "--prompts-file", str(prompts), "--decoders",
                 "ar,ar(compile=false),hf", "--max-new-tokens", "6", "--out", str(rec_path)]) == 0
    out = capsys.readouterr().out
    assert "0 new tokens" in out and "no ratio" in out
    rec = json.loads(rec_path.read_text())
    assert rec["n_prompts"] == 2  # the blank lines are not prompts
    assert {z["prompt"] for z in rec["zero_token_prompts"]} == {0}
    for label in ("ar(compile=false)", "hf"):
        d = rec["decoders"][label]
        assert len(d["paired_ratios"]) == 1 and d["prompts_without_ratio"] == 1
        assert d["lossless_mismatches"] in (0, None)


def test_speed_batched_eos_first(eos_first, capsys):
    model, prompts = eos_first
    assert main(["speed", "--model", str(model), "--prompts-file", str(prompts), "--decoders", "ar,hf",
                 "--max-new-tokens", "6", "--batch-size", "1,2", "--rounds", "1"]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "batched speed" in cap.out


def test_speed_all_prompts_eos_first(eos_first, tmp_path, capsys):
    model, _ = eos_first
    only = tmp_path / "eli.jsonl"
    only.write_text(json.dumps({"prompt": "Question: Eli"}) + "\n")
    rec_path = tmp_path / "speed.json"
    assert main(["speed", "--model", str(model), "--prompts-file", str(only), "--decoders", "ar,ar(compile=false)",
                 "--out", str(rec_path)]) == 0
    d = json.loads(rec_path.read_text())["decoders"]["ar(compile=false)"]
    assert d["speedup_vs_first"] is None and d["paired_ratios"] == [] and d["tokens"] == 0
    assert "n/a (0 tokens)" in capsys.readouterr().out


def test_run_eos_first(eos_first, tmp_path, capsys):
    model, _ = eos_first
    first = tmp_path / "first"
    argv = ["run", "--model", str(model), "--tasks", "mini_gsm", "--limit", "2", "--decoders", "ar,ar(compile=false)"]
    assert main([*argv, "--out", str(first)]) == 0
    sample = json.loads((first / "cache" / "ar" / "tb_mini_gsm.jsonl").read_text().splitlines()[0])
    assert sample["tokens"] and sample["doc_id"] == 0, sample
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": sample["tokens"][0]}))
    again = tmp_path / "again"
    assert main([*argv, "--out", str(again)]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (again / "cache" / "ar" / "tb_mini_gsm.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows if r["doc_id"] == 0] == [[]]
    info = json.loads((again / "run.json").read_text())
    assert info["mismatches_vs_ar"]["ar(compile=false)"] == 0 and info["reference"] == "ar"


def test_prompt_longer_than_context(capsys, tmp_path):
    long_ids = ",".join(["5"] * 1100)  # the embedded models have a context of 1024 tokens
    assert main(["generate", "--model", EMBEDDED, "--prompt-ids", long_ids, "--max-new-tokens", "4", "--json"]) == 0
    cap = capsys.readouterr()
    assert "left-truncated to its last 1020 tokens" in cap.err and len(json.loads(cap.out)["tokens"]) == 4
    rec_path = tmp_path / "speed.json"
    assert main(["speed", "--model", EMBEDDED, "--decoders", "ar,ar(compile=false)", "--prompts", "1",
                 "--prompt-len", "1100", "--max-new-tokens", "4", "--out", str(rec_path)]) == 0
    assert "1 left-truncated to fit the context of 1024 tokens" in json.loads(rec_path.read_text())["prompts"]
    assert main(["generate", "--model", EMBEDDED, "--prompt-ids", "5", "--max-new-tokens", "1024"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-new-tokens 1024 leaves no room")
