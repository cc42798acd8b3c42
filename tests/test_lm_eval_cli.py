"""Issue 15: `tidar-lm-eval` keeps every lm-eval model, instruct options, and bad input of the
comparable-with-lm-eval features gives one clear line (hub id offline, no tokenizer, no chat template)."""

import json
import sys

import pytest

from tidar_bench.cli import main
from tidar_bench.testing import make_hf_model

from test_lm_eval_parity import make_llama3_like


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    make_llama3_like(d)
    return d


def test_builtin_models_stay_registered_beside_ours():
    import tidar_bench.harness.lm  # noqa: F401 - registers tidar-bench
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("tidar-bench").__name__ == "TidarBenchLM"
    assert get_model("hf").__name__ == "HFLM"
    assert {"hf", "vllm", "local-completions", "tidar-bench"} <= set(model_registry.keys())


def test_tidar_lm_eval_runs_lm_evals_own_hf_model(chat_model, tmp_path, monkeypatch, capsys):
    """`tidar-lm-eval run --model hf ...` (the command of the issue), in-process."""
    from tidar_bench.harness import tasks as T
    from tidar_bench.harness.lm import lm_eval_cli

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "tidar-lm-eval", "run", "--model", "hf", "--model_args", f"pretrained={chat_model},dtype=float32",
        "--device", "cpu", "--tasks", "tb_gsm8k", "--include_path", str(T.tasks_dir()), "--limit", "1",
        "--gen_kwargs", "max_gen_toks=4", "--output_path", str(out)])
    lm_eval_cli()
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "hf"
    assert "exact_match,strict-match" in results["results"]["tb_gsm8k"]


def _one_error_line(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_bad_input_one_line_nothing_written(chat_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    no_tok = tmp_path / "no_tokenizer"
    make_hf_model("llama", no_tok)
    plain = tmp_path / "no_template"
    make_llama3_like(plain, chat_template=False)
    base = ["--tasks", "gsm8k", "--limit", "1", "--device", "cpu", "--out", str(out)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cases = [
        (["run", "--model", "Qwen/Qwen2.5-1.5B-Instruct", *base], "HF_HUB_OFFLINE"),
        (["run", "--model", str(no_tok), *base], "has no tokenizer"),
        (["run", "--model", str(plain), "--apply-chat-template", *base], "has no chat template"),
        (["run", "--model", str(chat_model), "--fewshot-as-multiturn", *base], "needs --apply-chat-template"),
        (["run", "--apply-chat-template"], "need --model"),
    ]
    capsys.readouterr()  # progress bars of building the checkpoints
    for argv, needle in cases:
        assert main(argv) == 2, argv
        _one_error_line(capsys, needle)
        assert not out.exists()


def test_chat_template_prompts_equal_lm_evals_hf(chat_model, tmp_path):
    """--apply-chat-template --fewshot-as-multiturn --system-instruction mean what they mean in lm-eval:
    the same chat-formatted prompt as HFLM's, tokenized without a second BOS; instruct tasks offline."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from tidar_bench.harness import tasks as T
    from tidar_bench.harness.lm import TidarBenchLM
    from tidar_bench.registry import DecoderContext

    out = tmp_path / "run"
    system = "You are a careful solver."
    assert main(["run", "--model", str(chat_model), "--tasks", "gsm8k_cot_llama,gsm8k_cot_zeroshot", "--limit", "1",
                 "--device", "cpu", "--dtype", "float32", "--out", str(out), "--apply-chat-template",
                 "--system-instruction", system, "--gen-kwargs", "max_gen_toks=4"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["prompt_options"] == {"apply_chat_template": True, "fewshot_as_multiturn": True,
                                      "system_instruction": system, "gen_kwargs": "max_gen_toks=4"}
    hflm = HFLM(pretrained=str(chat_model), device="cpu", dtype="float32", batch_size=1)
    hflm.generate_until = lambda requests, disable_tqdm=False: ["" for _ in requests]  # prompts only
    res = lm_eval.simple_evaluate(model=hflm, tasks=["tb_gsm8k_cot_llama", "tb_gsm8k_cot_zeroshot"],
                                  task_manager=T.task_manager(), limit=1, log_samples=True, apply_chat_template=True,
                                  fewshot_as_multiturn=True, system_instruction=system)
    ours = TidarBenchLM(DecoderContext(chat_model, "cpu", "float32"), "ar")
    for task in ("tb_gsm8k_cot_llama", "tb_gsm8k_cot_zeroshot"):
        theirs = res["samples"][task][0]["arguments"][0][0]
        rows = [json.loads(x) for x in (out / f"samples_ar_{task}.jsonl").read_text().splitlines()]
        assert {r["prompt"] for r in rows} == {theirs}  # one row per filter, one document
        assert theirs.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + system)
        ids = ours.encode_context(theirs)
        assert ids == hflm.tok_batch_encode([theirs])[0][0].tolist() and ids.count(ids[0]) == 1  # one BOS
    assert theirs.count("<|start_header_id|>user") == 1  # zero-shot
    llama = res["samples"]["tb_gsm8k_cot_llama"][0]["arguments"][0][0]
    assert llama.count("<|start_header_id|>user") == 9  # 8 shots as turns + the question


def test_every_decoder_stops_on_each_generation_config_eos_id(tmp_path):
    """generation_config.json's eos_token_id list is honoured through the lm-eval adapter: when the
    model's greedy 3rd token is listed there (as Llama-3's <|eot_id|> is), ar and hf stop before it."""
    from types import SimpleNamespace

    from tidar_bench.harness.lm import TidarBenchLM
    from tidar_bench.registry import DecoderContext

    d = tmp_path / "m"
    ids = make_llama3_like(d)
    context, kwargs = "Question: What is 2 plus 3?\nAnswer:", {"until": [], "max_gen_toks": 6}

    def run(decoder):
        lm = TidarBenchLM(DecoderContext(d, "cpu", "float32"), decoder)
        lm.generate_until([SimpleNamespace(args=(context, kwargs), task_name="t", doc_id=0)])
        return lm.records[0]

    free = run("ar")
    assert free["new_tokens"] == 6 and free["finish_reason"] == "length"
    third = free["tokens"][2]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|endoftext|>"], third]}))
    for decoder in ("ar", "hf"):
        rec = run(decoder)
        want = free["tokens"][:free["tokens"].index(third)]  # up to its first occurrence
        assert rec["tokens"] == want and rec["finish_reason"] == "stop_token", decoder


def test_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    """A hub id already in the Hugging Face cache resolves offline to its snapshot folder; one without
    safetensors is refused in one line."""
    from tidar_bench.errors import UserError
    from tidar_bench.registry import resolve_model

    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for repo, weights in (("org/tiny", "model.safetensors"), ("org/binonly", "pytorch_model.bin")):
        snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
        (snap / weights).write_bytes(b"x")
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("abc123")
    assert resolve_model("org/tiny") == cache / "models--org--tiny" / "snapshots" / "abc123"
    with pytest.raises(UserError, match="no safetensors"):
        resolve_model("org/binonly")
    assert resolve_model(str(tmp_path)) == tmp_path  # a folder stays a folder
