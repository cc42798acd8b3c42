"""Training: the TiDAR doubled-sequence loss is exact, loss decreases, DDP on 2 gloo processes
equals one process, and the `train` CLI writes checkpoints the decoders load."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tidar_bench import masks
from tidar_bench.checkpoint import TidarConfig
from tidar_bench.cli import main
from tidar_bench.errors import UserError
from tidar_bench.corpus import make_splits, train_tokenizer, write_jsonl
from tidar_bench.model import ModelConfig, Transformer, init_weights, load_model, save_model
from tidar_bench.training.data import PackedDataset, add_mask_token, read_texts
from tidar_bench.training.loop import TrainConfig, train
from tidar_bench.training.tidar import TidarObjective



def assert_same_adam_step(a: torch.Tensor, b: torch.Tensor, lr: float) -> None:
    """Weights after one Adam step from the same start: Adam's first step is lr * g / (|g| + eps), so
    summation-order noise on a gradient near eps moves a few single weights by a small fraction of lr
    (seen: 1.8e-5 = 0.018 lr on 1 of 4608). A wrong batch split or missing gradient averaging moves
    most weights by up to ~lr. So: every weight within 0.05 lr, and 99.9% within 1e-5."""
    diff = (a.float() - b.float()).abs()
    assert float(diff.max()) <= 0.05 * lr, float(diff.max())
    assert float((diff > 1e-5).float().mean()) <= 1e-3, float((diff > 1e-5).float().mean())

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny AR base checkpoint with a BPE tokenizer trained on the synthetic corpus."""
    d = tmp_path_factory.mktemp("base")
    items, _ = make_splits(300, 5, seed=0)
    write_jsonl(items, d / "train.jsonl")
    tok = train_tokenizer([it["text"] for it in items], 300, d / "ckpt", with_mask=False)
    cfg = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 48, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
           "max_position_embeddings": 512}
    # no [MASK] in the base: the TiDAR recipe must add it to the tokenizer and the embeddings
    save_model(init_weights(Transformer(ModelConfig.from_dict(cfg)), std=0.05), d / "ckpt")
    return d


