"""Same numbers as lm-eval (issue 15): on a tiny random Llama with a real byte-level BPE tokenizer
(the embedded suite's, made Llama-3-like: a BOS added by the tokenizer, an `<|eot_id|>` turn end
listed in generation_config.json's eos_token_id, a chat template), `tidar-bench run --decoders ar,hf`
and lm-eval's own `hf` model (HFLM through `lm_eval.simple_evaluate`, lm-eval's default seeds) get
byte-identical prompts, identical token ids for them, identical greedy outputs and identical scores
on gsm8k, gsm8k_cot, minerva_math_algebra, mbpp and humaneval (both with `max_gen_toks=10`, lm-eval's
--gen_kwargs, to keep the test short).

Both sides run the shipped `tb_*` tasks (lm-eval's own humaneval/mbpp need `code_eval` from the Hub):
the code tasks' scores are our sandbox's verdicts on each side's outputs. The weights are random, so
most scores are 0; the identical filtered answers per sample are the stronger check."""

import json
import shutil
from pathlib import Path

import pytest

from tidar_bench.cli import main
from tidar_bench.harness import sandbox
from tidar_bench.harness import tasks as T

EMBEDDED_TOKENIZER = Path(__file__).resolve().parents[1] / "tidar_bench" / "embedded" / "base" / "tokenizer.json"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TASKS = {"gsm8k": "tb_gsm8k", "gsm8k_cot": "tb_gsm8k_cot", "minerva_math_algebra": "tb_minerva_math_algebra",
         "mbpp": "tb_mbpp", "humaneval": "tb_humaneval"}
LIMIT = 1
GEN = "max_gen_toks=10"  # both sides (lm-eval's --gen_kwargs): random weights never stop early, and CI has 2 cores


def make_llama3_like(path: Path, chat_template: bool = True) -> dict:
    """Tiny random Llama + the embedded BPE tokenizer with Llama-3's special tokens; returns their ids."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from tidar_bench.testing import make_hf_model

    tok = Tokenizer.from_file(str(EMBEDDED_TOKENIZER))
    tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    ids = {t: tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>")}
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>",
                                     pad_token="<|pad|>", model_max_length=4096)
    if chat_template:
        hf_tok.chat_template = CHAT_TEMPLATE
    make_hf_model("llama", path, vocab_size=tok.get_vocab_size(), max_position_embeddings=4096,
                  bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|endoftext|>"])
    hf_tok.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|endoftext|>"], ids["<|eot_id|>"]]}))
    return ids


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3_like")
    return d, make_llama3_like(d)


@pytest.fixture(scope="module")
def ours(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "run"
    argv = ["run", "--model", str(model[0]), "--decoders", "ar,hf", "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
            "--device", "cpu", "--dtype", "float32", "--out", str(out), "--allow-code-exec", "--gen-kwargs", GEN]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def theirs(model, ours):
    """lm-eval's own HFLM on the same tasks, with simple_evaluate's default seeds (= lm_eval's CLI)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    sandbox.grant()  # our `run` above already opted in with --allow-code-exec
    lm = HFLM(pretrained=str(model[0]), device="cpu", dtype="float32", batch_size=1)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS.values()), task_manager=T.task_manager(), limit=LIMIT,
                                  gen_kwargs=GEN, log_samples=True, bootstrap_iters=1000, confirm_run_unsafe_code=True)
    return lm, res


def _rows(out: Path, decoder: str, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_{decoder}_{task}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", list(TASKS.values()))
def test_prompts_outputs_and_scores_equal_lm_evals_hf(model, ours, theirs, task):
    from tidar_bench.harness.lm import TidarBenchLM
    from tidar_bench.registry import DecoderContext

    hflm, res = theirs
    key = lambda s: (s["doc_id"], s["filter"])  # noqa: E731 - lm-eval logs one sample per filter
    samples = sorted(res["samples"][task], key=key)
    assert len({s["doc_id"] for s in samples}) == LIMIT
    their_prompts = [s["arguments"][0][0] for s in samples]
    their_outputs = [s["resps"][0][0] for s in samples]
    our_lm = TidarBenchLM(DecoderContext(model[0], "cpu", "float32"), "ar")
    for prompt in their_prompts:  # the same token ids, BOS included (the tokenizer adds it, as HFLM lets it)
        want = hflm.tok_batch_encode([prompt])[0][0].tolist()
        assert our_lm.encode_context(prompt) == want and want[0] == model[1]["<|begin_of_text|>"]
    for decoder in ("ar", "hf"):
        rows = sorted(_rows(ours, decoder, task), key=key)
        assert [r["prompt"] for r in rows] == their_prompts  # byte-identical prompts
        assert [r["prompt_hash"] for r in rows] == [s["prompt_hash"] for s in samples]
        assert [r["output"][0] for r in rows] == their_outputs, decoder  # identical greedy outputs
        assert [r["filtered"] for r in rows] == [s["filtered_resps"] for s in samples]
        our_scores = json.loads((ours / f"results_{decoder}.json").read_text())["results"][task]
        their_scores = {k: v for k, v in res["results"][task].items() if k != "alias"}
        assert {k: our_scores[k] for k in their_scores} == their_scores, decoder
    assert any(len(o) > 0 for o in their_outputs)  # the model did generate something


def test_run_json_records_every_seed_and_eos_ids(model, ours):
    info = json.loads((ours / "run.json").read_text())
    assert info["seeds"] == {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
                             "fewshot_random_seed": 1234, "sampling_seed": 0}
    from tidar_bench.registry import DecoderContext

    ids = model[1]
    assert set(DecoderContext(model[0]).stop_token_ids) == {ids["<|endoftext|>"], ids["<|eot_id|>"]}


def test_summary_names_the_filter(ours):
    import csv

    with open(ours / "summary.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "tb_gsm8k" and r["decoder"] == "ar"]
    assert sorted(r["filter"] for r in rows) == ["flexible-extract", "strict-match"]
    from tidar_bench.cli.run import metric_label

    assert metric_label("exact_match,strict-match") == "exact_match (strict-match)"
    assert metric_label("pass@1,none") == "pass@1"
