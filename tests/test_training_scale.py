"""Training at scale: FSDP2 on 2 gloo processes equals one process, resume after a crash ends at
the uninterrupted weights, data from files/datasets/chats with mixing weights, distill, evaluation
and throughput in the log, and one-line errors for bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import base  # noqa: F401  (the tiny AR base checkpoint fixture)
from tidar_bench.cli import main
from tidar_bench.errors import UserError
from tidar_bench.model import load_model
from tidar_bench.training.data import MixedDataset, PackedDataset, read_source, read_texts
from tidar_bench.training.loop import TrainConfig, latest_checkpoint, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def _tidar_cmd(base, out, *extra):
    return ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(out),
            "--block-size", "4", "--steps", "4", "--seq-len", "32", "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", "--seed", "3", "--device", "cpu", "--log-every", "1", *extra]


def torchrun(*args: str) -> None:
    """`tidar-bench ARGS` under torchrun with 2 gloo processes; the test fails with its stderr if it
    fails or runs past 300 s (the whole process group is killed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tidar_bench.cli", *args]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        pytest.fail(f"torchrun timed out:\n{err[-3000:]}")
    assert p.returncode == 0, err[-3000:]


def _losses(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_fsdp_two_gloo_processes_equal_single_process(base, tmp_path):
    """4 steps of TiDAR training under torchrun with FSDP2 (fp32 on CPU: gloo has no bf16
    collectives worth testing here), activation checkpointing and a checkpoint at step 2, against
    one plain process: the same loss curve, the same final weights (Adam noise tolerance), an
    ordinary HF checkpoint that load_model and transformers read. Then a single process resumes
    the FSDP run's step-2 checkpoint and lands on the FSDP run's final weights."""
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    assert main(_tidar_cmd(base, single)) == 0
    torchrun(*_tidar_cmd(base, fsdp, "--shard", "fsdp", "--activation-checkpointing", "--save-every", "2"))
    a, b = _losses(single), _losses(fsdp)
    assert [h["step"] for h in a] == [h["step"] for h in b] == [0, 1, 2, 3]
    for ha, hb in zip(a, b):
        for k in ("loss", "ar", "diff"):
            assert ha[k] == pytest.approx(hb[k], abs=1e-4), (ha["step"], k)
        assert hb["tokens_per_s"] > 0 and hb["peak_mem_gb"] > 0
    assert a[-1]["loss"] < a[0]["loss"] - 0.1  # the steps really train
    wa, wb = load_file(str(single / "model.safetensors")), load_file(str(fsdp / "model.safetensors"))
    assert wa.keys() == wb.keys() and "lm_head.weight" not in wb  # tied head, saved the HF way
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) < 2e-4, k  # lr 1e-3: a wrong split moves weights by ~1e-3
    # the gathered checkpoint is an ordinary one: our loader and transformers give the same logits
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 17, 3, 8]])
    ours = load_model(fsdp, "float32", "cpu")(ids).logits
    hf = AutoModelForCausalLM.from_pretrained(str(fsdp), torch_dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    ckpt = latest_checkpoint(fsdp)  # the last step is checkpointed too (a finished run can be extended)
    assert ckpt.name == "step-00000004" and load_model(ckpt, "float32", "cpu").config.vocab_size == wb["model.embed_tokens.weight"].shape[0]
    # FSDP's training state of step 2 resumes in one process (another world size and shard mode)
    moved = tmp_path / "resumed"
    shutil.copytree(fsdp / "checkpoints" / "step-00000002", moved / "checkpoints" / "step-00000002")
    assert main(_tidar_cmd(base, moved, "--resume")) == 0
    assert [h["step"] for h in _losses(moved)] == [0, 1, 2, 3]
    wr = load_file(str(moved / "model.safetensors"))
    for k in wa:
        assert float((wr[k] - wb[k]).abs().max()) < 2e-4, k


class _Crash(Exception):
    pass


def crash_at(obj, n: int) -> None:
    """Make the objective's n-th loss call raise _Crash (a run killed mid-training)."""
    calls, loss = [0], obj.loss

    def crashing(trainable, batch):
        calls[0] += 1
        if calls[0] == n:
            raise _Crash
        return loss(trainable, batch)

    obj.loss = crashing


def _objective(kind, base, tok):
    from tidar_bench.training.block_diffusion import BlockDiffusionObjective
    from tidar_bench.training.eagle_head import EagleHeadObjective
    from tidar_bench.training.tidar import TidarObjective

    if kind == "tidar":
        return TidarObjective.from_checkpoint(base / "ckpt", tok, "cpu", block_size=4)
    if kind == "block_diffusion":  # random noise per step: the RNG state must be restored
        return BlockDiffusionObjective(load_model(base / "ckpt", "float32", "cpu").requires_grad_(True), tok, block_size=4)
    from tidar_bench.baselines.eagle_head import EagleHead

    target = load_model(base / "ckpt", "float32", "cpu")
    return EagleHeadObjective(target, EagleHead.from_target(target, "eagle3", seed=1), ttt_steps=2)


@pytest.mark.parametrize("kind", ["tidar", "eagle", "block_diffusion"])
def test_resume_after_crash_equals_uninterrupted(base, tmp_path, kind):
    """20 steps (checkpoint every 10; tidar with grad accumulation 2) == a run that crashes in step 11 and is
    resumed: same weights, same loss log. Resume restores weights, AdamW moments, schedule, RNG and
    data position; a wrong one of these changes the weights by ~lr."""
    from transformers import AutoTokenizer

    cfg = dict(seq_len=12, batch_size=2, grad_accum=2 if kind == "tidar" else 1, steps=20, lr=3e-3, warmup_steps=3, save_every=10,
               log_every=1, progress=False, keep_checkpoints=1, seed=4)

    def run(out, crash=0, resume=False):
        tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
        obj = _objective(kind, base, tok)
        data = PackedDataset(read_texts([base / "train.jsonl"]), tok, 12, seed=2)
        if crash:
            crash_at(obj, crash)
        train(obj, data, out, TrainConfig(**cfg, resume=resume))
        return obj.module()

    whole = run(tmp_path / "whole")
    with pytest.raises(_Crash):
        run(tmp_path / "cut", crash=cfg["grad_accum"] * 10 + cfg["grad_accum"])  # the last micro-step of step 11
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000010"
    assert not (tmp_path / "cut" / "model.safetensors").exists() and not (tmp_path / "cut" / "config.json").exists()
    resumed = run(tmp_path / "cut", resume=True)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    la, lb = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert [h["step"] for h in lb] == list(range(20))
    assert [h["loss"] for h in la] == pytest.approx([h["loss"] for h in lb], abs=1e-6)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-00000020"]  # keep_checkpoints=1; the last step too


def test_bad_input_one_line_nothing_written(base, tmp_path, capsys):
    import pandas as pd

    pq = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["a document", "another one"]}).to_parquet(pq)
    half = tmp_path / "half"  # an interrupted checkpoint write is nothing to resume from
    (half / "checkpoints" / ".step-00000010.tmp").mkdir(parents=True)
    cases = {
        "no checkpoint": (_tidar_cmd(base, tmp_path / "o", "--resume"), "no checkpoint to resume"),
        "half checkpoint": (_tidar_cmd(base, half, "--resume"), "no checkpoint to resume"),
        "field": (["train", "ar", "--base", str(base / "ckpt"), "--data", str(pq), "--out", str(tmp_path / "o"),
                   "--text-field", "text", "--device", "cpu"], "no field 'text' (fields: body)"),
        "fsdp": (_tidar_cmd(base, tmp_path / "o", "--shard", "fsdp"), "needs several processes: launch with torchrun"),
        "weights": (_tidar_cmd(base, tmp_path / "o", "--data-weights", "1,2"), "2 weights for 1"),
        "eval": (_tidar_cmd(base, tmp_path / "o", "--eval-every", "2"), "--eval-prompts"),
        "hub offline": (["train", "ar", "--base", str(base / "ckpt"), "--data", "someone/no-such-dataset", "--out",
                         str(tmp_path / "o"), "--device", "cpu"], "cannot load dataset someone/no-such-dataset"),
    }
    for name, (argv, msg) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], (name, err)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in half.rglob("*")] == ["checkpoints", ".step-00000010.tmp"]