def test_tidar_loss_equals_separate_forwards(base):
    """The one-forward doubled sequence gives exactly the AR loss of a plain causal forward and
    the diffusion loss of forwards where each block b sees x_{<bk} followed by k mask tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
    model = load_model(base / "ckpt", "float32", "cpu")
    obj = TidarObjective(model, tok, block_size=4, alpha=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (2, 12), generator=g)
    loss, metrics = obj.loss(model, x)
    V = model.config.vocab_size
    ar = F.cross_entropy(model(x).logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    diff_terms = []
    for b in range(3):
        s = b * 4
        ids = torch.cat([x[:, :s], torch.full((2, 4), obj.mask_id)], 1)
        m = torch.ones(s + 4, s + 4, dtype=torch.bool)
        m[:s, :s] = masks.causal(s)
        m[:s, s:] = False
        logits = model(ids, torch.arange(s + 4), m).logits[:, s:]
        diff_terms.append(F.cross_entropy(logits.reshape(-1, V), x[:, s : s + 4].reshape(-1), reduction="sum"))
    diff = sum(diff_terms) / x.numel()
    assert torch.allclose(metrics["ar"], ar, atol=1e-5)
    assert torch.allclose(metrics["diff"], diff, atol=1e-5)
    assert torch.allclose(loss, (0.5 * ar + diff) / 1.5, atol=1e-5)


def test_add_mask_token_grows_tied_embedding(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
    model = load_model(base / "ckpt", "float32", "cpu")
    old = model.config.vocab_size
    mid = add_mask_token(model, tok)
    assert mid == tok.mask_token_id and mid >= old
    assert model.config.vocab_size == mid + 1 == model.model.embed_tokens.weight.shape[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert json.loads(json.dumps(model.config.extra))["vocab_size"] == mid + 1  # what save_model writes
    torch.testing.assert_close(model.model.embed_tokens.weight[mid], model.model.embed_tokens.weight[:old].mean(0))


@pytest.mark.parametrize("padding", [0, 5])
def test_add_mask_token_untied_and_padded_vocab(base, padding):
    """Untied head: both matrices grow (padding 0), or, when the vocabulary has unused padding
    rows, the mask takes the first free id without resizing; either way its rows start as the mean."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
    n = len(tok)
    cfg = {"model_type": "qwen3", "vocab_size": n + padding, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    model = init_weights(Transformer(ModelConfig.from_dict(cfg)), std=0.05)
    emb_before, head_before = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    mid = add_mask_token(model, tok)
    assert mid == n == tok.mask_token_id
    V = max(n + 1, n + padding)
    assert model.config.vocab_size == V and model.config.extra["vocab_size"] == V
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb.shape[0] == head.shape[0] == V and head is not emb
    torch.testing.assert_close(emb[:n], emb_before[:n])
    torch.testing.assert_close(head[:n], head_before[:n])
    torch.testing.assert_close(emb[n], emb_before[:n].mean(0))
    torch.testing.assert_close(head[n], head_before[:n].mean(0))
    assert add_mask_token(model, tok) == mid and model.config.vocab_size == V  # idempotent


def test_read_texts_and_packed_batches(tmp_path):
    (tmp_path / "a.txt").write_text("doc one\n\nstill one\n\n\ndoc two\n\n\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"body": "doc three"}\n\n{"body": "doc four"}\n')
    texts = read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"], field="body")
    assert texts == ["doc one\n\nstill one", "doc two", "doc three", "doc four"]
    with pytest.raises(UserError, match="no field 'text'"):
        read_texts([tmp_path / "b.jsonl"])
    (tmp_path / "c.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_texts([tmp_path / "c.jsonl"])

    class CharTok:  # one id per character, EOS = 0
        eos_token_id = 0

        def encode(self, t, add_special_tokens=False):
            return [ord(c) for c in t]

    docs = ["".join(chr(65 + 7 * i + j) for j in range(6 + i % 2)) for i in range(8)]  # all characters distinct
    ds = PackedDataset(docs, CharTok(), seq_len=5, seed=1)
    flat = [i for t in docs for i in [*CharTok().encode(t), 0]]
    assert len(ds) == len(flat) // 5 == 12 and ds.data.flatten().tolist() == flat[:60]  # EOS after each doc, tail dropped
    g1, g2 = ds.batches(4), ds.batches(4)
    first = [next(g1) for _ in range(5)]  # 3 batches per epoch: crosses into the next epoch
    assert all(torch.equal(a, next(g2)) for a in first)  # deterministic given the seed
    epoch0 = sorted(r for b in first[:3] for r in b.tolist())
    assert epoch0 == sorted(ds.data.tolist())  # an epoch visits every sequence once
    assert not torch.equal(torch.cat(first[:3]), ds.data)  # ... in shuffled order
    assert not torch.equal(torch.cat(first[3:5]), torch.cat(first[:2]))  # a new order per epoch
    r0, r1 = ds.batches(4, 0, 2), ds.batches(4, 1, 2)
    for whole in first[:3]:  # each rank gets its rows of the same global batch
        a, b = next(r0), next(r1)
        assert torch.equal(a, whole[0::2]) and torch.equal(b, whole[1::2])
    with pytest.raises(UserError, match="divisible"):
        next(ds.batches(3, 0, 2))


def test_lr_schedule():
    c = TrainConfig(lr=1.0, warmup_steps=4, steps=20, min_lr_ratio=0.1)
    lrs = [c.lr_at(s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert c.lr_at(20) == pytest.approx(0.1) and lrs[-1] > 0.1


def test_grad_accumulation_equals_big_batch(base, tmp_path):
    """Batch 8 in one micro-step == batch 4 accumulated twice (the same 8 rows, averaged)."""
    from transformers import AutoTokenizer

    runs = {}
    for name, bs, acc in (("big", 8, 1), ("accum", 4, 2)):
        tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
        obj = TidarObjective.from_checkpoint(base / "ckpt", tok, "cpu", block_size=4)
        data = PackedDataset(read_texts([base / "train.jsonl"]), tok, 32, seed=5)
        hist = train(obj, data, tmp_path / name, TrainConfig(seq_len=32, batch_size=bs, grad_accum=acc, steps=1,
                                                              lr=1e-3, warmup_steps=0, progress=False))
        runs[name] = (hist[0], obj.model.state_dict())
    (h1, w1), (h2, w2) = runs["big"], runs["accum"]
    for k in ("loss", "ar", "diff"):
        assert h1[k] == pytest.approx(h2[k], abs=1e-5)
    base_w = load_model(base / "ckpt", "float32", "cpu").state_dict()
    assert not torch.allclose(w1["model.layers.0.mlp.up_proj.weight"], base_w["model.layers.0.mlp.up_proj.weight"])
    for k in w1:
        assert_same_adam_step(w1[k], w2[k], lr=1e-3)


def test_training_dtype(base, tmp_path):
    """bf16 autocast also runs on CPU (finite losses, fp32 weights saved); float16 is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
    obj = TidarObjective.from_checkpoint(base / "ckpt", tok, "cpu", block_size=4)
    data = PackedDataset(read_texts([base / "train.jsonl"]), tok, 32, seed=0)
    with pytest.raises(UserError, match="float16"):
        train(obj, data, tmp_path / "fp16", TrainConfig(seq_len=32, batch_size=4, steps=1, dtype="float16", progress=False))
    hist = train(obj, data, tmp_path / "bf16", TrainConfig(seq_len=32, batch_size=4, steps=2, dtype="bfloat16",
                                                           progress=False))
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert load_model(tmp_path / "bf16", "auto", "cpu").dtype == torch.float32
    assert json.loads((tmp_path / "bf16" / "train_config.json").read_text())["dtype"] == "bfloat16"


def test_loss_decreases_and_checkpoint_decodes(base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base / "ckpt"))
    obj = TidarObjective.from_checkpoint(base / "ckpt", tok, "cpu", block_size=4)
    data = PackedDataset(read_texts([base / "train.jsonl"]), tok, 64, seed=0)
    hist = train(obj, data, tmp_path / "out", TrainConfig(seq_len=64, batch_size=8, steps=40, lr=3e-3, warmup_steps=4,
                                                           log_every=1, progress=False))
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert hist[-1]["ar"] < hist[0]["ar"] and hist[-1]["diff"] < hist[0]["diff"]
    out = tmp_path / "out"
    assert (out / "loss.png").stat().st_size > 1000 and (out / "train_log.jsonl").exists()
    cfg = TidarConfig.load(out)
    assert cfg.block_size == 4 and cfg.mask_token_id == tok.mask_token_id
    from tidar_bench.decoding import GenerationConfig
    from tidar_bench.registry import DecoderContext, build_decoder

    ctx = DecoderContext(out, "cpu", "float32")
    prompt = ctx.tokenizer.encode("Question: Ava has 3 apples.")
    a = build_decoder("ar", ctx).generate(prompt, GenerationConfig(max_new_tokens=16))
    t = build_decoder("tidar", ctx).generate(prompt, GenerationConfig(max_new_tokens=16))
    assert a.tokens == t.tokens


def _train_cmd(base: Path, out: Path, steps: int = 1) -> list[str]:
    return ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(out),
            "--block-size", "4", "--steps", str(steps), "--seq-len", "32", "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", "--seed", "3", "--device", "cpu", "--grad-accum", "2"]


def test_ddp_two_gloo_processes_equal_single_process(base, tmp_path):
    """One optimiser step (2 accumulated micro-batches) with the global batch split over 2 gloo
    processes gives the same weights as one process on the whole batch. (Adam's first step is ~lr*sign(g), so summation-order
    noise on near-zero gradients moves single weights by a small fraction of lr; a wrong split or
    missing gradient averaging moves all of them by ~lr = 1e-3.)"""
    single = tmp_path / "single"
    assert main(_train_cmd(base, single)) == 0
    # the CLI's checkpoint: our loader, TidarConfig and the tokenizer (now with [MASK]) read it back
    from transformers import AutoTokenizer

    cfg, tok = TidarConfig.load(single), AutoTokenizer.from_pretrained(str(single))
    assert (cfg.block_size, cfg.alpha) == (4, 1.0) and cfg.mask_token_id == tok.mask_token_id == len(tok) - 1
    assert load_model(single, "float32", "cpu").config.vocab_size == len(tok)
    assert [json.loads(line)["step"] for line in (single / "train_log.jsonl").read_text().splitlines()] == [0]
    assert not list(tmp_path.glob(".*tmp"))  # the temp checkpoint dir was renamed away
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tidar_bench.cli", *_train_cmd(base, tmp_path / "ddp")]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers: no orphans left behind
        _, err = p.communicate()
        pytest.fail(f"torchrun timed out:\n{err[-3000:]}")
    assert p.returncode == 0, err[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    base_w = load_file(str(base / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        assert_same_adam_step(a[k], b[k], lr=1e-3)
        if k in base_w and base_w[k].shape == a[k].shape:
            moved += int(not torch.allclose(a[k], base_w[k]))
    assert moved > 0  # the step really changed the weights


def test_train_cli_errors(base, tmp_path, capsys):
    non_empty = tmp_path / "full"
    non_empty.mkdir()
    (non_empty / "x").write_text("x")
    cases = [
        ["train", "tidar", "--base", str(tmp_path / "nope"), "--data", str(base / "train.jsonl"), "--out", str(tmp_path / "o")],
        ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
        ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(non_empty)],
        ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(tmp_path / "o"),
         "--block-size", "0"],
        ["train", "tidar", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(tmp_path / "o"),
         "--dtype", "float16", "--device", "cpu"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", "tidar", "--base", str(base / "ckpt"), "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert json.loads((base / "ckpt" / "config.json").read_text())["model_type"] == "llama"


def test_block_diffusion_cli_trains_and_decodes(base, tmp_path):
    out = tmp_path / "bd"
    argv = ["train", "block-diffusion", "--base", str(base / "ckpt"), "--data", str(base / "train.jsonl"), "--out", str(out),
            "--block-size", "4", "--steps", "3", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]
    prompts = tmp_path / "prompts.jsonl"  # no answers: --eval-every records bd's T/NFE alone
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("1 2 3", "4 5 6")))
    assert main(argv + ["--eval-every", "3", "--eval-prompts", str(prompts), "--eval-max-new-tokens", "8"]) == 0
    ev = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    assert ev[-1]["step"] == 2 and ev[-1]["eval_tokens_per_nfe"] >= 1 and "eval_exact_match" not in ev[-1]
    from tidar_bench.decoding import GenerationConfig
    from tidar_bench.registry import DecoderContext, build_decoder

    g = build_decoder("bd", DecoderContext(out, "cpu", "float32")).generate([5, 6, 7], GenerationConfig(max_new_tokens=8))
    assert len(g.tokens) == 8
