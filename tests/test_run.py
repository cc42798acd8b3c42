"""`tidar-bench run` end to end on a tiny random model with its own tokenizer and two toy lm-eval
tasks (local JSONL, offline): run folder contents, lossless check vs ar, resume without decoding,
bad input, and a 2-process torchrun run equal to the single-process one."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidar_bench.cli import main

QUESTIONS = [(f"What is {a} plus {b}?", str(a + b)) for a in range(3, 9) for b in range(2, 7)]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/test.jsonl
    train: {data}/train.jsonl
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "{prefix} {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
num_fewshot: 1
generation_kwargs: {{until: ["\\n", "{prefix}"], do_sample: false, max_gen_toks: {max_toks}}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}]
filter_list: [{{name: first-number, filter: [{{function: regex, regex_pattern: "(-?[0-9]+)"}}, {{function: take_first}}]}}]
metadata: {{version: 1.0}}
"""


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama with a BPE tokenizer trained here (vocab == model vocab) and two toy tasks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tidar_bench.testing import make_hf_model

    root = tmp_path_factory.mktemp("run")
    model = root / "model"
    lines = [f"Question: {q}\nAnswer: {a}" for q, a in QUESTIONS] * 4 + [f"Sum {i} and {i + 1}." for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", model_max_length=512)
    make_hf_model("llama", model, vocab_size=tok.get_vocab_size())
    hf_tok.save_pretrained(str(model))
    tasks = root / "tasks"
    for name, prefix, max_toks in (("toy_add", "Question:", 12), ("toy_sum", "Compute:", 8)):
        data = tasks / name
        data.mkdir(parents=True)
        _write_jsonl(data / "test.jsonl", [{"question": q, "answer": a} for q, a in QUESTIONS[:6]])
        _write_jsonl(data / "train.jsonl", [{"question": q, "answer": a} for q, a in QUESTIONS[6:]])
        (data / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, prefix=prefix, max_toks=max_toks))
    return model, tasks


def _argv(model, tasks, out, *extra):
    return ["run", "--model", str(model), "--decoders", "ar,hf", "--tasks", "toy_add,toy_sum", "--limit", "2",
            "--device", "cpu", "--seed", "0", "--out", str(out), "--include-path", str(tasks), *extra]


def _summary(out):
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