class CharTok:  # one id per character, EOS = 0
    eos_token_id = 0

    def encode(self, t, add_special_tokens=False):
        return [ord(c) for c in t]


def test_data_sources_and_chats(base, tmp_path):
    """Parquet, Arrow, a save_to_disk directory and a directory read through datasets.load_dataset
    (also streaming) give the same documents; chats render with the chat template."""
    import datasets
    from transformers import AutoTokenizer

    docs = [f"document number {i}" for i in range(6)]
    ds = datasets.Dataset.from_dict({"text": docs, "other": list(range(6))})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "dir").mkdir()
    ds.to_parquet(str(tmp_path / "dir" / "train.parquet"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for src in (tmp_path / "d.parquet", arrow, tmp_path / "saved", tmp_path / "dir"):
        assert read_source(src) == docs, src
    assert read_source(tmp_path / "dir", streaming=True, max_docs=2) == docs[:2]
    with pytest.raises(UserError, match="no field 'body'"):
        read_source(tmp_path / "d.parquet", "body")
    with pytest.raises(UserError, match="not found"):
        read_source(tmp_path / "missing.parquet")

    tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    assert read_texts([tmp_path / "chat.jsonl"], "messages", tok) == ["<user>hi\n<assistant>hello\n"]
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        read_texts([tmp_path / "chat.jsonl"], "messages", tok)


def test_batches_resume_at_any_position_and_mixing_weights():
    a = PackedDataset(["".join(chr(65 + (i * 7 + j) % 50) for j in range(9)) for i in range(12)], CharTok(), 4, seed=1)
    b = PackedDataset(["".join(chr(200 + (i * 5 + j) % 50) for j in range(9)) for i in range(12)], CharTok(), 4, seed=1)
    for ds in (a, MixedDataset([a, b], [3, 1], seed=2)):
        g = ds.batches(4)
        stream = [next(g) for _ in range(12)]  # several epochs
        for start in (0, 5, 11):
            assert torch.equal(next(ds.batches(4, start=start)), stream[start])
            r1 = ds.batches(4, 1, 2, start=start)  # a rank's rows of the same global batch
            assert torch.equal(next(r1), stream[start][1::2])
    mixed = MixedDataset([a, b], [3, 1], seed=0).batches(8)
    rows = torch.cat([next(mixed) for _ in range(100)])
    frac_a = float((rows[:, 0] < 200).float().mean())
    assert 0.70 < frac_a < 0.80  # weights 3:1 -> 75% of rows from the first source


def test_distill_eval_and_throughput(base, tmp_path):
    """distill writes the target's own greedy responses; `train eagle` trains on them with
    evaluation (mean accepted length, exact match) and throughput in the log; `train tidar`
    evaluates T/NFE."""
    from tidar_bench.decoding import GenerationConfig
    from tidar_bench.registry import DecoderContext, build_decoder

    items = [json.loads(line) for line in (base / "train.jsonl").read_text().splitlines()[:3]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": it["text"][:40], "answer": "7"}) + "\n" for it in items))
    out = tmp_path / "distilled.jsonl"
    assert main(["distill", "--model", str(base / "ckpt"), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ctx = DecoderContext(base / "ckpt", "cpu", "float32")
    first = build_decoder("ar", ctx).generate(ctx.tokenizer.encode(rows[0]["prompt"], add_special_tokens=False),
                                               GenerationConfig(max_new_tokens=6))
    assert len(rows) == 3 and rows[0]["response"] == first.text and rows[0]["text"] == rows[0]["prompt"] + first.text
    assert not list(tmp_path.glob(".*.tmp"))
    batched = tmp_path / "batched.jsonl"  # 2 sequences in flight: the same greedy responses
    assert main(["distill", "--model", str(base / "ckpt"), "--prompts", str(prompts), "--out", str(batched),
                 "--max-new-tokens", "6", "--device", "cpu", "--batch-size", "2"]) == 0
    assert [json.loads(line) for line in batched.read_text().splitlines()] == rows

    head = tmp_path / "head"
    assert main(["train", "eagle", "--target", str(base / "ckpt"), "--data", str(out), "--data", str(base / "train.jsonl"),
                 "--data-weights", "1,1", "--out", str(head), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--device", "cpu", "--log-every", "1", "--peak-tflops", "1", "--eval-every", "2",
                 "--eval-prompts", str(prompts), "--eval-max-new-tokens", "6"]) == 0
    log = _losses(head)
    assert all(h["tokens_per_s"] > 0 and h["peak_mem_gb"] > 0 and 0 < h["mfu"] < 1 for h in log)
    ev = [json.loads(line) for line in (head / "eval_log.jsonl").read_text().splitlines()]
    assert ev[0]["step"] == 1 and ev[0]["eval_mean_accepted_length"] >= 1 and 0 <= ev[0]["eval_exact_match"] <= 1
    assert not (head / ".eval").exists()

    tidar = tmp_path / "tidar"
    assert main(_tidar_cmd(base, tidar, "--steps", "2", "--eval-every", "1", "--eval-prompts", str(prompts),
                           "--eval-limit", "2", "--eval-max-new-tokens", "6")) == 0
    ev = [json.loads(line) for line in (tidar / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ev] == [0, 1] and all(e["eval_tokens_per_nfe"] >= 1 for e in ev)
    assert (tidar / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("name,label", [("qwen2.5-1.5b", "Qwen2.5-1.5B"), ("llama-3.1-8b", "Llama-3.1-8B")])
def test_docs_memory_figures_are_computed(name, label):
    """docs/training.md's per-GPU memory table = parameter counts of the shipped configs (meta device) x
    16 bytes (fp32 weights, fp32 grads, AdamW m and v), over 1 and 8 GPUs; bf16 gathered sizes."""
    from tidar_bench.model import ModelConfig, Transformer

    root = Path(__file__).resolve().parents[1]
    cfg = ModelConfig.from_dict(json.loads((root / "tidar_bench" / "configs" / f"{name}.json").read_text()))
    with torch.device("meta"):
        m = Transformer(cfg)
    n = sum(p.numel() for p in m.parameters())
    emb = m.model.embed_tokens.weight.numel() * (1 if cfg.tie_word_embeddings else 2)
    block = sum(p.numel() for p in m.model.layers[0].parameters())
    row = next(line for line in (root / "docs" / "training.md").read_text().splitlines() if line.startswith(f"| {label} |"))
    for figure in (f"{n / 1e9:.2f} B", f"{n * 16 / 2**30:.1f} GiB", f"{n * 16 / 8 / 2**30:.1f} GiB",
                   f"{emb * 2 / 2**30:.2f} GiB", f"{block * 2 / 2**30:.2f} GiB"):
        assert figure in row, (figure, row)
