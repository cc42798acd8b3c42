"""CLI: user mistakes exit 2 with one line; the core commands work."""

import json

from tidar_bench.cli import main


def test_generate_json(tiny_llama, capsys):
    assert main(["generate", "--model", str(tiny_llama), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                 "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 5 and out["stats"]["nfe"] == 5


def test_user_errors_are_one_line(tmp_path, tiny_llama, capsys):
    cases = [
        ["generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1"],
        ["generate", "--model", str(tiny_llama), "--prompt-ids", "1,x"],
        ["generate", "--model", str(tiny_llama), "--prompt", "hi"],  # no tokenizer
        ["generate", "--model", str(tiny_llama), "--prompt-ids", "1", "--decoder", "nope"],
        ["generate", "--model", str(tiny_llama), "--prompt-ids", "1", "--decoder-arg", "x"],
        ["speed", "--model", str(tiny_llama), "--config", "tiny"],
        ["speed", "--config", "no-such-config"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)


def test_speed_command_runs_paired(tiny_llama, capsys, tmp_path):
    out_json = tmp_path / "speed.json"
    assert main(["speed", "--model", str(tiny_llama), "--decoders", "ar,ar(compile=false),hf", "--prompts", "2",
                 "--prompt-len", "8", "--max-new-tokens", "8", "--device", "cpu", "--compile", "off",
                 "--out", str(out_json)]) == 0
    out = capsys.readouterr().out
    # every speedup is printed with the reference's own tokens/s and compile mode
    assert "ar(compile=false)" in out and "vs ar (total)" in out and "reference: ar (eager) at" in out
    rec = json.loads(out_json.read_text())
    assert rec["reference"] == "ar" and rec["reference_tokens_per_s"] > 0 and rec["n_prompts"] == 2
    assert set(rec["decoders"]) == {"ar", "ar(compile=false)", "hf"}
    for label, d in rec["decoders"].items():
        assert d["compiled"] is False and len(d["paired_ratios"]) in (0, 2)
        assert (d["lossless_check"], d["lossless_mismatches"]) == (("reference", None) if label == "ar" else ("checked", 0))