def _outputs(out, decoder, task):
    return [(json.loads(line)["doc_id"], json.loads(line)["output"])
            for line in (out / f"samples_{decoder}_{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(setup, tmp_path_factory):
    model, tasks = setup
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(_argv(model, tasks, out)) == 0
    return out


def test_run_folder(single_run):
    out = single_run
    for d in ("ar", "hf"):
        res = json.loads((out / f"results_{d}.json").read_text())
        assert set(res["results"]) == {"toy_add", "toy_sum"}
        for task in ("toy_add", "toy_sum"):
            rows = [json.loads(x) for x in (out / f"samples_{d}_{task}.jsonl").read_text().splitlines()]
            assert [r["doc_id"] for r in rows] == [0, 1]
            for r in rows:
                assert r["new_tokens"] >= 1 and r["nfe"] >= 1 and r["latency_s"] > 0 and len(r["prompt_hash"]) > 8
                assert r["new_tokens"] <= (12 if task == "toy_add" else 8)
                assert isinstance(r["output"][0], str) and "\n" not in r["output"][0]
    rows = _summary(out)
    assert {(r["task"], r["decoder"]) for r in rows} == {(t, d) for t in ("toy_add", "toy_sum") for d in ("ar", "hf")}
    for r in rows:
        assert r["metric"] == "exact_match,first-number" and r["n"] == "2"
        assert 0.0 <= float(r["score"]) <= 1.0 and float(r["tokens_per_s"]) > 0 and float(r["tokens_per_nfe"]) > 0
        if r["decoder"] == "hf":
            assert r["mismatches_vs_ar"] == "0" and float(r["speedup_vs_ar"]) > 0
        else:
            assert float(r["speedup_vs_ar"]) == pytest.approx(1.0)
    info = json.loads((out / "run.json").read_text())
    assert info["mismatches_vs_ar"] == {"ar": None, "hf": 0}
    assert info["batch_size"] == 1 and info["seed"] == 0 and info["environment"]["torch"]
    assert info["decoders"]["ar"]["decoded_this_invocation"] == 4 and info["decoders"]["hf"]["lossless"]
    assert 0 < info["overhead_fraction"] < 0.25  # per-request bookkeeping is small next to decoding
    assert "--decoders ar,hf" in info["command"]
    # identical prompts and outputs (ar and hf are both greedy-exact)
    for task in ("toy_add", "toy_sum"):
        assert _outputs(out, "ar", task) == _outputs(out, "hf", task)
    assert not list(out.rglob(".*.tmp*"))


def test_rerun_does_no_decoding(setup, single_run, monkeypatch):
    from tidar_bench.baselines.ar import ARDecoder
    from tidar_bench.baselines.hf import HFDecoder

    def boom(self, *a, **k):
        raise AssertionError("decoder.generate called on a resumed run")

    monkeypatch.setattr(ARDecoder, "generate", boom)
    monkeypatch.setattr(HFDecoder, "generate", boom)
    before = _summary(single_run)
    model, tasks = setup
    assert main(_argv(model, tasks, single_run)) == 0
    after = _summary(single_run)
    assert after == before  # timings come from the cache too
    info = json.loads((single_run / "run.json").read_text())
    assert all(d["decoded_this_invocation"] == 0 for d in info["decoders"].values())


def test_cache_survives_a_torn_line(setup, single_run, tmp_path, monkeypatch):
    """An interrupted append leaves a partial line: the other samples are still reused."""
    import shutil

    from tidar_bench.baselines.ar import ARDecoder

    out = tmp_path / "out"
    shutil.copytree(single_run, out)
    cache = out / "cache" / "ar" / "toy_add.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # 2nd sample torn mid-write
    calls = []
    real = ARDecoder.generate
    monkeypatch.setattr(ARDecoder, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model, tasks = setup
    assert main(_argv(model, tasks, out)) == 0
    assert len(calls) == 2  # the warm-up + the one lost sample
    assert _outputs(out, "ar", "toy_add") == _outputs(single_run, "ar", "toy_add")


def test_bad_input_exits_2_and_writes_nothing(setup, tmp_path, capsys):
    model, tasks = setup
    new = tmp_path / "new"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (_argv(model, tasks, new)[:6] + ["toy_add,nope"] + _argv(model, tasks, new)[7:], "nope"),
        (["run", "--model", str(model), "--decoders", "ar,zzz", "--tasks", "toy_add", "--out", str(new),
          "--include-path", str(tasks)], "zzz"),
        (["run", "--model", str(tmp_path / "missing"), "--tasks", "toy_add", "--out", str(new),
          "--include-path", str(tasks)], "not found"),
        (_argv(model, tasks, new, "--limit", "0"), "--limit"),
        (_argv(model, tasks, foreign), "not empty"),
        (_argv(model, tasks, new, "--decoder-arg", "nosuch=1"), "nosuch"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (argv, err)
        assert not new.exists()
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_different_command_into_a_run_folder_is_refused(setup, single_run, capsys):
    model, tasks = setup
    before = sorted(p.name for p in single_run.rglob("*"))
    assert main(_argv(model, tasks, single_run, "--seed", "1")) == 2
    assert "different command" in capsys.readouterr().err
    assert sorted(p.name for p in single_run.rglob("*")) == before


def test_torchrun_two_processes_equal_single(setup, single_run, tmp_path):
    model, tasks = setup
    out = tmp_path / "sharded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tidar_bench.cli", *_argv(model, tasks, out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2
    # each rank decoded its half; rank 0 merged the shards into the single-process layout
    assert sorted(f.name for f in (out / "cache" / "ar").iterdir()) == ["toy_add.jsonl", "toy_sum.jsonl"]
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in single_run.iterdir())
    for d in ("ar", "hf"):
        for task in ("toy_add", "toy_sum"):
            assert _outputs(out, d, task) == _outputs(single_run, d, task)
    timing = {"tokens_per_s", "speedup_vs_ar", "ar_tokens_per_s"}  # machine timings differ per run
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_summary(out)) == strip(_summary(single_run))


def test_lm_adapter_by_name_and_loglikelihood(setup):
    """`--model tidar-bench` resolves through lm-eval's registry after the import, and
    loglikelihood equals transformers' log-probabilities of the continuation."""
    from types import SimpleNamespace

    import torch
    from lm_eval.api.registry import get_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tidar_bench.harness.lm  # noqa: F401 - registers "tidar-bench"

    model, _ = setup
    lm = get_model("tidar-bench").create_from_arg_string(f"pretrained={model},decoder=ar,device=cpu,seed=3")
    assert lm.decoder_name == "ar" and lm.seed == 3
    context, cont = "Question: What is 3 plus 4?\nAnswer:", " 7"
    (ll, greedy), = lm.loglikelihood([SimpleNamespace(args=(context, cont))])
    tok = AutoTokenizer.from_pretrained(str(model))
    ref = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ctx_ids = tok.encode(context, add_special_tokens=False)
    cont_ids = tok.encode(context + cont, add_special_tokens=False)[len(ctx_ids):]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ctx_ids + cont_ids])).logits[0].float(), -1)
    want = sum(float(logp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(cont_ids))
    assert ll == pytest.approx(want, abs=1e-3)
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(context,))])
    assert rolling < 0
    (text,) = lm.generate_until([SimpleNamespace(args=(context, {"until": ["\n"], "max_gen_toks": 5}),
                                                 task_name="t", doc_id=0)])
    rec = lm.records[0]
    assert text == rec["output"] and 1 <= rec["new_tokens"] <= 5 and rec["nfe"] >= 1 and rec["greedy"]
